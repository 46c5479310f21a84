"""Where would the train step's time go on a GPU we do not have? A roofline estimate per
kernel of the step XLA compiles for an H100, without a GPU.

  python benchmarks/hlo_cost.py [--rows="d24:128 d24:128:model.scan=False"] [--top=25]
                                [--target=h100|h200] [--device_memory_gib=GIB] [--hlo_out=FILE] [--json]
  python benchmarks/hlo_cost.py --rows= --config=configs/mmdit_256.py   # a config as it is
  python benchmarks/hlo_cost.py --hlo=FILE.hlo     # any compiled HLO text (GPU or CPU)
  python benchmarks/hlo_cost.py --hlo=FILE.hlo --top=0 --kernels='blocks_5/'   # one block, kernel by kernel

Compiling: XLA compiles the real train step for the target GPU on this machine (deviceless
ahead-of-time compilation: `jax.experimental.topologies.get_topology_desc(platform='cuda',
target_config=...)`), so the HLO is what XLA:GPU would run: its fusions, cuBLAS/cuDNN calls,
copies and loops. This needs the CUDA plugin of the installed jax, which runs without a GPU:
`pip install "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"` in a venv of
its own (the plugin makes jax look for a GPU at start-up; keep it out of the test venv).
Rows are gpu_checks.py's (`d24:128[:remat[:attention]][:section.field=value ...]`, in the
latent 256x256 geometry); XLA_FLAGS applies as on a device (e.g.
`--xla_gpu_enable_triton_gemm=false` for the cuBLAS-only configuration measured on H100s).
While the model traces, `jax.default_backend()` reads 'gpu' so that it takes its GPU code
paths (cuDNN attention, one-hot embeddings).

Estimate: every kernel XLA launches (fusions, library calls, copies; while bodies times their
trip count; the larger branch of a conditional) costs the larger of its bytes at memory
bandwidth and its FLOPs at a matmul rate, plus a launch overhead. Bytes are the operands and
results a kernel touches: a fusion's slice of a stacked (scanned) buffer counts as the slice
(also when the fusion slices a bitcast of it),
and an in-place dynamic-update-slice as the update. Cache reuse and imperfect overlap are not
modelled (nor while-loop conditions, nor cuDNN convolutions' FLOPs), so this is an estimate to
compare versions of the code with. Calibration: the GEMM and attention rates come from the
2026-11-27 H100 profile (d24, batch 128, scanned); for the code that profile measured, the
memory-bound kernels (at 90% of peak bandwidth, not fitted) come out at 183.5 ms against
188.7 ms measured, and the step at 477.0 ms of kernel time against 480.6 (BENCHMARKS.md).
"""

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# H100 SXM (80 GB HBM3) as XLA's GpuTargetConfig text proto: the card's published facts (132
# SMs, 3.35 TB/s, 50 MiB L2, 228 KiB shared memory per SM, compute capability 9.0). The memory
# size is a parameter: XLA rematerialises (recomputes) activations when the step would not fit
# in about 78% of it, so it must stand for what the device run's allocator has
# (XLA_PYTHON_CLIENT_MEM_FRACTION=0.94 in gpu_mfu.sh: ~74.5 GiB).
_GPU_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {memory_bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {device_memory_bytes}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 }
device_description_str: "{name}"
"""
TARGETS = {
    "h100": _GPU_TARGET.replace("{memory_bandwidth}", "3352320000000").replace("{name}", "NVIDIA H100 80GB HBM3"),
    # H200: the H100's chip (SMs, clocks, L2) with 141 GB of HBM3e at 4.8 TB/s.
    "h200": _GPU_TARGET.replace("{memory_bandwidth}", "4800000000000").replace("{name}", "NVIDIA H200"),
}

# Rates of the estimate (H100, bf16), from the 2026-11-27 profile of d24 at batch 128
# (BENCHMARKS.md): memory-bound kernels at 90% of the 3.35 TB/s peak, the step's cuBLAS GEMMs
# at their measured average (142.4 TFLOP in 246.1 ms) and cuDNN attention at its measured
# rate (6.23 TFLOP as counted by _attention_flops in 45.1 ms; 272-token sequences).
@dataclasses.dataclass(frozen=True)
class Rates:
  bandwidth: float = 3.0e12  # bytes/s
  gemm: float = 580e12  # FLOP/s
  attention: float = 138e12  # FLOP/s
  launch: float = 2e-6  # s per kernel


# The H200's memory-bound kernels at 90% of its 4.8 TB/s; its GEMMs and attention as the
# H100's (the same chip and clocks: an assumption until a profile on an H200 says otherwise).
RATES = {"h100": Rates(), "h200": Rates(bandwidth=4.32e12)}
# The memory size to compile for, such that XLA's limit (~78% of it) is what gpu_mfu.sh's
# allocator has on the card (94% of it): H100 ~74.5 GiB, H200 ~132 GiB.
DEVICE_MEMORY_GIB = {"h100": 96.0, "h200": 170.0}


DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
    "s4": 0.5, "u4": 0.5, "token": 0,
}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
# Ops that launch nothing (views, tuples, constants, parameters).
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
        "opt-barrier", "partition-id", "replica-id", "iota"}


def shape_dims(type_str: str) -> list[tuple[str, tuple[int, ...]]]:
  """Every array in an HLO type ('f32[2,3]{1,0}' or a tuple of them): [(dtype, dims)]."""
  return [(m.group(1), tuple(int(d) for d in m.group(2).split(",") if d))
          for m in _ARRAY.finditer(type_str)]


def type_bytes(type_str: str) -> float:
  return sum(DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in shape_dims(type_str))


def _matching(text: str, start: int) -> int:
  """Index just past the bracket group opening at text[start]."""
  pairs = {"(": ")", "{": "}", "[": "]"}
  depth, close = 0, pairs[text[start]]
  for i in range(start, len(text)):
    if text[i] == text[start]:
      depth += 1
    elif text[i] == close:
      depth -= 1
      if depth == 0:
        return i + 1
  raise ValueError(f"unbalanced {text[start]!r} in {text[:120]!r}")


@dataclasses.dataclass
class Instr:
  name: str
  type: str
  opcode: str
  operands: list[str]
  attrs: str
  root: bool = False
  number: int = -1  # a parameter's index

  def attr(self, key: str) -> str | None:
    m = re.search(rf"\b{key}=(%[\w.\-]+|\{{[^}}]*\}}|\"[^\"]*\"|[\w.\-]+)", self.attrs)
    return m.group(1) if m else None

  def called(self, key: str) -> list[str]:
    value = self.attr(key)
    return re.findall(r"%([\w.\-]+)", value) if value else []


def parse_instr(line: str) -> Instr | None:
  m = _INSTR.match(line)
  if not m:
    return None
  root, name, rest = m.groups()
  if rest.startswith("("):
    end = _matching(rest, 0)
  else:
    end = rest.index(" ")
  type_str, rest = rest[:end], rest[end:].lstrip()
  op_end = rest.index("(")
  opcode = rest[:op_end]
  args_end = _matching(rest, op_end)
  args = rest[op_end:args_end]
  operands = re.findall(r"%([\w.\-]+)", args)
  number = int(args[1:-1]) if opcode == "parameter" else -1
  return Instr(name, type_str, opcode, operands, rest[args_end:], bool(root), number)


@dataclasses.dataclass
class Computation:
  name: str
  instrs: list[Instr]
  by_name: dict[str, Instr]

  @property
  def root(self) -> Instr:
    return next(i for i in self.instrs if i.root)


def parse_module(text: str) -> tuple[dict[str, Computation], str]:
  """HLO module text -> ({name: Computation}, entry name)."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m:
        current = Computation(m.group(2), [], {})
        if m.group(1):
          entry = current.name
      continue
    if line.strip() == "}":
      comps[current.name] = current
      current = None
      continue
    instr = parse_instr(line)
    if instr is not None:
      current.instrs.append(instr)
      current.by_name[instr.name] = instr
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return comps, entry


@dataclasses.dataclass
class Kernel:
  name: str
  kind: str  # gemm, attention, conv, fusion, copy, other
  bytes: float
  flops: float
  count: int
  op_name: str
  out_type: str = ""  # what it writes (a fusion: its fused root's type)
  ops: str = ""  # a fusion's instructions by opcode, most frequent first ('multiply:4 reduce:1')

  def seconds(self, rates: Rates) -> float:
    rate = {"gemm": rates.gemm, "conv": rates.gemm, "attention": rates.attention}.get(self.kind)
    compute = self.flops / rate if rate else 0.0
    return self.count * (max(self.bytes / rates.bandwidth, compute) + rates.launch)


def _gemm_flops(instr: Instr, comp: Computation) -> float:
  """2 * M * N * K * batch of a cuBLAS call, from its result and lhs shapes and the
  contracting dimensions in its backend config."""
  out = shape_dims(instr.type)[0][1]
  lhs = shape_dims(comp.by_name[instr.operands[0]].type)[0][1]
  m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', instr.attrs)
  contracting = [int(d.strip('"')) for d in m.group(1).split(",") if d] if m else [len(lhs) - 1]
  return 2.0 * math.prod(out) * math.prod(lhs[d] for d in contracting)


def _attention_flops(instr: Instr, comp: Computation) -> float:
  """cuDNN fused attention: 4*B*N*T*S*H forward (QK^T and PV; [B, N, T, S] is the backend
  config's intermediate shape, H the head size of q), the backward 2.5x that (recomputed
  logits, dV, dP, dQ, dK)."""
  m = re.search(r'"intermediate_tensor_shape":\{"element_type":"\w+","dimensions":\[([^\]]*)\]',
                instr.attrs.replace(" ", ""))
  h = shape_dims(comp.by_name[instr.operands[0]].type)[0][1][-1]
  fwd = 4.0 * math.prod(int(d.strip('"')) for d in m.group(1).split(",")) * h if m else 0.0
  return fwd * 2.5 if "Backward" in (instr.attr("custom_call_target") or "") else fwd


def _output_bytes(comp: Computation) -> float:
  """Bytes a fusion writes: an in-place dynamic-update-slice root writes its update only."""
  root = comp.root
  parts = [comp.by_name[o] for o in root.operands] if root.opcode == "tuple" else [root]
  total = 0.0
  for part in parts:
    if part.opcode == "dynamic-update-slice":
      total += type_bytes(comp.by_name[part.operands[1]].type)
    else:
      total += type_bytes(part.type)
  return total


def kernels(text: str) -> list[Kernel]:
  """Every kernel the compiled module launches per step, with bytes, FLOPs and count."""
  comps, entry = parse_module(text)
  out: list[Kernel] = []

  def op_name(i: Instr) -> str:
    m = re.search(r'op_name="([^"]*)"', i.attrs)
    return m.group(1) if m else ""

  def walk(comp_name: str, count: int):
    comp = comps[comp_name]
    for i in comp.instrs:
      if i.opcode in FREE:
        continue
      if i.opcode == "while":
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', i.attrs)
        trips = int(m.group(1)) if m else 1
        walk(i.called("body")[0], count * trips)
        continue
      if i.opcode == "conditional":
        branches = i.called("branch_computations") or (i.called("true_computation") + i.called("false_computation"))
        costs = []
        for b in branches:
          before = len(out)
          walk(b, count)
          costs.append((sum(k.bytes * k.count for k in out[before:]), out[before:]))
          del out[before:]
        out.extend(max(costs, key=lambda c: c[0])[1])
        continue
      if i.opcode in ("call", "async-start"):
        for c in i.called("to_apply") + i.called("calls"):
          walk(c, count)
        continue
      in_bytes = [type_bytes(comp.by_name[o].type) if o in comp.by_name else 0.0 for o in i.operands]
      flops, kind, out_type, ops = 0.0, "other", i.type, ""
      out_bytes = type_bytes(i.type)
      if i.opcode == "fusion":
        fused = comps[i.called("calls")[0]]
        out_type = fused.root.type
        ops = " ".join(f"{o}:{n}" for o, n in collections.Counter(
            x.opcode for x in fused.instrs if x.opcode not in FREE).most_common())
        in_bytes = [_fused_param_bytes(fused, n, b) for n, b in enumerate(in_bytes)]
        out_bytes = _output_bytes(fused)
        kind = "fusion"
        for inner in fused.instrs:
          if inner.opcode == "custom-call":
            k, f = _library_call(inner, fused)
            if k:
              kind, flops = k, flops + f
          elif inner.opcode in ("dot", "convolution"):
            kind = "gemm" if inner.opcode == "dot" else "conv"
            flops += _dot_flops(inner, fused)
      elif i.opcode == "custom-call":
        kind, flops = _library_call(i, comp)
        kind = kind or "other"
        if kind == "gemm":  # the workspace in a cuBLAS result tuple is scratch, not traffic
          out_bytes = type_bytes(i.type.split(", ")[0] if i.type.startswith("(") else i.type)
      elif i.opcode in ("copy", "copy-start", "transpose"):
        kind = "copy"
      elif i.opcode == "dot":
        kind, flops = "gemm", _dot_flops(i, comp)
      out.append(Kernel(i.name, kind, sum(in_bytes) + out_bytes, flops, count, op_name(i), out_type, ops))

  walk(entry, 1)
  return out


def _fused_param_bytes(comp: Computation, index: int, full: float) -> float:
  params = [i for i in comp.instrs if i.opcode == "parameter"]
  param = next((p for p in params if p.number == index), None)
  if param is None:
    return full
  readers = _readers(comp, param.name)
  if readers and all(u.opcode in ("dynamic-slice", "slice") and u.operands[0] == via for u, via in readers):
    return sum(type_bytes(u.type) for u, _ in readers)
  if readers and all(u.opcode == "dynamic-update-slice" and u.operands[0] == via for u, via in readers):
    return 0.0
  return full


def _readers(comp: Computation, name: str) -> list[tuple[Instr, str]]:
  """(instruction, the operand name it reads `name` through) for every reader of `name`,
  looking through bitcasts (a bitcast reinterprets the buffer and moves no bytes)."""
  out = []
  for i in comp.instrs:
    if name in i.operands:
      through = _readers(comp, i.name) if i.opcode == "bitcast" else []
      out.extend(through or [(i, name)])  # a bitcast nobody reads is a result: the whole buffer
  return out


def _library_call(instr: Instr, comp: Computation) -> tuple[str | None, float]:
  target = instr.attr("custom_call_target") or ""
  if "matmul" in target or "gemm" in target:
    return "gemm", _gemm_flops(instr, comp)
  if "fmha" in target:
    return "attention", _attention_flops(instr, comp)
  if "conv" in target:
    return "conv", 0.0
  return None, 0.0


def _dot_flops(instr: Instr, comp: Computation) -> float:
  out = shape_dims(instr.type)[0][1]
  lhs = shape_dims(comp.by_name[instr.operands[0]].type)[0][1]
  m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.attrs)
  contracting = [int(d) for d in m.group(1).split(",") if d] if m else []
  return 2.0 * math.prod(out) * math.prod(lhs[d] for d in contracting)


def summarize(ks: list[Kernel], rates: Rates, top: int = 25) -> dict:
  """Estimated seconds per kind and the `top` kernels grouped by source op."""
  by_kind = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0])  # seconds, bytes, flops, launches
  by_op = collections.defaultdict(lambda: [0.0, 0.0, 0])
  for k in ks:
    s = k.seconds(rates)
    row = by_kind[k.kind]
    row[0] += s; row[1] += k.bytes * k.count; row[2] += k.flops * k.count; row[3] += k.count
    key = (k.kind, _short(k.op_name))
    by_op[key][0] += s; by_op[key][1] += k.bytes * k.count; by_op[key][2] += k.count
  total = sum(r[0] for r in by_kind.values())
  return dict(
      total_s=total,
      kinds={kind: dict(seconds=r[0], bytes=r[1], flops=r[2], launches=r[3]) for kind, r in
             sorted(by_kind.items(), key=lambda kv: -kv[1][0])},
      top=[dict(kind=kind, op=op, seconds=r[0], bytes=r[1], launches=r[2]) for (kind, op), r in
           sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]],
  )


def listing(ks: list[Kernel], pattern: str, rates: Rates) -> list[str]:
  """One line per kernel whose op_name matches the regex `pattern`, in program order: 'B' for
  the backward (transpose(...) in its op_name) or 'F', kind, ms, MB moved, short op name, what
  it writes and, for a fusion, its instructions by opcode. For reading one block's kernels
  (e.g. 'blocks_5/'): which pass over which tensor, and what XLA fused into it."""
  lines = []
  for k in ks:
    if re.search(pattern, k.op_name):
      direction = "B" if "transpose(" in k.op_name else "F"
      lines.append(f"{direction} {k.kind:9s} {k.seconds(rates) * 1e3:7.3f} ms {k.bytes * k.count / 1e6:9.1f} MB  "
                   f"{_short(k.op_name)[-60:]:60s} {k.out_type[:70]} | {k.ops}")
  return lines


def _short(op_name: str) -> str:
  """An op_name without jit/while/checkpoint wrappers, unrolled blocks as one ('blocks_3' ->
  'blocks'); transpose(...) marks the backward."""
  parts = [p for p in op_name.split("/") if p and not re.match(
      r"^(jit\(.*\)|while|body|closed_call|checkpoint|rematted_computation|cond|branch_\d+_fun)$", p)]
  return re.sub(r"\bblocks_\d+\b", "blocks", "/".join(parts))


@contextlib.contextmanager
def gpu_target(target: str = "h100", device_memory_gib: float | None = None):
  """Yields the devices of a compile-only `target` GPU (no GPU needed; see the module
  docstring) with `device_memory_gib` of memory (None: DEVICE_MEMORY_GIB of the target);
  while inside, models trace their GPU code paths (cuDNN attention, one-hot embeddings)."""
  device_memory_gib = device_memory_gib or DEVICE_MEMORY_GIB[target]
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_platforms", "cpu")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topo = topologies.get_topology_desc(
        platform="cuda", topology="1x1x1",
        target_config=TARGETS[target].replace("{device_memory_bytes}", str(int(device_memory_gib * 2**30))))
  except Exception as e:  # the CUDA plugin is missing or does not match jax
    raise RuntimeError(
        "compiling for a GPU without one needs jax's CUDA plugin: pip install "
        f"'jax[cuda12]=={jax.__version__}' (in a venv of its own): {e}") from e
  # The model picks cuDNN attention and one-hot embeddings by jax.default_backend() while it
  # traces; the compile-only GPU is not the default backend, so tell it.
  default_backend = jax.default_backend
  import jax._src.cudnn.fused_attention_stablehlo as cudnn_attention  # pylint: disable=g-import-not-at-top
  check = cudnn_attention.check_cudnn_version
  jax.default_backend = lambda: "gpu"
  cudnn_attention.check_cudnn_version = lambda *a, **k: None  # asks the (absent) device
  try:
    yield topo.devices
  finally:
    jax.default_backend = default_backend
    cudnn_attention.check_cudnn_version = check


def compile_step_hlo(config, target: str = "h100", device_memory_gib: float | None = None) -> tuple[str, dict]:
  """The optimised HLO text of the config's train step (flow objective), compiled by XLA:GPU
  for `target` on this machine (no GPU needed; see the module docstring), and the compile
  time and peak memory (what jdiff.bench reports on a device)."""
  with gpu_target(target, device_memory_gib) as devices:
    from jdiff.train import speed  # pylint: disable=g-import-not-at-top
    from jdiff.train import trainer  # pylint: disable=g-import-not-at-top
    from jdiff.train import state as state_lib  # pylint: disable=g-import-not-at-top

    networks, tx, mesh, rules = speed.step_parts(config, devices)
    abstract, shardings = state_lib.state_shardings(networks, tx, mesh, rules, config.optim.trainable)
    t0 = time.perf_counter()
    compiled, _ = trainer.compile_step(networks, tx, config, mesh, rules, shardings, abstract)
    info = dict(compile_s=time.perf_counter() - t0, peak_memory_bytes=speed.peak_memory_bytes(compiled))
    return compiled.as_text(), info


def report(text: str, rates: Rates, top: int, ks: list[Kernel] | None = None) -> dict:
  """summarize() of the module's kernels (`ks`, when the caller has parsed them already) and
  how many instructions XLA rematerialised."""
  s = summarize(kernels(text) if ks is None else ks, rates, top)
  from jdiff.train.trainer import xla_rematerialized  # pylint: disable=g-import-not-at-top
  s["rematerialized"] = xla_rematerialized(text)
  return s


def print_report(s: dict) -> None:
  if "compile_s" in s:
    print(f"compiled in {s['compile_s']:.1f} s; peak memory {s['peak_memory_bytes'] / 2**30:.2f} GiB")
  print(f"estimated kernel time {s['total_s'] * 1e3:.1f} ms per step")
  print(f"{'kind':10s} {'ms':>8s} {'GB moved':>9s} {'TFLOP':>7s} {'launches':>8s}")
  for kind, r in s["kinds"].items():
    print(f"{kind:10s} {r['seconds'] * 1e3:8.1f} {r['bytes'] / 1e9:9.1f} {r['flops'] / 1e12:7.2f} {r['launches']:8d}")
  print(f"\ntop ops ({'ms':>6s}, GB, launches):")
  for r in s["top"]:
    print(f"  {r['kind']:9s} {r['seconds'] * 1e3:7.2f} {r['bytes'] / 1e9:7.2f} {r['launches']:5d}  {r['op'][:110]}")
  if s["rematerialized"]:
    print(f"\nXLA rematerialised {s['rematerialized']} instructions to fit the memory size: "
          "raise --device_memory_gib if the device run has more")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "mmdit_256.py"))
  parser.add_argument("--rows", default="d24:128",
                      help="gpu_checks.py row specs in the latent 256 geometry, space-separated; empty: "
                           "--config as it is")
  parser.add_argument("--hlo", default="", help="estimate this compiled HLO text instead of compiling")
  parser.add_argument("--hlo_out", default="", help="also write the compiled HLO text here (.ROW appended "
                                                    "with several rows)")
  parser.add_argument("--target", default="h100", choices=sorted(TARGETS))
  parser.add_argument("--device_memory_gib", type=float, default=None,
                      help="the memory size to compile for (default: DEVICE_MEMORY_GIB of the target)")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")
  parser.add_argument("--kernels", default="", help="also list every kernel whose op_name matches this regex "
                                                    "(e.g. 'blocks_5/': one unrolled block's kernels)")
  args = parser.parse_args(argv)
  if args.hlo:
    with open(args.hlo) as f:
      text = f.read()
    _print_report(text, args, source=args.hlo)
    return
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import gpu_checks  # pylint: disable=g-import-not-at-top
  from jdiff import config as config_lib  # pylint: disable=g-import-not-at-top
  for row in args.rows.split() or [""]:
    if row:
      config = gpu_checks.config(None, "latent256", gpu_checks.row_overrides(row))
    else:
      config = config_lib.load(args.config)
    text, info = compile_step_hlo(config, args.target, args.device_memory_gib)
    if args.hlo_out:
      with open(args.hlo_out + (f".{row.replace(':', '_')}" if len(args.rows.split()) > 1 else ""), "w") as f:
        f.write(text)
    _print_report(text, args, row=row or args.config, target=args.target, xla_flags=os.environ.get("XLA_FLAGS", ""),
                  **info)


def _print_report(text: str, args, **fields) -> None:
  """The summary of one compiled module (and, with --kernels, its matching kernels), parsed once."""
  ks, rates = kernels(text), RATES[args.target]
  _print(dict(report(text, rates, args.top, ks), **fields), args.json)
  if args.kernels:
    print("\n".join(listing(ks, args.kernels, rates)), flush=True)


def _print(summary: dict, as_json: bool) -> None:
  if as_json:
    print(json.dumps(summary), flush=True)
  else:
    print(f"=== {summary.get('row') or summary.get('source')}")
    print_report(summary)
    print(flush=True)

if __name__ == "__main__":
  main()
