# bench/h200_final.sh before (the last call of 2026-11-29): (1) the fused decode bench against transformers
# (issue 5), (2) bf16/int8/int4 on the fused path at batch 1 (issue 6), (3) 2:4 sparse linear layers (issue 7),
# (4) the attention memory bench on one KV group (issue 4).
WHEELS=".engine-whl"
PLUGINS="attention/eager attention/sdpa attention/linear attention/sliding devices/cpu devices/cuda quant/float
quant/int8 quant/int4 pruning/magnitude pruning/semi24"
step 240 dsr1 bench --shape qwen2-7b --random-weights --compare hf --device cuda --config bench/configs/fused.json \
  --batch-size 1,8,32,128 --prompt-len 128 --new-tokens 128 --reps 1 --output "$OUT/qwen2-7b-h200-fused.json"
for q in bf16 int8 int4; do
  step 70 decode_modes --quant "$q" --batch-size 1 --modes cudagraph+compile --new-tokens 64 --reps 2 \
    --output "$OUT/quant-fused-$q.json"
done
step 35 semi24_kernels --batch-size 1,32,128,512 --output "$OUT/semi24-h200.json"
step 60 dsr1 bench attention --plugins eager,sdpa,linear,sliding --seq 1024,4096,8192,16384,32768 --device cuda \
  --dtype bfloat16 --heads 7 --kv-heads 1 --head-dim 128 --reps 3 --timeout-s 60 \
  --output "$OUT/attention-h200-group.json"
