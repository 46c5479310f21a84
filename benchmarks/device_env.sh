# Sourced by the device scripts (gpu_smoke.sh, gpu_mfu.sh): output folder, and the wheels of
# ../shared/device/wheels.sh carried in .whl installed beside the device image's packages.
OUT=${OUT:-/tmp/jdiff_gpu}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl
  export PYTHONPATH=$PWD/.site:$PWD
fi
export PYTHONUNBUFFERED=1
