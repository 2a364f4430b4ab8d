#!/usr/bin/env bash
# Run on the device machine: the same benchmarks on older trees (under .oldtree/, carried) and on this one,
# alternating, in one call, so that a change can show it costs no speed (issues 11 and 12). One JSON line per run.
# Prepare here, once per older commit:
#   mkdir -p .oldtree/NAME && git archive COMMIT | tar -x -C .oldtree/NAME --anchored --exclude=models
# usage (device): [TREES=".oldtree/NAME ... ."] [WHAT=offline|http|batch1] [ROUNDS=2] tools/compare_trees.sh
#   (carry .whl and .oldtree; "." is this tree, labelled "new"; the default compares .oldtree/old with this tree)
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
new=$PWD
config=$new/benchmarks/configs/llama-3.1-8b
run() {  # run TREE LABEL ARGS...: one benchmark module in that tree
  local tree=$1 label=$2; shift 2
  (cd "$tree" && PYTHONPATH=/tmp/site:$tree python3 -m "$@" 2>&1 | grep '^{' | sed "s/^{/{\"tree\": \"$label\", /")
}
# WHAT=offline: batch-1 decode and 512 x 128/128 offline; batch1: only the former; http: the HTTP soak (one cold
# server per run). ROUNDS alternations over every tree.
for round in $(seq "${ROUNDS:-2}"); do
  for tree in ${TREES:-.oldtree/old .}; do
    label=$(basename "$tree"); [ "$tree" = . ] && label=new
    tree=$(cd "$tree" && pwd)
    case "${WHAT:-offline}" in
      http) run "$tree" "$label" benchmarks.http_soak --runs 1 --out "/tmp/soak-$label-$round" ;;
      batch1) run "$tree" "$label" benchmarks.throughput --model "$config" --load-format dummy --input-len 128 \
                --num-requests 1 --output-len 256 ;;
      *) run "$tree" "$label" benchmarks.throughput --model "$config" --load-format dummy --input-len 128 \
           --num-requests 1 --output-len 256
         run "$tree" "$label" benchmarks.throughput --model "$config" --load-format dummy --input-len 128 \
           --num-requests 512 --output-len 128 ;;
    esac
  done
done
