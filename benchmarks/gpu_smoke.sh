#!/usr/bin/env bash
# One prepared device run (lent H100/H200, ~5 minutes): the default GPU config trains
# unchanged, bf16 loss matches fp32 on the same batch, and step throughput per setting.
# Run from the repo root with the wheels from ../shared/device/wheels.sh carried in .whl:
#   bash benchmarks/gpu_smoke.sh     (writes $OUT/gpu_smoke.log when $OUT is set)
set -uo pipefail
source benchmarks/device_env.sh
log="$OUT/gpu_smoke.log"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import jax, flax, optax, orbax.checkpoint, grain; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
  python3 benchmarks/gpu_checks.py
  # The default config end to end for a few steps: data, compile, train, checkpoint, samples.
  timeout 240 python3 -m jdiff.main --config=configs/mmdit_256.py --workdir=/tmp/gpu_run \
    --config.train.num_steps=40 --config.train.log_every=20 --config.train.checkpoint_every=40 \
    --config.train.sample_every=40 --config.eval.at_end=False --config.train.batch_size=64 \
    --config.sample.num_steps=10 2>&1 | grep -v "^train:" | grep -vi "orbax\|checkpoint_manager\|async" | tail -15
  cat /tmp/gpu_run/metrics.jsonl
} 2>&1 | tee "$log"
