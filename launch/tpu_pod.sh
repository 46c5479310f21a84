#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create it (optional), copy this checkout to every
# worker, install, and run the same command on all workers at once. JAX finds the other
# workers itself (jdiff/train/distributed.py: TPU_WORKER_HOSTNAMES).
#
#   launch/tpu_pod.sh NAME ZONE ACCELERATOR WORKDIR [jdiff.main flags ...]
#   launch/tpu_pod.sh jdiff-v5p zone-x v5p-32 /gcs/my-bucket/runs/mmdit --config.mesh.fsdp=16
#
# WORKDIR must be a path every worker sees (e.g. a GCS bucket mounted with gcsfuse at the
# same path on each worker, or a Filestore NFS share): checkpoints, metrics and samples go there.
# Set CREATE=0 to reuse an existing slice.
set -euo pipefail
NAME=$1 ZONE=$2 ACCEL=$3 WORKDIR=$4
shift 4
CONFIG=${CONFIG:-configs/mmdit_256.py}
if [[ "${CREATE:-1}" == 1 ]]; then
  gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$ACCEL" \
      --version="${TPU_VERSION:-tpu-ubuntu2204-base}"
fi
cd "$(dirname "$0")/.."
tar --exclude=.git --exclude=runs --exclude=.ci/venv -czf /tmp/jdiff_src.tgz .
gcloud compute tpus tpu-vm scp /tmp/jdiff_src.tgz "$NAME":/tmp/jdiff_src.tgz --zone="$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="
  set -e; mkdir -p ~/jdiff && tar -xzf /tmp/jdiff_src.tgz -C ~/jdiff && cd ~/jdiff &&
  python3 -m pip install -q -e . 'jax[tpu]' &&
  python3 -m jdiff.main --config=$CONFIG --workdir=$WORKDIR $*"
