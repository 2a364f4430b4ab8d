# Sourced by the device scripts (gpu_suite.sh, fp8_runs.sh, multi_gpu_runs.sh): unbuffered output, $OUT for the logs,
# and the carried wheels (.whl, GUIDE.md §6) installed into /tmp/site ahead of this tree on PYTHONPATH.
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
