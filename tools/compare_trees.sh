#!/usr/bin/env bash
# Run on the device machine: the same benchmarks on an older tree (.oldtree/, carried) and on this one, alternating,
# in one call, so that a refactor can show it costs no speed (issue 11). Prints one JSON line per run.
# Prepare here:  rm -rf .oldtree && mkdir .oldtree && git archive OLD_COMMIT | tar -x -C .oldtree --anchored --exclude=models
# usage (device): [WHAT=offline|http] [ROUNDS=2] tools/compare_trees.sh          (carry .whl and .oldtree)
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
new=$PWD
old=$PWD/.oldtree
config=$new/benchmarks/configs/llama-3.1-8b
run() {  # run TREE LABEL ARGS...: one benchmark module in that tree
  local tree=$1 label=$2; shift 2
  (cd "$tree" && PYTHONPATH=/tmp/site:$tree python3 -m "$@" 2>&1 | grep '^{' | sed "s/^{/{\"tree\": \"$label\", /")
}
# WHAT=offline (batch-1 decode and 512 x 128/128 offline) or WHAT=http (the HTTP soak); ROUNDS alternations of both.
for round in $(seq "${ROUNDS:-2}"); do
  for pair in "$old old" "$new new"; do
    set -- $pair
    if [ "${WHAT:-offline}" = http ]; then
      run "$1" "$2" benchmarks.http_soak --runs 1 --out /tmp/soak-$2-$round
      continue
    fi
    run "$1" "$2" benchmarks.throughput --model "$config" --load-format dummy --input-len 128 --num-requests 1 --output-len 256
    run "$1" "$2" benchmarks.throughput --model "$config" --load-format dummy --input-len 128 --num-requests 512 --output-len 128
  done
done
