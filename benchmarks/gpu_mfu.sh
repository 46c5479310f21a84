#!/usr/bin/env bash
# Prepared device run (lent H100/H200, under 8 minutes): bf16-vs-fp32 loss check, then MFU of
# MMDiT at SD3's 256x256 latent geometry (32x32x16 latents, patch 2: 256 image tokens) for
# d12 and d24 at two batch sizes, through `python -m jdiff.bench` (one JSON line each),
# summarised as a table. Run from the repo root with the wheels of
# ../shared/device/wheels.sh carried in .whl:   bash benchmarks/gpu_mfu.sh
# CPU dry run of the same script (tiny sizes):
#   SIZES="d2:4" STEPS=2 CHECK_VARIANT=test JAX_PLATFORMS=cpu bash benchmarks/gpu_mfu.sh
set -uo pipefail
source benchmarks/device_env.sh
SIZES=${SIZES:-"d12:64 d12:128 d24:64 d24:128"}
STEPS=${STEPS:-10}
CHECK_VARIANT=${CHECK_VARIANT:-}  # 'test' for the CPU dry run
log="$OUT/gpu_mfu.log"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
  timeout 120 python3 benchmarks/gpu_checks.py $CHECK_VARIANT --bf16_only || echo "bf16 check failed or timed out"
  for spec in $SIZES; do
    variant=${spec%%:*}; batch=${spec##*:}
    timeout 150 python3 -m jdiff.bench --config=configs/mmdit_256.py --steps="$STEPS" --warmup=2 \
      --config.model.variant="$variant" --config.model.patch_size=2 --config.model.in_channels=16 \
      --config.data.resolution=32 --config.train.batch_size="$batch" --config.mesh.data=-1 \
      2>/dev/null | tail -1 | tee -a "$OUT/bench.jsonl"
  done
  python3 - "$OUT/bench.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
print(f"{'model':<28} {'batch':>5} {'step ms':>8} {'img/s':>8} {'TFLOP/step':>10} {'XLA TFLOP':>9} {'MFU':>6} {'compile s':>9} {'peak GiB':>8}")
for r in rows:
  mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
  xla = f"{r['xla_flops_per_step'] / 1e12:.2f}" if r["xla_flops_per_step"] else "n/a"
  mem = f"{r['peak_memory_bytes'] / 2**30:.2f}" if r["peak_memory_bytes"] else "n/a"
  print(f"{r['model']:<28} {r['batch']:>5} {1e3 * r['step_time_s']:>8.1f} {r['images_per_s']:>8.1f} "
        f"{r['flops_per_step'] / 1e12:>10.3f} {xla:>9} {mfu:>6} {r['compile_s']:>9.1f} {mem:>8}")
PY
} 2>&1 | tee "$log"
