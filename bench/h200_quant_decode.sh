#!/usr/bin/env bash
# Issue 6/7 H200 call (2026-11-29, third session), one command: int8 kernels at decode sizes (incl. the
# plugin's Triton kernels and torchao's), 2:4 sparse layers, then decode of the Qwen2-7B shape per
# precision policy on the fused path (batch 1 compiled + captured, batch 8 captured), one process each.
# Needs carry: .engine-whl (dsr1's pure-Python deps) and .ao-whl (torchao, for the kernel comparison).
set -uo pipefail
. bench/h200_install.sh ".engine-whl .ao-whl" ./plugins/attention/sdpa ./plugins/devices/cpu \
  ./plugins/devices/cuda ./plugins/quant/float ./plugins/quant/int8 ./plugins/quant/int4 ./plugins/quant/fp8 \
  ./plugins/pruning/magnitude ./plugins/pruning/semi24
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 150 python3 bench/h200_int8.py --rows 1,8,16,32 --torchao-rows 1 --output "$OUT/int8-kernels-h200.json" 2>&1 \
  | grep -v -i warn | cut -c1-400 | tail -n 20
timeout 80 python3 bench/h200_semi24.py --batch-size 32,128,512,2048,8192 --backends cusparselt,cutlass \
  --output "$OUT/semi24-h200.json" 2>&1 | grep -v -i warn | cut -c1-300 | tail -n 20
for q in bf16 int8 int4 fp8; do
  timeout 100 python3 bench/h200_decode.py --quant "$q" --batch-size 1,8 --modes cudagraph+compile --new-tokens 64 \
    --reps 2 --output "$OUT/quant-fused-$q.json" 2>&1 | grep -E "^batch|floor|Error|error" | tail -n 4
done
