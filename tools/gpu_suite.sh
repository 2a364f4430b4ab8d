#!/usr/bin/env bash
# Run on the device machine (see benchmarks/RESULTS.md): GPU tests, then benchmarks; logs under $OUT.
# usage: tools/gpu_suite.sh [tests|kernels|profile|prefix|all]
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
what=${1:-all}
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
git rev-parse --short HEAD 2>/dev/null || true
if [ "$what" = tests ] || [ "$what" = all ]; then
  python3 -m pytest -m gpu -q -rs -p no:cacheprovider ${TEST_PATHS:-tests/} 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [ "$what" = kernels ] || [ "$what" = all ]; then
  python3 -m benchmarks.roofline --model benchmarks/configs/llama-3.1-8b --model benchmarks/configs/llama-3.2-1b 2>&1 | tee "$OUT/roofline.log"
  for m in llama-3.2-1b llama-3.1-8b; do
    python3 -m benchmarks.decode_latency --model benchmarks/configs/$m --batch-size 1 2>&1 | grep -v capturing | tee -a "$OUT/decode.log"
  done
fi
if [ "$what" = profile ] || [ "$what" = all ]; then
  for m in llama-3.2-1b llama-3.1-8b; do
    python3 -m benchmarks.profile_step --model benchmarks/configs/$m --batch-size 1 2>&1 | tee -a "$OUT/profile.log"
  done
fi
if [ "$what" = prefix ] || [ "$what" = all ]; then  # prefix caching on vs off (issue 15), 8B dummy weights
  python3 -m benchmarks.prefix_caching --model benchmarks/configs/llama-3.1-8b --load-format dummy 2>&1 \
    | tee "$OUT/prefix_caching.log" | grep '^{'
fi
