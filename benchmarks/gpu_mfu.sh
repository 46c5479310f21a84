#!/usr/bin/env bash
# Prepared device run (lent H100/H200, within 8 minutes: at most 150 + 260 + 60 s by its
# time limits): bf16-vs-fp32 check, then MFU of MMDiT at SD3's 256x256 latent geometry
# (32x32x16 latents, patch 2: 256 image tokens), d12 and d24 by default (other sizes through
# ROWS_A / ROWS_B), each row one `jdiff.bench`
# measurement (benchmarks/gpu_checks.py), in two processes with different XLA flags, then
# one table, the input pipeline on this host, and a trace of one row. Run from the repo
# root with the wheels of ../shared/device/wheels.sh carried in .whl:
#   bash benchmarks/gpu_mfu.sh
# CPU dry run of the same script (tiny sizes; PROFILE_ROW must be one of ROWS_B to trace it):
#   ROWS_A="d2:4:dots_no_batch:model.scan=True d2:4" ROWS_B="d2:8" GEMM_ROW=d2:8 PROFILE_ROW=d2:8 \
#   VARIANT=test JAX_PLATFORMS=cpu LOADER=0 OUT=DIR bash benchmarks/gpu_mfu.sh
set -uo pipefail
start=$SECONDS
source benchmarks/device_env.sh
# Both processes run cuBLAS only: XLA's Triton GEMM autotuning took 54 s to compile d12 on an
# H100 for the same step time, and d24 did not finish in 3 minutes (2026-11-27). (cuBLASLt,
# with its bias epilogues, is already XLA's default GEMM call.)
# Process A, with the bf16 check: d24 as the 2026-11-27 table ran it (scanned blocks, remat
# dots_no_batch), now with the select update and the norms' hand-written backwards; then d12
# with today's defaults.
ROWS_A=${ROWS_A-"d24:128:dots_no_batch:model.scan=True d12:128"}
FLAGS_A=${FLAGS_A-"--xla_gpu_enable_triton_gemm=false"}
# Process B: d24 with the defaults since 2026-11-27 (unrolled blocks, remat
# dots_no_batch_attention_mlp; benchmarks/hlo_cost.py estimates 413.7 ms), traced;
# then GEMM_ROW's matmuls timed one by one: the MFU of its GEMMs alone, the ceiling of this
# geometry. Unrolled d24 compiles in ~75 s without a GPU (2 cores, no autotuning).
ROWS_B=${ROWS_B:-"d24:128"}
GEMM_ROW=${GEMM_ROW-d24:128}
PROFILE_ROW=${PROFILE_ROW:-d24:128}  # traced after its timing in process B; summary printed
VARIANT=${VARIANT:+--variant=$VARIANT}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}
rows="$OUT/bench.jsonl"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "no GPU"
  if [ -n "$ROWS_A" ]; then  # ROWS_A="" skips this process and the bf16 check
    XLA_FLAGS="${XLA_FLAGS:-} $FLAGS_A" timeout "${LIMIT_A:-150}" python3 benchmarks/gpu_checks.py $VARIANT --check \
      --rows="$ROWS_A" --tag=A --out="$rows" ||
      echo "process A failed or timed out (rc $?)"
  fi
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" timeout "${LIMIT_B:-260}" python3 benchmarks/gpu_checks.py $VARIANT \
    --rows="$ROWS_B" --tag=B --out="$rows" --profile_row="$PROFILE_ROW" --profile_dir=/tmp/jdiff_profile \
    --gemm_row="$GEMM_ROW" || echo "process B failed or timed out (rc $?)"
  python3 benchmarks/gpu_checks.py --table="$rows"
  # The input pipeline on this host's CPUs against the GPU step's demand (issue: >= 5x).
  # Shapes (24 and 256 px), an SD3-shaped latent cache and JPEG ArrayRecords, each with the
  # config's read threads and with 8 worker processes.
  [ "${LOADER:-1}" = 1 ] && timeout 60 python3 benchmarks/loader.py --seconds="${LOADER_SECONDS:-3}" --threads=config \
    --workers=8 | tee "$OUT/loader.jsonl"
  f=$(find /tmp/jdiff_profile -name '*.xplane.pb' 2>/dev/null | head -1)
  [ -n "$f" ] && cp "$f" "$OUT/profile.xplane.pb" && cp /tmp/jdiff_profile/train_step.hlo.txt "$OUT/"
  echo "gpu_mfu.sh: $((SECONDS - start)) s"
} 2>&1 | tee "$OUT/gpu_mfu.log"
