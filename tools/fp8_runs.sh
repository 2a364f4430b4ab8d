#!/usr/bin/env bash
# Run on the device machine: FP8 (issue 16) GPU tests, then 8B bf16 vs FP8 benchmarks in one call; logs under $OUT.
# usage: tools/fp8_runs.sh [tests] [batch1] [offline] [long] [kv] [kvlong] ...   (default: tests batch1 offline)
#   tests    pytest -m gpu on the FP8 and kernel tests (TEST_PATHS overrides)
#   batch1   8B batch-1 decode, bf16 and FP8 interleaved (ROUNDS, default 2), with the FP8 GEMV tuning log
#   offline  8B 512 x 128/128 offline, bf16 and FP8 (WIDE=1: also with --max-num-seqs 512)
#   long     8B 256 x 2048/128 and 256 x 128/2048 offline, bf16 and FP8
#   kv       the FP8 runs again with --kv-cache-dtype fp8 (batch1 and 512 x 128/128)
#   kvlong   the long shapes in FP8, with the bf16 KV cache and with --kv-cache-dtype fp8
#   profile  the kernels of one decode step at batch 256 (and 1), bf16 and FP8 (and FP8 with an FP8 KV cache)
#   attn     the paged-attention kernel's launch choices swept per shape, bf16 and FP8 KV (benchmarks.attention_kernel)
#   prefill  the kernels of one prefill step of 4 x 2048 tokens, bf16 and FP8
#   hostgpu  profile_throughput (host vs GPU time per decode step) at --max-num-seqs 256 and 512, bf16 and FP8
set -uo pipefail
. "$(dirname "$0")/device_env.sh"
steps=${*:-tests batch1 offline}
model=benchmarks/configs/llama-3.1-8b
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
git rev-parse --short HEAD 2>/dev/null || true

throughput() {  # label, then benchmarks.throughput arguments; prints the tuning choices and the result line
  local label=$1; shift
  python3 -c "
import logging, runpy, sys
logging.basicConfig(level='INFO', format='%(message)s')
sys.argv = ['throughput'] + sys.argv[1:]
runpy.run_module('benchmarks.throughput', run_name='__main__')
" --model $model --load-format dummy "$@" 2>&1 | grep -v capturing | grep -E "matmul|KV cache:|^\{|Error|error" \
    | sed "s|^|[$label] |" | tee -a "$OUT/fp8_runs.log"
}

for step in $steps; do
  case $step in
    tests)
      python3 -m pytest -m gpu -q -rs -p no:cacheprovider ${TEST_PATHS:-tests/engine_builder/kernels/test_fp8_kernels.py \
        tests/engine_builder/test_fp8.py tests/engine_builder/kernels/test_triton_kernels.py} 2>&1 \
        | tee "$OUT/fp8_tests.log" | tail -30 ;;
    batch1)
      python3 -m benchmarks.roofline --model $model 2>&1 | tee -a "$OUT/fp8_runs.log"
      for round in $(seq "${ROUNDS:-2}"); do
        throughput "bf16 batch1 r$round" --num-requests 1 --input-len 128 --output-len 256
        throughput "fp8 batch1 r$round" --num-requests 1 --input-len 128 --output-len 256 --quantization fp8
      done ;;
    offline)
      throughput "bf16 512x128/128" --num-requests 512 --input-len 128 --output-len 128
      throughput "fp8 512x128/128" --num-requests 512 --input-len 128 --output-len 128 --quantization fp8
      if [ -n "${WIDE:-}" ]; then  # every request in flight at once (--max-num-seqs 512)
        throughput "bf16 512x128/128 seqs512" --num-requests 512 --input-len 128 --output-len 128 --max-num-seqs 512
        throughput "fp8 512x128/128 seqs512" --num-requests 512 --input-len 128 --output-len 128 --max-num-seqs 512 \
          --quantization fp8
      fi ;;
    long)
      for shape in "2048 128" "128 2048"; do
        set -- $shape
        throughput "bf16 256x$1/$2" --num-requests 256 --input-len $1 --output-len $2
        throughput "fp8 256x$1/$2" --num-requests 256 --input-len $1 --output-len $2 --quantization fp8
      done ;;
    kv)
      throughput "fp8+kv8 batch1" --num-requests 1 --input-len 128 --output-len 256 --quantization fp8 --kv-cache-dtype fp8
      throughput "fp8+kv8 512x128/128" --num-requests 512 --input-len 128 --output-len 128 --quantization fp8 \
        --kv-cache-dtype fp8 ;;
    kvlong)
      for shape in "2048 128" "128 2048"; do
        set -- $shape
        throughput "fp8 256x$1/$2" --num-requests 256 --input-len $1 --output-len $2 --quantization fp8
        throughput "fp8+kv8 256x$1/$2" --num-requests 256 --input-len $1 --output-len $2 --quantization fp8 \
          --kv-cache-dtype fp8
      done ;;
    profile)
      for batch in 256 1; do
        for quantization in none fp8; do
          python3 -m benchmarks.profile_step --model $model --batch-size $batch --quantization $quantization 2>&1 \
            | grep -v capturing | sed "s|^|[profile b$batch $quantization] |" | tee -a "$OUT/fp8_profile.log" | head -40
        done
      done
      python3 -m benchmarks.profile_step --model $model --batch-size 256 --quantization fp8 --kv-cache-dtype fp8 2>&1 \
        | grep -v capturing | sed "s|^|[profile b256 fp8+kv8] |" | tee -a "$OUT/fp8_profile.log" | head -40 ;;
    attn)
      python3 -m benchmarks.attention_kernel ${ATTN_ARGS:-} 2>&1 | grep -v "^\s*$" | tee -a "$OUT/attention_kernel.log" ;;
    prefill)
      for quantization in none fp8; do
        python3 -m benchmarks.profile_step --model $model --batch-size 4 --prompt-len 2048 --quantization $quantization \
          2>&1 | grep -v -i "warn" | sed "s|^|[prefill $quantization] |" | tee -a "$OUT/fp8_profile.log" | head -16
      done ;;
    hostgpu)
      for seqs in 256 512; do
        for quantization in none fp8; do
          python3 -m benchmarks.profile_throughput --model $model --num-requests 512 --max-num-seqs $seqs \
            --quantization $quantization 2>&1 | grep '^{' | sed "s|^|[hostgpu seqs$seqs $quantization] |" \
            | tee -a "$OUT/fp8_runs.log"
        done
      done ;;
  esac
done
