# Issue 16, decode kernels at the bandwidth limit: the SDK's weight-only Triton kernels (int8, int4, fp8, and a bf16
# GEMV) against bf16 cuBLAS and each format's previous CUDA path per Qwen2-7B layer shape at 1 and 8 rows, then
# decode of the Qwen2-7B shape per policy and kernel on the fused path (batch 1 compiled + captured, batch 8
# captured), one process each, in one device call:
#   bash bench/gpu.sh kernels16 [kernels|decode]     (default: both; carry .engine-whl)
# Files (under $OUT; they go to bench/results/kernels16/): weight-kernels-h200.json, decode-{bf16,int8,
# int4-triton,int4-tinygemm,fp8-triton,fp8-scaled_mm}.json. 64 new tokens, 3 reps, as the earlier runs; a decode
# process spends most of its time building, compiling and tuning (20-50 s), not timing. The step limits add up to
# 9.1 minutes, the expected total is about 7; `kernels` and `decode` split it into two calls if the first runs long
# (the kernel bench fills Triton's disk cache: run it first either way).
WHEELS=".engine-whl" PLUGINS="attention/sdpa devices/cpu devices/cuda quant/float quant/int8 quant/int4 quant/fp8"
what=${1:-all}
if [ "$what" = all ] || [ "$what" = kernels ]; then
  step 170 weight_kernels --rows 1,8 --output "$OUT/weight-kernels-h200.json"
fi
if [ "$what" = all ] || [ "$what" = decode ]; then
  for q in bf16 int8 int4:triton fp8:triton int4:tinygemm fp8:scaled_mm; do
    name=${q%%:*} kernel=${q#*:}
    if [ "$kernel" = "$q" ]; then policy=$name tag=$name
    else policy="{\"name\": \"$name\", \"options\": {\"cuda_kernel\": \"$kernel\"}}" tag=$name-$kernel; fi
    step 63 decode_modes --quant "$policy" --batch-size 1,8 --modes cudagraph+compile --new-tokens 64 --reps 3 \
      --output "$OUT/decode-$tag.json"
  done
fi
