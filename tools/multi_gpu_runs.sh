#!/usr/bin/env bash
# Issue 13's runs on a multi-GPU device kind (nvidia-h200-x2 for the 8B rows), in one call; logs under $OUT.
# usage (device): tools/multi_gpu_runs.sh [tests|allreduce|offline|http|all]      (carry .whl)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # also for every child process
. "$(dirname "$0")/device_env.sh"
what=${1:-all}
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; git rev-parse --short HEAD 2>/dev/null || true
config=benchmarks/configs/llama-3.1-8b
if [ "$what" = tests ] || [ "$what" = all ]; then  # the TP tests on 2 GPUs, the single-GPU ones too
  python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/ 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
fi
if [ "$what" = allreduce ] || [ "$what" = all ]; then
  python3 -m benchmarks.allreduce --ranks "$gpus" 2>&1 | tee "$OUT/allreduce.log"
fi
if [ "$what" = offline ] || [ "$what" = all ]; then  # TP=2 against TP=1, alternating, same call
  for tp in 1 2 1 2; do
    python3 -m benchmarks.throughput --model $config --load-format dummy --input-len 128 --num-requests 1 \
      --output-len 256 -tp $tp 2>&1 | grep '^{' | tee -a "$OUT/offline.log"
    python3 -m benchmarks.throughput --model $config --load-format dummy --input-len 128 --num-requests 512 \
      --output-len 128 -tp $tp 2>&1 | grep '^{' | tee -a "$OUT/offline.log"
  done
fi
if [ "$what" = http ] || [ "$what" = all ]; then
  for tp in 1 2; do
    python3 -m benchmarks.suite --skip-peer -tp $tp --out "$OUT/suite-tp$tp" 2>&1 | tail -12 | tee -a "$OUT/http.log"
  done
fi
