"""Where the train step's device time goes, from a `jdiff.bench --profile_dir=DIR` trace.

  python benchmarks/profile_summary.py DIR [--top=25]

Reads the newest *.xplane.pb under DIR (jax.profiler) and DIR/train_step.hlo.txt (the compiled
step, written by jdiff.bench), sums the device time of each HLO op of the step over the traced
steps, and prints it per step by kind (matmul, attention, fusion kinds, copies, collectives)
and for the costliest ops with the source op they came from (HLO metadata op_name).
On GPU the device plane's 'XLA Ops' line gives one event per op; on CPU the host threads'
thunk events do.
"""

import argparse
import collections
import glob
import os
import re

from jax.profiler import ProfileData

# '%name = TYPE opcode(' with TYPE an array type or a tuple of them.
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\([^()]*\)|\S+)\s+([\w\-]+)\(")


def parse_hlo(text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (kind, source op_name) for every instruction of the module."""
  ops = {}
  for line in text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    name, opcode = m.groups()
    kind = opcode
    if opcode == "fusion":
      fk = re.search(r"kind=(k\w+)", line)
      kind = f"fusion:{fk.group(1) if fk else '?'}"
      if "__triton_gemm" in line or '"kind":"__triton_gemm' in line or "triton_gemm" in line:
        kind = "matmul (triton)"
      elif "__cudnn$fmha" in line or "cudnn" in line and "fmha" in line:
        kind = "attention (cudnn)"
      elif "__cublas" in line or "gemm" in line.split("calls=")[-1][:40]:
        kind = "matmul (cublas)"
    elif opcode == "custom-call":
      target = re.search(r'custom_call_target="([^"]+)"', line)
      target = target.group(1) if target else "?"
      kind = ("matmul (cublas)" if "cublas" in target else
              "attention (cudnn)" if "fmha" in target or "cudnn" in target else f"custom-call:{target}")
    elif opcode in ("dot", "convolution"):
      kind = "matmul (xla)"
    elif opcode in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                    "all-reduce-start", "all-gather-start", "collective-permute-start"):
      kind = "collective"
    src = re.search(r'op_name="([^"]+)"', line)
    ops[name] = (kind, src.group(1) if src else "")
  return ops


_NOISE = {"while", "body", "eval_jaxpr", "checkpoint", "rematted_computation", "closed_call", ""}


def _source_key(op_name: str) -> str:
  """'jit(train_step)/transpose(jvp(MMDiT))/while/body/blocks/x_mlp/fc1/dot_general' ->
  'bwd MMDiT/blocks/x_mlp/fc1/dot_general': one key per layer kind, forward or backward."""
  if not op_name:
    return "(no source)"
  direction = "bwd" if "transpose(" in op_name else "fwd"
  op_name = re.sub(r"^jit\(train_step\)/", "", op_name)
  op_name = re.sub(r"(transpose|jvp|checkpoint|remat|while|body|closed_call|pjit)\(", "", op_name).replace(")", "")
  op_name = re.sub(r"_\d+(?=/|$)", "", op_name)  # blocks_3 -> blocks
  parts = [p for p in op_name.split("/") if p not in _NOISE]
  return f"{direction} {'/'.join(parts[-5:])}"


_KERNEL_KINDS = (  # GPU library kernels, by name prefix: they carry no HLO name of their own
    (("nvjet", "sm90_xmma", "sm80_xmma", "cutlass", "ampere_", "gemm"), "matmul (cublas)"),
    (("cudnn", "void cudnn"), "attention (cudnn)"),
    (("memcpy", "memset"), "copy"),
)


def _classify(name: str, ops: dict[str, tuple[str, str]]) -> tuple[str, str]:
  """(kind, source op) of a trace event: an HLO op name (CPU thunks, TPU ops), a fusion's
  kernel (its HLO name with '.' and '-' as '_'), or a library kernel."""
  if name in ops:
    return ops[name]
  for prefixes, kind in _KERNEL_KINDS:
    if name.startswith(prefixes):
      return kind, ""
  return ops.get(_kernel_name(name), ("?", ""))


def _kernel_name(hlo_name: str) -> str:
  return hlo_name.replace(".", "_").replace("-", "_")


def op_times(xplane: str) -> tuple[dict[str, float], str]:
  """Op or kernel name -> summed device nanoseconds, and the plane they came from."""
  pd = ProfileData.from_file(xplane)
  planes = [p for p in pd.planes if p.name.startswith(("/device:GPU", "/device:TPU"))]
  times = collections.Counter()
  if planes:
    plane = planes[0]
    lines = [l for l in plane.lines if l.name == "XLA Ops"] or list(plane.lines)
    for line in lines:
      for e in line.events:
        times[e.name] += e.duration_ns
    return times, plane.name
  plane = pd.find_plane_with_name("/host:CPU")
  for line in plane.lines:
    for e in line.events:
      stats = dict(e.stats)
      if "hlo_op" in stats and "train_step" in str(stats.get("hlo_module", "")):
        times[stats["hlo_op"]] += e.duration_ns
  return times, plane.name


def summarize(directory: str, top: int = 25, steps: int = 2) -> str:
  xplanes = sorted(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
  if not xplanes:
    raise FileNotFoundError(f"no *.xplane.pb under {directory}")
  hlo_path = os.path.join(directory, "train_step.hlo.txt")
  ops = parse_hlo(open(hlo_path).read()) if os.path.exists(hlo_path) else {}
  ops.update({_kernel_name(k): v for k, v in ops.items() if _kernel_name(k) not in ops})
  times, plane = op_times(xplanes[-1])
  total = sum(times.values())
  out = [f"{plane}: {total / steps / 1e6:.1f} ms of op time per step ({steps} steps traced)"]
  by_kind = collections.Counter()
  for name, ns in times.items():
    by_kind[_classify(name, ops)[0]] += ns
  out.append(f"{'kind':<28} {'ms/step':>8} {'share':>6}")
  for kind, ns in by_kind.most_common():
    out.append(f"{kind:<28} {ns / steps / 1e6:>8.2f} {100 * ns / total:>5.1f}%")
  by_source = collections.Counter()
  for name, ns in times.items():
    kind, src = _classify(name, ops)
    by_source[_source_key(src) if src else kind] += ns
  out.append(f"\n{'source (blocks merged; bwd = transpose)':<60} {'ms/step':>8} {'share':>6}")
  for key, ns in by_source.most_common(top):
    out.append(f"{key[:60]:<60} {ns / steps / 1e6:>8.2f} {100 * ns / total:>5.1f}%")
  out.append(f"\n{'op':<22} {'kind':<20} {'ms/step':>8} {'share':>6}  source")
  for name, ns in times.most_common(top):
    kind, src = _classify(name, ops)
    src = re.sub(r"^jit\(train_step\)/", "", src)
    out.append(f"{name[:22]:<22} {kind[:20]:<20} {ns / steps / 1e6:>8.2f} {100 * ns / total:>5.1f}%  {src[-110:]}")
  return "\n".join(out)


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("directory")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--steps", type=int, default=2, help="steps in the trace (jdiff.bench traces 2)")
  args = parser.parse_args()
  print(summarize(args.directory, args.top, args.steps))
