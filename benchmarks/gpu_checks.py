"""Device checks for a lent GPU: bf16 vs fp32 on one batch, and `jdiff.bench` rows (step time,
FLOPs, MFU, compile time, memory) for several sizes in one process.

  python benchmarks/gpu_checks.py [--check] [--rows="d12:128 d24:64:none"] [--tag=NAME]
                                  [--profile_row=d24:128 --profile_dir=DIR] [--gemm_row=d24:128]
                                  [--geometry=latent256|default] [--variant=test] [--out=FILE]

--geometry latent256 (default): SD3's 256x256 latent shape, 32x32x16 inputs with patch 2
  (256 image tokens); 'default' keeps configs/mmdit_256.py's 256 px pixel-space patch 8.
--rows: MMDiT variant:batch[:remat[:attention]][:section.field=value ...] per row (e.g.
  d24:128:dots_no_batch:cudnn:optim.mu_dtype=bfloat16); each prints one JSON line (also
  appended to --out) tagged with --tag and the process's XLA_FLAGS. A failing row (e.g. out
  of memory) prints its error and the others still run.
--gemm_row: after the rows, that row's matmuls each timed alone (benchmarks/gemm_ceiling.py):
  the step time and MFU of its GEMMs at their standalone speed, the ceiling of this geometry.
--variant test: the tiny CPU config, for a dry run of the script on any machine.
"""

import argparse
import functools
import gc
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.train import speed
from jdiff import config as config_lib
from jdiff import networks as networks_lib
from jdiff.data import pipeline as pipeline_lib
from jdiff.data import pixels
from jdiff.train import objectives

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEOMETRY = {
    "latent256": {"model.patch_size": 2, "model.in_channels": 16, "data.resolution": 32,
                  "model.pos_embed_max_size": 32},
    "default": {},
}


def config(variant=None, geometry="latent256", overrides=None):
  """configs/mmdit_256.py[:variant] on all devices, in `geometry`, with {'section.field': value}
  overrides."""
  c = config_lib.load(os.path.join(ROOT, "configs", "mmdit_256.py" + (f":{variant}" if variant else "")))
  c.mesh.data = -1
  c.update_from_flattened_dict({**GEOMETRY[geometry], **(overrides or {})})
  return c


def bf16_vs_fp32(variant, geometry, tolerance=1e-2):
  """The same weights and batch in fp32 and in bf16 compute: loss and network output."""
  c32, c16 = (config(variant, geometry, {"model.dtype": dtype, "text.dtype": dtype, "train.batch_size": 16})
              for dtype in ("float32", "bfloat16"))
  networks = networks_lib.build_networks(c32)
  params = nn.unbox(networks.init_params(jax.random.key(0)))
  # Random non-zero weights so the comparison covers every layer (adaLN-Zero starts at 0).
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.02 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  rng = jax.random.key(2)
  res, ch = c32.data.resolution, c32.model.in_channels
  batch = dict(image=jax.random.randint(rng, (16, res, res, ch), 0, 256).astype(jnp.uint8),
               tokens=jax.random.randint(rng, (16, c32.text.max_len), 2, 200))
  if ch == 3:  # pixel space: a real batch of the embedded data
    p = pipeline_lib.make_pipeline(c32.data, global_batch=16, max_len=c32.text.max_len, seed=0)
    batch = {k: jnp.asarray(v) for k, v in next(p).items()}
  keys = jax.random.split(jax.random.key(3), 16)
  x = pixels.from_uint8(batch["image"])
  t = jnp.linspace(0.05, 0.95, x.shape[0])
  losses, outs = [], []
  for c in (c32, c16):
    n = networks_lib.build_networks(c)
    loss = jax.jit(functools.partial(objectives.loss_fn, networks=n, config=c))
    losses.append(float(loss(params, batch, keys)[0]))
    f = jax.jit(lambda p, x, t, tok, n=n: n.predict(p["denoiser"], x, t, n.encode(p["text"], tok)))
    outs.append(f(params, x, t, batch["tokens"]).astype(jnp.float32))
  rel_loss = abs(losses[1] - losses[0]) / losses[0]
  rel_out = float(jnp.linalg.norm(outs[1] - outs[0]) / jnp.linalg.norm(outs[0]))
  ok = rel_loss < tolerance and bool(jnp.all(jnp.isfinite(outs[1])))
  print(f"bf16 check ({geometry}): loss fp32 {losses[0]:.5f} bf16 {losses[1]:.5f} rel diff {rel_loss:.2e} "
        f"(tolerance {tolerance:g}): {'PASS' if ok else 'FAIL'}; network output rel L2 diff {rel_out:.2e}")
  return ok


def row_overrides(spec: str) -> dict:
  """'d24:128[:remat[:attention]][:section.field=value ...]' -> {'section.field': value}
  config overrides ('d24:128:dots_no_batch:cudnn:optim.mu_dtype=bfloat16'); values are
  Python literals or plain strings."""
  parts = spec.split(":")
  positional = [p for p in parts if "=" not in p]
  if len(positional) < 2 or len(positional) > 4:
    raise ValueError(f"row {spec!r}: expected variant:batch[:remat[:attention]][:section.field=value ...]")
  overrides = {"model.variant": positional[0], "train.batch_size": int(positional[1])}
  for key, value in zip(("model.remat", "model.attention"), positional[2:]):
    overrides[key] = value
  overrides.update(config_lib.parse_overrides(p for p in parts if "=" in p))
  return overrides


def bench_row(spec, variant, geometry, steps, warmup, tag, profile_dir=""):
  """One `jdiff.bench` measurement for a row spec (see `row_overrides`)."""
  c = config(variant, geometry, row_overrides(spec))
  row = dict(spec=spec, tag=tag, xla_flags=os.environ.get("XLA_FLAGS", ""), geometry=geometry)
  try:
    row.update(speed.run(c, steps=steps, warmup=warmup, profile_dir=profile_dir))
    row["attention"] = c.model.attention
  except Exception as e:  # one failing row (out of memory, say) must not hide the others
    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
  gc.collect()
  return row


def table(rows) -> str:
  w = max([18] + [len(r["spec"]) for r in rows])
  head = (f"| {'spec':<{w}} | {'tag':<8} | {'step ms':>8} | {'img/s':>7} | {'TFLOP/step':>10} | "
          f"{'XLA TFLOP':>9} | {'TFLOP/s':>7} | {'MFU':>6} | {'compile s':>9} | {'peak GiB':>8} |")
  lines = [head, "|" + "|".join("-" * (len(c) - 0) for c in head.split("|")[1:-1]) + "|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['spec']:<{w}} | {r['tag']:<8} | {r['error'][:90]}")
      continue
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
    xla = f"{r['xla_flops_per_step'] / 1e12:.2f}" if r["xla_flops_per_step"] else "n/a"
    mem = f"{r['peak_memory_bytes'] / 2**30:.2f}" if r["peak_memory_bytes"] else "n/a"
    lines.append(f"| {r['spec']:<{w}} | {r['tag']:<8} | {1e3 * r['step_time_s']:>8.1f} | {r['images_per_s']:>7.1f} | "
                 f"{r['flops_per_step'] / 1e12:>10.3f} | {xla:>9} | {r['flops_per_step'] / r['step_time_s'] / 1e12:>7.1f} | "
                 f"{mfu:>6} | {r['compile_s']:>9.1f} | {mem:>8} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--check", action="store_true", help="bf16 vs fp32 loss and output first")
  parser.add_argument("--rows", default="", help="space-separated variant:batch[:remat[:attention]][:section.field=value ...]")
  parser.add_argument("--tag", default="default", help="label of this process's settings (XLA flags)")
  parser.add_argument("--geometry", default="latent256", choices=tuple(GEOMETRY))
  parser.add_argument("--variant", default=None, help="config variant ('test' for a CPU dry run)")
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--profile_row", default="", help="trace this row's spec after timing it")
  parser.add_argument("--profile_dir", default="/tmp/jdiff_profile")
  parser.add_argument("--gemm_row", default="", help="time this row's matmuls alone (benchmarks/gemm_ceiling.py)")
  parser.add_argument("--out", default="", help="append each row's JSON line to this file")
  parser.add_argument("--table", default="", help="only print the table of a JSON-lines file")
  args = parser.parse_args(argv)
  if args.table:
    print(table([json.loads(l) for l in open(args.table) if l.strip().startswith("{")]))
    return 0
  print(f"jax {jax.__version__} {jax.devices()} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  ok = bf16_vs_fp32(args.variant, args.geometry) if args.check else True
  rows = []
  for spec in args.rows.split():
    profile_dir = args.profile_dir if spec == args.profile_row else ""
    row = bench_row(spec, args.variant, args.geometry, args.steps, args.warmup, args.tag, profile_dir)
    rows.append(row)
    print(json.dumps(row), flush=True)
    if profile_dir and "error" not in row:
      sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
      import profile_summary  # pylint: disable=g-import-not-at-top
      print(f"profile of {spec} ({args.tag}):\n" + profile_summary.summarize(profile_dir, top=30), flush=True)
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
  if rows:
    print(table(rows))
  if args.gemm_row:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gemm_ceiling  # pylint: disable=g-import-not-at-top
    print(f"matmuls of {args.gemm_row} ({args.tag}), each timed alone:", flush=True)
    gemm_ceiling.measure(config(args.variant, args.geometry, row_overrides(args.gemm_row)))
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
