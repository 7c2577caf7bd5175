#!/usr/bin/env bash
# Issue 6, batch 1 only (2026-11-29, third session): int8 kernels at one row and bf16 vs int8 decode at batch 1.
# Needs carry: .engine-whl and .ao-whl.
set -uo pipefail
PIP="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site"
$PIP --upgrade .engine-whl/*.whl .ao-whl/*.whl
$PIP --no-build-isolation ./ ./sdk ./plugins/attention/sdpa ./plugins/devices/cpu ./plugins/devices/cuda \
  ./plugins/quant/float ./plugins/quant/int8 >/dev/null
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
timeout 150 python3 bench/h200_int8.py --rows 1 --torchao-rows "" --output "$OUT/int8-kernels-h200.json" 2>&1 \
  | grep -v -i warn | cut -c1-420 | tail -n 15
for q in bf16 int8; do
  timeout 100 python3 bench/h200_decode.py --quant "$q" --batch-size 1 --modes cudagraph+compile --new-tokens 64 \
    --reps 3 --output "$OUT/quant-fused-b1-$q.json" 2>&1 | grep -E "^batch|floor|Error|error" | tail -n 4
done
