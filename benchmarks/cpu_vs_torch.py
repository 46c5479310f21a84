"""One AdamW training step of diffusers' SD3Transformer2DModel (PyTorch) against jdiff's MMDiT
(JAX) with the same dimensions, on CPU, timed alternately in one process.

  python benchmarks/cpu_vs_torch.py [--layers=4 --heads=4 --batch=8 --rounds=5 --steps=3]

Both sides run the same step: v = model(x_t, t, context, pooled); loss = mean((v - target)^2);
backward; AdamW (lr 1e-4, weight decay 0). Dimensions (the issue's suggestion): 4 layers,
4 heads of 64, latents 32x32x16, patch 2 (256 image tokens), text length 32 of width
4096, pooled 2048, batch 8, float32. Prints per-round medians and the jdiff/PyTorch ratio.
"""

import argparse
import json
import os
import statistics
import time

import numpy as np


def torch_step_fn(args):
  import torch
  from diffusers import SD3Transformer2DModel

  torch.manual_seed(0)
  model = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=args.layers,
                                attention_head_dim=64, num_attention_heads=args.heads, joint_attention_dim=4096,
                                caption_projection_dim=64 * args.heads, pooled_projection_dim=2048,
                                pos_embed_max_size=32, qk_norm="rms_norm").train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
  g = torch.Generator().manual_seed(0)
  b = args.batch
  x = torch.randn(b, 16, 32, 32, generator=g)
  target = torch.randn(b, 16, 32, 32, generator=g)
  ctx = torch.randn(b, args.text_len, 4096, generator=g)
  pooled = torch.randn(b, 2048, generator=g)
  t = torch.rand(b, generator=g) * 1000

  def step():
    opt.zero_grad(set_to_none=True)
    out = model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                return_dict=False)[0]
    loss = torch.mean((out - target) ** 2)
    loss.backward()
    opt.step()
    return float(loss)

  return step


def jax_step_fn(args):
  import jax
  import jax.numpy as jnp
  import optax

  from jdiff.models import mmdit

  model = mmdit.MMDiT(depth=args.layers, width=64 * args.heads, num_heads=args.heads, patch_size=2, in_channels=16,
                      context_dim=4096, pooled_dim=2048, pos_embed_max_size=32, qk_norm=True, attention=args.attention,
                      scan=args.scan)
  rng = np.random.default_rng(0)
  b = args.batch
  x = jnp.asarray(rng.standard_normal((b, 32, 32, 16), np.float32))
  target = jnp.asarray(rng.standard_normal((b, 32, 32, 16), np.float32))
  ctx = jnp.asarray(rng.standard_normal((b, args.text_len, 4096), np.float32))
  pooled = jnp.asarray(rng.standard_normal((b, 2048), np.float32))
  t = jnp.asarray(rng.uniform(size=b).astype(np.float32))
  params = model.init(jax.random.key(0), x, t, context=ctx, pooled=pooled)["params"]
  params = jax.tree.map(lambda p: p + 0.01, params)  # no exact zeros (adaLN-Zero init)
  tx = optax.adamw(1e-4, weight_decay=0.0)
  opt_state = tx.init(params)

  def loss_fn(p):
    out = model.apply({"params": p}, x, t, context=ctx, pooled=pooled)
    return jnp.mean((out - target) ** 2)

  @jax.jit
  def update(p, s):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  update = jax.jit(update, donate_argnums=(0, 1))
  state = [params, opt_state]

  def step():
    state[0], state[1], loss = update(state[0], state[1])
    return float(loss)

  return step


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--text_len", type=int, default=32)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--attention", default="xla")
  ap.add_argument("--scan", action="store_true")
  ap.add_argument("--threads", type=int, default=os.cpu_count())
  args = ap.parse_args()
  import torch

  torch.set_num_threads(args.threads)
  steps = {"torch": torch_step_fn(args), "jdiff": jax_step_fn(args)}
  for fn in steps.values():  # compile / warm up
    fn(), fn()
  times = {k: [] for k in steps}
  for _ in range(args.rounds):
    for name, fn in steps.items():
      t0 = time.perf_counter()
      for _ in range(args.steps):
        fn()
      times[name].append((time.perf_counter() - t0) / args.steps)
  med = {k: statistics.median(v) for k, v in times.items()}
  print(json.dumps({"torch_step_s": med["torch"], "jdiff_step_s": med["jdiff"],
                    "ratio_jdiff_over_torch": med["jdiff"] / med["torch"],
                    "rounds": {k: [round(x, 4) for x in v] for k, v in times.items()},
                    "threads": args.threads, "torch": torch.__version__, **{k: v for k, v in vars(args).items()
                                                                          if k not in ("rounds", "steps")}}))


if __name__ == "__main__":
  main()
