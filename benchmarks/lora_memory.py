"""Memory of a LoRA train step on a big frozen base, estimated without a device: the step is
compiled (not run) for abstract inputs and XLA's memory analysis is read.

  python benchmarks/lora_memory.py [--model=flux-dev] [--resolution=1024] [--batch=1] \\
      [--rank=16] [--bases=bfloat16,int8,float8_e4m3fn] [--remat=dots_no_batch] [--mu_dtype=bfloat16]

For each base storage (a bfloat16 base, or the adapted layers' kernels in 8 bits:
lora.quantize_base) prints one JSON line: the bytes of the base parameters, of the adapters,
of the optimizer state and the EMA (trainable parameters only), XLA's per-device arguments,
temporaries and peak (arguments + outputs + temporaries - donated aliases), and compile time.
The model is jdiff's real train step (configs/flux_tune.py's recipe: flow loss, guidance input
1, adapters on every block's attention and MLP projections) at full size, with the text
conditioning as the latent cache would hand it (T5 states and the CLIP pooled vector).

Parameters, optimizer state and EMA are exact on any backend. Temporaries are the compiling
backend's plan: on CPU, attention is XLA's, which holds the [heads, S, S] scores of the block
being differentiated, where GPU's cuDNN flash attention holds none; so a CPU estimate of the
temporaries is an upper bound for a GPU step with model.attention=cudnn.
"""

from __future__ import annotations

import json
import time

import jax

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
  c = config_lib.load("configs/flux_tune.py")
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
  only: nothing is read)."""
  spec = MODELS[model]
  lora = L.LoRA(config.lora.rank, float(config.lora.alpha), config.lora.targets, config.lora.param_dtype or None,
                config.lora.quantize_base)
  side = config.data.resolution // 8
  meta = dict(latent_shape=[side, side, 16], context_shape=[spec["t5_len"], 4096], pooled_dim=768,
              dtype="bfloat16", resolution=config.data.resolution)
  return networks_lib.Networks(models.build(dict(config.model), lora=lora), None, side, 16, 0, latent=True,
                               latent_scale=spec["scale"], latent_shift=spec["shift"], cache_meta=meta)


def measure(config, model: str) -> dict:
  networks = step_networks(config, model)
  tx = optim.make_optimizer(config.optim, config.train.num_steps)
  mesh = shard_lib.make_mesh(config.mesh, jax.devices()[:1])
  rules = shard_lib.rules_tuple(config.sharding.logical_rules)
  abstract, shardings = state_lib.state_shardings(networks, tx, mesh, rules, config.optim.trainable)
  mask = optim.trainable_mask(abstract.params, config.optim.trainable)
  size = lambda leaves: int(sum(x.size * x.dtype.itemsize for x in leaves))
  params, trains = jax.tree.leaves(abstract.params), jax.tree.leaves(mask)
  t0 = time.perf_counter()
  compiled, _ = trainer.compile_step(networks, tx, config, mesh, rules, shardings, abstract)
  mem = compiled.memory_analysis()
  gib = lambda n: round(n / 2**30, 2)
  return dict(
      model=model, base=config.lora.quantize_base or config.model.param_dtype, resolution=config.data.resolution,
      batch=config.train.batch_size, rank=config.lora.rank, remat=config.model.remat, mu_dtype=config.optim.mu_dtype or
      "float32", base_params=sum(x.size for x, t in zip(params, trains) if not t),
      base_gib=gib(size(x for x, t in zip(params, trains) if not t)),
      adapter_gib=gib(size(x for x, t in zip(params, trains) if t)),
      optimizer_gib=gib(size(jax.tree.leaves(abstract.opt_state))), ema_gib=gib(size(jax.tree.leaves(abstract.ema_params))),
      arguments_gib=gib(mem.argument_size_in_bytes), temporaries_gib=gib(mem.temp_size_in_bytes),
      peak_gib=gib(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                   - mem.alias_size_in_bytes),
      backend=jax.default_backend(), compile_s=round(time.perf_counter() - t0, 1),
  )


def main(argv):
  del argv
  for base in _BASES.value:
    config = tune_config(_MODEL.value, _RESOLUTION.value, _BATCH.value, _RANK.value, base, _REMAT.value,
                         _MU_DTYPE.value)
    print(json.dumps(measure(config, _MODEL.value)), flush=True)


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
  app.run(main)
