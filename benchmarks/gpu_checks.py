"""Device checks for the lent GPU: bf16 vs fp32 loss on one batch, and train-step
throughput of the default MMDiT config for a few (attention, remat, batch) settings.

  python benchmarks/gpu_checks.py [VARIANT] [--bf16_only]   # VARIANT of configs/mmdit_256.py ('test' on CPU)
"""

import functools
import importlib.util
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiff.data import pipeline as pipeline_lib
from jdiff.train import optim, trainer
from jdiff.train import sharding as shard_lib
from jdiff.train import state as state_lib
from jdiff.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
VARIANT = ARGS[0] if ARGS else None
BF16_ONLY = "--bf16_only" in sys.argv


def config(**overrides):
  spec = importlib.util.spec_from_file_location("c", os.path.join(ROOT, "configs", "mmdit_256.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(VARIANT)
  c.mesh.data = -1
  for key, value in overrides.items():
    section, field = key.split("__")
    c[section][field] = value
  return c


def loss_of(c, params_host, batch):
  networks = state_lib.build_networks(c)
  keys = jax.random.split(jax.random.key(0), batch["image"].shape[0])
  f = jax.jit(functools.partial(step_lib.loss_fn, networks=networks, config=c))
  return float(f(params_host, batch, keys)[0])


def bf16_vs_fp32():
  c32 = config(model__dtype="float32", text__dtype="float32", train__batch_size=16)
  c16 = config(model__dtype="bfloat16", text__dtype="bfloat16", train__batch_size=16)
  networks = state_lib.build_networks(c32)
  params = nn.unbox(networks.init_params(jax.random.key(0)))
  # Random non-zero weights so the comparison covers every layer.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.02 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  p = pipeline_lib.make_pipeline(c32.data, global_batch=16, max_len=c32.text.max_len, seed=0)
  batch = {k: jnp.asarray(v) for k, v in next(p).items()}
  l32 = loss_of(c32, params, batch)
  l16 = loss_of(c16, params, batch)
  # The network output itself, on the same noisy input: a sharper check than the loss.
  x = step_lib.images_to_model_space(batch["image"])
  t = jnp.linspace(0.05, 0.95, x.shape[0])
  outs = []
  for c in (c32, c16):
    n = state_lib.build_networks(c)
    f = jax.jit(lambda p, x, t, tok, n=n: n.predict(p["denoiser"], x, t, n.encode(p["text"], tok)))
    outs.append(f(params, x, t, batch["tokens"]))
  rel = float(jnp.linalg.norm(outs[1] - outs[0]) / jnp.linalg.norm(outs[0]))
  print(f"loss fp32 {l32:.5f}  bf16 {l16:.5f}  rel diff {abs(l16 - l32) / l32:.2e}; "
        f"output rel diff {rel:.2e} (|output| {float(jnp.abs(outs[0]).mean()):.3f})")


def throughput(batch_size, attention="default", remat="dots_no_batch", steps=10):
  c = config(train__batch_size=batch_size, model__attention=attention, model__remat=remat)
  networks = state_lib.build_networks(c)
  tx = optim.make_optimizer(c.optim, c.train.num_steps)
  mesh = shard_lib.make_mesh(c.mesh)
  rules = shard_lib.rules_tuple(c.sharding.logical_rules)
  state, shardings = state_lib.create_state(networks, tx, mesh, rules, 0)
  t0 = time.time()
  compiled, batch_sharding = trainer.compile_step(networks, tx, c, mesh, rules, shardings,
                                                  jax.eval_shape(lambda: state))
  compile_s = time.time() - t0
  res = c.data.resolution
  rng = np.random.default_rng(0)
  batch = pipeline_lib.to_global(dict(
      image=rng.integers(0, 255, (batch_size, res, res, 3), dtype=np.uint8),
      tokens=rng.integers(2, 200, (batch_size, c.text.max_len), dtype=np.int32)), batch_sharding)
  run_rng = jnp.copy(state.rng)
  for _ in range(3):
    state, m = compiled(state, batch, run_rng)
  jax.block_until_ready(m)
  t0 = time.time()
  for _ in range(steps):
    state, m = compiled(state, batch, run_rng)
  jax.block_until_ready(m)
  dt = (time.time() - t0) / steps
  mem = compiled.memory_analysis()
  temp = mem.temp_size_in_bytes / 2**30 if mem else float("nan")
  print(f"| {batch_size:5d} | {attention:8s} | {remat:14s} | {compile_s:6.1f} | {dt * 1000:8.1f} | "
        f"{batch_size / dt:8.1f} | {temp:6.2f} |")


if __name__ == "__main__":
  print(jax.devices())
  bf16_vs_fp32()
  if BF16_ONLY:
    sys.exit(0)
  print("| batch | attention | remat          | compile s | step ms | images/s | temp GiB |")
  for args in [(64, "default", "dots_no_batch"), (64, "cudnn", "dots_no_batch"), (128, "cudnn", "dots_no_batch")]:
    try:
      throughput(*args)
    except Exception as e:  # one failing setting must not hide the others
      print(f"| {args} failed: {type(e).__name__}: {str(e)[:200]}")
