#!/usr/bin/env bash
# On the GPU machine, after tools/gpu_suite.sh installed the carried wheels into /tmp/site: batch-1 decode of the
# 1B and 8B configs (dummy weights), printing the batch-1 GEMV tuning choices and output tokens/s of each.
# usage: bash tools/batch1_check.sh
export PYTHONPATH=/tmp/site:$PWD
for m in llama-3.2-1b llama-3.1-8b; do
python3 -c "
import logging, runpy, sys
logging.basicConfig(level='INFO', format='%(message)s')
sys.argv = ['throughput', '--model', 'benchmarks/configs/$m', '--load-format', 'dummy', '--input-len', '128', '--num-requests', '1', '--output-len', '256']
runpy.run_module('benchmarks.throughput', run_name='__main__')
" 2>&1 | grep -v capturing | grep -E "matmul|output_tok_s" | sed 's/.*"output_tok_s": \([0-9.]*\).*/output_tok_s \1/'
done
