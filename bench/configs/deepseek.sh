# Issue 22 on the H200: the DeepSeek-V2-Lite shape (27 layers, MLA with kv_lora_rank 512, 64 routed + 2 shared
# experts, 6 active; random bf16 weights) against transformers on the same weights, and the decode modes' identity.
#   bash bench/gpu.sh deepseek [PART] [BATCHES] [MODES]   PART: test, modes, bench or all (default)
#   TESTS=EXPR narrows the test part (pytest -k; default "cuda or gemv": the CUDA paths and the expert kernel)
WHEELS=".engine-whl .test-whl"
PLUGINS="attention/sdpa devices/cpu devices/cuda"
part=${1:-all}
if [ "$part" = all ] || [ "$part" = test ]; then
  step 240 pytest tests/engine/test_moe_mla.py -k "${TESTS:-cuda or gemv}"
fi
if [ "$part" = all ] || [ "$part" = modes ]; then
  step 300 decode_modes --shape deepseek-v2-lite --batch-size "${2:-1,32}" --modes "${3:-eager,cudagraph}" --new-tokens 64 \
    --reps 2 --output "$OUT/deepseek-v2-lite-modes-h200.json"
fi
if [ "$part" = all ] || [ "$part" = bench ]; then
  step 580 dsr1 bench --shape deepseek-v2-lite --random-weights --compare hf --device cuda \
    --config bench/configs/fused.json --batch-size "${2:-1,8,32}" --prompt-len 128 --new-tokens 64 --reps 1 \
    --output "$OUT/deepseek-v2-lite-h200.json"
fi
