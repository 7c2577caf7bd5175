#!/usr/bin/env bash
# Issue 6, the last H200 calls of 2026-11-29 (third session): the int8 kernels, then bf16 against int8
# decode of the Qwen2-7B shape on the fused path, batch 1 (compiled + captured) and 8 (captured), 3 reps
# each. `BATCH=1 bash bench/h200_int8_final.sh` runs batch 1 only (kernels at one row, no torchao,
# files quant-fused-b1-*.json). Needs carry: .engine-whl and .ao-whl.
set -uo pipefail
. bench/h200_install.sh ".engine-whl .ao-whl" ./plugins/attention/sdpa ./plugins/devices/cpu \
  ./plugins/devices/cuda ./plugins/quant/float ./plugins/quant/int8
if [ "${BATCH:-}" = 1 ]; then rows=1 ao_rows="" batches=1 prefix=quant-fused-b1; else
  rows=1,8 ao_rows=1 batches=1,8 prefix=quant-fused; fi
timeout 150 python3 bench/h200_int8.py --rows "$rows" --torchao-rows "$ao_rows" \
  --output "$OUT/int8-kernels-h200.json" 2>&1 | grep -v -i warn | cut -c1-420 | tail -n 15
for q in bf16 int8; do
  timeout 110 python3 bench/h200_decode.py --quant "$q" --batch-size "$batches" --modes cudagraph+compile \
    --new-tokens 64 --reps 3 --output "$OUT/$prefix-$q.json" 2>&1 | grep -E "^batch|floor|Error|error" | tail -n 4
done
