"""The matmuls of a config's train step, each timed on its own: how fast the step could be
if it ran nothing but its GEMMs at the speed the library reaches for their shapes.

  python benchmarks/gemm_ceiling.py --config=configs/mmdit_256.py[:variant] [section.field=value ...]
                                    [--reps=20] [--top=25]

Traces the real train step (jax.make_jaxpr, no compilation of the step), collects every
dot_general and convolution with how often it runs (scan bodies x trip count; forward,
backward and remat recomputation alike), and times each distinct one alone (the same
primitive and parameters, jitted on random operands of its shapes and dtypes; median of
--reps trials of 10 back-to-back runs).
Prints a table by total time and one JSON summary line:
  gemm_flops          2 x the multiply-adds of every weight matmul (dots without batch
                      dimensions, and convolutions), recomputation included
  gemm_time_s         their summed standalone times
  gemm_flops_per_s    gemm_flops / gemm_time_s
  train_flops         jdiff.train.flops' analytic count (the MFU convention)
  mfu_ceiling         train_flops / gemm_time_s / peak: the MFU of a step that ran only
                      these GEMMs at their standalone speed (nothing else: no attention
                      kernel, norms, optimizer) - an upper bound for this geometry
Dots with batch dimensions (attention on backends without a fused kernel) are listed
apart; fused attention kernels (cuDNN, splash) are not dots and are not counted.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import time
from typing import Any, NamedTuple

import numpy as np

MATMUL_PRIMITIVES = ("dot_general", "conv_general_dilated")
SHORT_DTYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


class Op(NamedTuple):
  """One distinct matmul-like equation: primitive, operand shapes/dtypes and parameters."""

  primitive: Any
  avals: tuple[tuple[tuple[int, ...], str], ...]
  params: tuple[tuple[str, Any], ...]

  @property
  def name(self) -> str:
    return self.primitive.name

  @property
  def batched(self) -> bool:
    """A dot with batch dimensions (attention scores and values, not a weight GEMM)."""
    return self.name == "dot_general" and bool(dict(self.params)["dimension_numbers"][1][0])

  def fn(self):
    params = dict(self.params)
    return lambda *xs: self.primitive.bind(*xs, **params)

  @property
  def flops(self) -> float:
    return _flops(self)


@functools.lru_cache(maxsize=None)
def _flops(op: Op) -> float:
  """2 x multiply-adds: by formula for dots; for convolutions, XLA's count of the op."""
  import jax  # pylint: disable=g-import-not-at-top

  if op.name == "dot_general":
    (lhs, _), (rhs, _) = op.avals
    (lc, _), (lb, _) = dict(op.params)["dimension_numbers"]
    contract = math.prod(lhs[i] for i in lc)
    batch = math.prod(lhs[i] for i in lb)
    return 2.0 * batch * (math.prod(lhs) // (contract * batch)) * (math.prod(rhs) // (contract * batch)) * contract
  args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in op.avals]
  cost = jax.jit(op.fn()).lower(*args).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0  # 0: the backend gives no count


def _sub_jaxprs(value):
  from jax.extend import core as jex_core  # pylint: disable=g-import-not-at-top

  for v in value if isinstance(value, (list, tuple)) else [value]:
    if isinstance(v, jex_core.ClosedJaxpr):
      yield v.jaxpr
    elif isinstance(v, jex_core.Jaxpr):
      yield v


def collect_matmuls(jaxpr, primitives=MATMUL_PRIMITIVES, multiplier: int = 1,
                    counts: collections.Counter | None = None) -> collections.Counter:
  """Op -> how many times the jaxpr runs it, for the named primitives (dots and
  convolutions by default; a scan's body counts `length` times; a while loop's body once,
  its trip count being unknown; each cond branch once)."""
  counts = collections.Counter() if counts is None else counts
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in primitives:
      avals = tuple((tuple(int(d) for d in v.aval.shape), str(v.aval.dtype)) for v in eqn.invars)
      counts[Op(eqn.primitive, avals, tuple(sorted(eqn.params.items())))] += multiplier
      continue
    inner = multiplier * (int(eqn.params["length"]) if eqn.primitive.name == "scan" else 1)
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        collect_matmuls(sub, primitives, inner, counts)
  return counts


def step_jaxpr(config):
  """The jaxpr of the config's train step (flow objective), traced on abstract values."""
  import jax  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from jdiff.train import speed  # pylint: disable=g-import-not-at-top
  from jdiff.train import trainer  # pylint: disable=g-import-not-at-top
  from jdiff.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from jdiff.train import step as step_lib  # pylint: disable=g-import-not-at-top

  networks, tx, mesh, rules = speed.step_parts(config)
  abstract, _ = state_lib.state_shardings(networks, tx, mesh, rules)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in trainer.batch_spec(config, networks).items()}
  fn = functools.partial(step_lib.train_step, networks=networks, tx=tx, config=config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    jaxpr = jax.make_jaxpr(fn)(abstract, batch, jax.ShapeDtypeStruct((2,), jnp.uint32))
  return jaxpr.jaxpr, networks


def time_op(op: Op, reps: int = 20, inner: int = 10) -> float:
  """Seconds of one run of `op` alone (jitted, on random operands of its shapes and
  dtypes): the median over `reps` trials of `inner` back-to-back runs (dispatched
  asynchronously, waited for once, so the device time of a short kernel is not hidden
  behind the host's per-call overhead)."""
  import jax  # pylint: disable=g-import-not-at-top

  keys = jax.random.split(jax.random.key(0), len(op.avals))
  args = [jax.random.normal(k, shape).astype(dtype) for k, (shape, dtype) in zip(keys, op.avals)]
  f = jax.jit(op.fn())
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = f(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / inner)
  return float(np.median(times))


def measure(config, reps: int = 20, top: int = 25) -> dict[str, Any]:
  """Times every distinct matmul of the step; prints the table, returns the summary."""
  import jax  # pylint: disable=g-import-not-at-top

  from jdiff.train import speed  # pylint: disable=g-import-not-at-top
  from jdiff.train import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from jdiff.train import optim  # pylint: disable=g-import-not-at-top

  jaxpr, networks = step_jaxpr(config)
  rows = sorted(((op, n, time_op(op, reps)) for op, n in collect_matmuls(jaxpr).items()), key=lambda r: -r[1] * r[2])
  gemm = [r for r in rows if not r[0].batched]
  print(f"{'op':<6} {'operands':<44} {'count':>5} {'ms each':>8} {'TFLOP/s':>8} {'ms total':>9}")
  for op, n, t in rows[:top]:
    operands = " x ".join(f"{SHORT_DTYPES.get(dtype, dtype)}{list(shape)}" for shape, dtype in op.avals)
    kind = "bdot" if op.batched else ("dot" if op.name == "dot_general" else "conv")
    print(f"{kind:<6} {operands:<44} {n:>5} {1e3 * t:>8.3f} {op.flops / t / 1e12:>8.1f} {1e3 * n * t:>9.2f}")
  gemm_flops = sum(op.flops * n for op, n, _ in gemm)
  gemm_time = sum(n * t for _, n, t in gemm)
  train_flops = flops_lib.model_flops(networks, config.train.batch_size, networks.seq_len(),
                                      optim.trains_text(networks, config.optim.trainable))["train_step"]
  device = jax.devices()[0]
  peak = speed.peak_flops(device.device_kind, config.model.dtype)
  summary = dict(
      gemm_flops=gemm_flops, gemm_time_s=gemm_time, gemm_flops_per_s=gemm_flops / gemm_time, distinct_gemms=len(gemm),
      batched_dot_flops=sum(op.flops * n for op, n, _ in rows if op.batched),
      batched_dot_time_s=sum(n * t for op, n, t in rows if op.batched), train_flops=train_flops,
      mfu_ceiling=train_flops / gemm_time / peak if peak else None, device=device.device_kind)
  print(json.dumps(summary), flush=True)
  return summary


def main(argv=None):
  import argparse  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top

  from jdiff import cli  # pylint: disable=g-import-not-at-top
  from jdiff import config as config_lib  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="config file[:variant]")
  parser.add_argument("overrides", nargs="*", help="section.field=value (Python literals or plain strings)")
  parser.add_argument("--reps", type=int, default=20, help="timed runs of each distinct dot")
  parser.add_argument("--top", type=int, default=25, help="rows of the table (by total time)")
  args = parser.parse_args(argv)
  cli.set_log_levels(logging.WARNING)
  config = config_lib.load(args.config)
  config.update_from_flattened_dict(config_lib.parse_overrides(args.overrides))
  measure(config, args.reps, args.top)


if __name__ == "__main__":
  main()
