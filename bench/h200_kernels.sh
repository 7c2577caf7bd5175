#!/usr/bin/env bash
# Kernel-level H200 call (2026-11-29, third session): int8 weight-only kernels incl. the plugin's Triton
# kernels and torchao's (issue 6), then 2:4 sparse linear layers with both sparse back ends and a
# CUDA-graph timer (issue 7). Needs carry: .engine-whl (dsr1's pure-Python deps) and .ao-whl (torchao).
set -uo pipefail
. bench/h200_install.sh ".engine-whl .ao-whl" ./plugins/quant/int8 ./plugins/pruning/magnitude \
  ./plugins/pruning/semi24
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__)"
timeout 240 python3 bench/h200_int8.py --rows 1,8,16,32,64 --torchao-rows 1,8 --output "$OUT/int8-kernels-h200.json" 2>&1 \
  | grep -v Warning | tail -n 30
timeout 150 python3 bench/h200_semi24.py --batch-size 32,128,512,2048,8192 --output "$OUT/semi24-h200.json" 2>&1 \
  | tail -n 24
