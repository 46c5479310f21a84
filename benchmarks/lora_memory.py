"""Memory of a LoRA train step on a big frozen base, estimated without a device: the step is
compiled (not run) for abstract inputs and XLA's memory analysis is read.

  python benchmarks/lora_memory.py [--model=flux-dev] [--resolution=1024] [--batch=1] \\
      [--rank=16] [--bases=bfloat16,int8,float8_e4m3fn] [--remat=dots_no_batch] [--mu_dtype=bfloat16] \\
      [--target=h100]

For each base storage (a bfloat16 base, or the adapted layers' kernels in 8 bits:
lora.quantize_base) prints one JSON line: the bytes of the frozen base, the adapters, the
optimizer state and the EMA (trainable parameters only) -- exact, from the state's shapes --
then XLA's temporaries of the compiled step (activations kept for the backward pass and the
working set; outputs that are not donated count too) and the peak, their sum. The step is
jdiff's real one (configs/flux_tune.py's recipe: flow loss, guidance input 1, adapters on
every block's attention and MLP projections) at full size, with the text conditioning as the
latent cache hands it (T5 states and the CLIP pooled vector).

--target=h100 compiles for that GPU without one (XLA:GPU's own plan, cuDNN attention; needs
jax's CUDA plugin, see benchmarks/hlo_cost.py). Without it the step compiles for this
machine; on CPU the temporaries are then an upper bound (see `measure`; bound=true).
"""

from __future__ import annotations

import json
import os
import time

import flax.linen as nn
import jax
import numpy as np

from jdiff import config as config_lib
from jdiff import models
from jdiff import networks as networks_lib
from jdiff.models import layers as L
from jdiff.train import optim, trainer
from jdiff.train import sharding as shard_lib
from jdiff.train import state as state_lib

# The pipelines' geometry (their diffusers configs): VAE factor 8 with 16 channels, 2x2 patches,
# T5-XXL states of width 4096 (512 tokens for dev, 256 for schnell), CLIP-L pooled width 768.
MODELS = {
    "flux-dev": dict(model=dict(name="flux", variant="dev", patch_size=2, in_channels=16, context_dim=4096,
                                pooled_dim=768), t5_len=512, scale=0.3611, shift=0.1159),
    "flux-schnell": dict(model=dict(name="flux", variant="schnell", patch_size=2, in_channels=16, context_dim=4096,
                                    pooled_dim=768), t5_len=256, scale=0.3611, shift=0.1159),
}


def tune_config(model: str, resolution: int, batch: int, rank: int, base: str, remat: str, mu_dtype: str):
  """configs/flux_tune.py with the model's architecture in place of an import's, and `base`:
  'bfloat16' (a bf16 base) or an 8-bit type (lora.quantize_base, the rest of the base bf16)."""
  spec = MODELS[model]
  c = config_lib.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "flux_tune.py"))
  c.model.update(spec["model"], dtype="bfloat16", param_dtype="bfloat16", scan=True, remat=remat,
                 attention="default")
  c.text.update(encoder="flux", t5_len=spec["t5_len"])
  c.data.resolution = resolution
  c.train.batch_size = batch
  c.lora.update(rank=rank, alpha=float(rank), quantize_base="" if base == "bfloat16" else base)
  c.optim.mu_dtype = mu_dtype
  c.mesh.update(data=1, fsdp=1, tensor=1)
  return c


def step_networks(config, model: str) -> networks_lib.Networks:
  """The networks of a Flux LoRA run on a latent cache, with the cache's description (shapes
  only: nothing is read; the empty caption's embedding, which caption dropout puts in, is zeros)."""
  spec = MODELS[model]
  lora = L.LoRA(config.lora.rank, float(config.lora.alpha), config.lora.targets, config.lora.param_dtype or None,
                config.lora.quantize_base)
  side = config.data.resolution // 8
  meta = dict(latent_shape=[side, side, 16], context_shape=[spec["t5_len"], 4096], pooled_dim=768,
              dtype="bfloat16", resolution=config.data.resolution)
  null = dict(context=np.zeros((spec["t5_len"], 4096), np.float32), pooled=np.zeros((768,), np.float32))
  return networks_lib.Networks(models.build(dict(config.model), lora=lora), None, side, 16, 0, latent=True,
                               latent_scale=spec["scale"], latent_shift=spec["shift"], cached=dict(null=null),
                               cache_meta=meta)


def _state_bytes(config, model: str) -> dict:
  """Exact bytes of the train state's parts (abstract shapes: nothing is allocated)."""
  networks = step_networks(config, model)
  tx = optim.make_optimizer(config.optim, config.train.num_steps)
  boxed = jax.eval_shape(lambda r: state_lib.init_state(networks, tx, r, config.optim.trainable), jax.random.key(0))
  state = nn.unbox(boxed)
  mask = jax.tree.leaves(optim.trainable_mask(state.params, config.optim.trainable))
  params = jax.tree.leaves(state.params)
  size = lambda leaves: sum(x.size * x.dtype.itemsize for x in leaves)
  return dict(base_params=sum(x.size for x, t in zip(params, mask) if not t),
              base=size(x for x, t in zip(params, mask) if not t), adapters=size(x for x, t in zip(params, mask) if t),
              optimizer=size(jax.tree.leaves(state.opt_state)), ema=size(jax.tree.leaves(state.ema_params)))


def _temporaries(config, model: str, devices) -> tuple[int, float]:
  """(XLA's temporary bytes of the compiled step on `devices`' backend, compile seconds)."""
  networks = step_networks(config, model)
  tx = optim.make_optimizer(config.optim, config.train.num_steps)
  mesh = shard_lib.make_mesh(config.mesh, devices[:1])
  rules = shard_lib.rules_tuple(config.sharding.logical_rules)
  abstract, shardings = state_lib.state_shardings(networks, tx, mesh, rules, config.optim.trainable)
  t0 = time.perf_counter()
  compiled, _ = trainer.compile_step(networks, tx, config, mesh, rules, shardings, abstract)
  mem = compiled.memory_analysis()
  # Outputs that are not donated arguments (metrics, a few bytes) count too.
  return int(mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes), time.perf_counter() - t0


def measure(config, model: str, target: str = "", device_memory_gib: float = 0.0) -> dict:
  """The state's exact bytes, and the compiled step's temporaries.

  target '' compiles for this machine's backend. On CPU that is an upper bound: XLA:CPU
  computes bfloat16 in float32 and, in a scanned block stack, widens whole bfloat16 (and fp8)
  weight stacks at once, a copy of the base no GPU makes; so there the step is compiled in
  float32 with a float32 base (no widening; activations of twice bfloat16's bytes). target
  'h100' / 'h200' compiles the step as it is for that GPU without one (benchmarks/hlo_cost.py;
  needs jax's CUDA plugin)."""
  state = _state_bytes(config, model)
  compiled_config = config.copy_and_resolve_references()
  if target:
    import hlo_cost  # pylint: disable=g-import-not-at-top  (beside this script)

    compiled_config.model.attention = "cudnn"
    with hlo_cost.gpu_target(target, device_memory_gib) as devices:
      temporaries, compile_s = _temporaries(compiled_config, model, devices)
    backend, bound = target, False
  else:
    backend = jax.default_backend()
    bound = backend == "cpu"
    if bound:
      compiled_config.model.update(dtype="float32", param_dtype="float32")
    temporaries, compile_s = _temporaries(compiled_config, model, jax.devices())
  gib = lambda n: round(n / 2**30, 2)
  resident = state["base"] + state["adapters"] + state["optimizer"] + state["ema"]
  return dict(
      model=model, base=config.lora.quantize_base or config.model.param_dtype, resolution=config.data.resolution,
      batch=config.train.batch_size, rank=config.lora.rank, remat=config.model.remat,
      mu_dtype=config.optim.mu_dtype or "float32", base_params=state["base_params"], base_gib=gib(state["base"]),
      adapter_gib=gib(state["adapters"]), optimizer_gib=gib(state["optimizer"]), ema_gib=gib(state["ema"]),
      state_gib=gib(resident), temporaries_gib=gib(temporaries), peak_gib=gib(resident + temporaries),
      bound=bound, compiled=f"{backend}, {compiled_config.model.dtype}", compile_s=round(compile_s, 1))


def main(argv):
  del argv
  if _TARGET.value:
    jax.config.update("jax_platforms", "cpu")  # before any backend starts: the plugin finds no GPU
  for base in _BASES.value:
    config = tune_config(_MODEL.value, _RESOLUTION.value, _BATCH.value, _RANK.value, base, _REMAT.value,
                         _MU_DTYPE.value)
    print(json.dumps(measure(config, _MODEL.value, _TARGET.value, _MEMORY.value)), flush=True)


if __name__ == "__main__":
  from absl import app, flags

  _MODEL = flags.DEFINE_enum("model", "flux-dev", list(MODELS), "architecture (full size)")
  _RESOLUTION = flags.DEFINE_integer("resolution", 1024, "square image side in pixels")
  _BATCH = flags.DEFINE_integer("batch", 1, "images per step")
  _RANK = flags.DEFINE_integer("rank", 16, "LoRA rank")
  _BASES = flags.DEFINE_list("bases", ["bfloat16", "int8", "float8_e4m3fn"],
                             "base storages: bfloat16, int8, float8_e4m3fn")
  _REMAT = flags.DEFINE_string("remat", "dots_no_batch", "model.remat policy")
  _MU_DTYPE = flags.DEFINE_string("mu_dtype", "", "optim.mu_dtype ('' = the adapters' float32)")
  _TARGET = flags.DEFINE_enum("target", "", ["", "h100", "h200"],
                              "'' = this machine's backend; a GPU to compile for without one (jax's CUDA plugin)")
  _MEMORY = flags.DEFINE_float("device_memory_gib", 0.0, "with --target: the memory XLA plans for (0: the card's)")
  app.run(main)
