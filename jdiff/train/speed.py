"""Training-step benchmark: one JSON line with step time, throughput, FLOPs and MFU.

  python -m jdiff.bench --config=configs/mmdit_256.py[:variant] [--steps=20 --warmup=3] [--config.x=y ...]
                        [--profile_dir=DIR]   # then: python benchmarks/profile_summary.py DIR

Runs the real jitted, sharded, donated train step of the config on synthetic batches of
the config's shapes (no input pipeline: its throughput is measured by benchmarks/loader.py).

Output fields:
  step_time_s         median over `steps` timed steps after `warmup` untimed ones
  images_per_s        global batch / step_time_s
  tokens_per_s        image tokens (patches) per second
  flops_per_step      analytic matmul + attention FLOPs of forward and backward (see
                      `model_flops`), the convention of MFU: rematerialisation not counted
  xla_flops_per_step  XLA's cost analysis of the compiled step (counts recomputation and
                      elementwise work; on GPU it leaves out library calls, cuBLAS GEMMs
                      and cuDNN attention, so it undercounts there; unavailable on some
                      backends)
  mfu                 flops_per_step / step_time_s / (peak FLOP/s per device x devices),
                      when the device's peak is in PEAK_FLOPS
  compile_s           lowering + compilation of the step
  peak_memory_bytes   per device, from the compiled step's memory analysis
                      (arguments + outputs + temporaries - donated aliases)
"""

from __future__ import annotations

import os
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jdiff import errors
from jdiff.train import flops as flops_lib
from jdiff import networks as networks_lib
from jdiff.train import optim
from jdiff.train import sharding as shard_lib
from jdiff.train import state as state_lib
from jdiff.train import trainer


# Peak dense FLOP/s per device by (device-kind substring, compute dtype). bf16: tensor-core /
# MXU peak without sparsity; float32 on GPUs: the non-tensor-core FP32 rate.
PEAK_FLOPS = {
    ("H200", "bfloat16"): 989e12, ("H100", "bfloat16"): 989e12, ("A100", "bfloat16"): 312e12,
    ("H200", "float32"): 67e12, ("H100", "float32"): 67e12, ("A100", "float32"): 19.5e12,
    ("TPU v6", "bfloat16"): 918e12, ("TPU v5p", "bfloat16"): 459e12, ("TPU v5 lite", "bfloat16"): 197e12,
    ("TPU v5e", "bfloat16"): 197e12, ("TPU v4", "bfloat16"): 275e12,
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
  for (kind, dt), value in PEAK_FLOPS.items():
    if kind.lower() in device_kind.lower() and dt == dtype:
      return value
  return None


def step_parts(config, devices=None):
  """(networks, tx, mesh, rules) of the config's train step, its mesh over `devices`
  (default: all): what jdiff.bench and the benchmark scripts compile or trace."""

  networks = networks_lib.build_networks(config)
  tx = optim.make_optimizer(config.optim, optim.num_updates(config))
  return networks, tx, shard_lib.make_mesh(config.mesh, devices), shard_lib.rules_tuple(config.sharding.logical_rules)


def peak_memory_bytes(compiled) -> int | None:
  """Per-device peak of a compiled step from XLA's memory analysis: arguments, outputs and
  temporaries, less the outputs that alias (donated) arguments."""
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)


def run(config, steps: int = 20, warmup: int = 3, profile_dir: str = "", profile_steps: int = 2) -> dict[str, Any]:
  """Compiles and times the config's train step; with profile_dir, then traces
  `profile_steps` more steps there (jax.profiler; summarise with benchmarks/profile_summary.py
  or open in TensorBoard/XProf)."""

  if steps < 1 or warmup < 0:
    raise errors.InvalidArgument(f"--steps={steps} must be >= 1 and --warmup={warmup} >= 0")
  if config.objective != "flow":
    raise errors.InvalidArgument(f"jdiff.bench times the flow objective's step; objective {config.objective!r} "
                                 "needs a frozen model (time it with jdiff.main's step log)")
  networks, tx, mesh, rules = step_parts(config)
  state, shardings = state_lib.create_state(networks, tx, mesh, rules, config.seed, config.optim.trainable)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  t0 = time.perf_counter()
  compiled, batch_sharding = trainer.compile_step(networks, tx, config, mesh, rules, shardings, abstract)
  compile_s = time.perf_counter() - t0

  rng = np.random.default_rng(0)
  host = {}
  for key, (shape, dtype) in trainer.batch_spec(config, networks).items():
    if np.dtype(dtype) == np.uint8:
      host[key] = rng.integers(0, 256, shape, dtype=np.uint8)
    elif np.issubdtype(dtype, np.integer):
      host[key] = rng.integers(2, 200, shape).astype(dtype)
    else:
      host[key] = rng.standard_normal(shape).astype(dtype)
  batch = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      batch_sharding.spec[0], *([None] * (v.ndim - 1))))) for k, v in host.items()}
  run_rng = jax.device_put(np.zeros(2, np.uint32), shard_lib.replicated(mesh))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for _ in range(warmup):
      state, _ = compiled(state, batch, run_rng, None)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, batch, run_rng, None)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
    if profile_dir:  # after the timed steps, so tracing costs them nothing
      os.makedirs(profile_dir, exist_ok=True)
      with open(os.path.join(profile_dir, "train_step.hlo.txt"), "w") as f:
        f.write(compiled.as_text())  # maps the trace's HLO op names to source lines
      with jax.profiler.trace(profile_dir):
        for _ in range(profile_steps):
          state, metrics = compiled(state, batch, run_rng, None)
        jax.block_until_ready(metrics)
  step_time = float(np.median(times))

  b = config.train.batch_size
  image_tokens = networks.seq_len()
  flops = flops_lib.model_flops(networks, b, image_tokens, optim.trains_text(networks, config.optim.trainable))
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  n_dev = mesh.devices.size  # cost analysis and peak rate are per device of the step's mesh
  xla_flops = float(cost["flops"]) * n_dev if cost and "flops" in cost else None
  device = mesh.devices.flat[0]
  peak = peak_flops(device.device_kind, config.model.dtype)
  return dict(
      step_time_s=step_time, images_per_s=b / step_time, tokens_per_s=b * image_tokens / step_time,
      flops_per_step=flops["train_step"], xla_flops_per_step=xla_flops,
      mfu=flops["train_step"] / step_time / (peak * n_dev) if peak else None,
      compile_s=compile_s, peak_memory_bytes=peak_memory_bytes(compiled), device=device.device_kind, num_devices=n_dev,
      batch=b, image_tokens=image_tokens, text_tokens=flops["text_tokens"],
      model=f"{config.model.name} depth={networks.denoiser.depth} width={networks.denoiser.width}",
      dtype=config.model.dtype, scan=bool(config.model.scan), remat=config.model.remat,
      step_time_min_s=float(np.min(times)), steps=steps,
  )
