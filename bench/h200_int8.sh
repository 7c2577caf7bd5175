#!/usr/bin/env bash
# Issue 6 on the H200, one short command: int8 kernels at decode sizes, then bf16 vs int8 (int8pack
# kernel) decode on the captured CUDA-graph path at batch 1 (no compile), Qwen2-7B shape. JSON in $OUT.
set -uo pipefail
. bench/h200_install.sh ".engine-whl" ./plugins/attention/sdpa ./plugins/devices/cpu ./plugins/devices/cuda \
  ./plugins/quant/float ./plugins/quant/int8
timeout 40 python3 bench/h200_int8.py --rows 1,8 --output "$OUT/int8-kernels-h200.json" 2>&1 | tail -n 10
for q in bf16 '{"name": "int8", "options": {"cuda_kernel": "int8pack"}}'; do
  timeout 45 python3 bench/h200_decode.py --quant "$q" --batch-size 1 --modes cudagraph --new-tokens 64 --reps 2 \
    --output "$OUT/decode-cudagraph-$(echo "$q" | tr -dc 'a-z0-9' | head -c 12).json" 2>&1 | grep -E "^batch|Error" | tail -n 3
done
