# Issue 17: tensor- (and pipeline-) parallel scaling on one multi-GPU machine, Qwen2-7B shape, random bf16 weights.
#   bash bench/gpu.sh parallel [N=all GPUs] [BATCHES=1,8,32,128]
# TP 1, then TP N under torchrun (and PP 2 at batch 128 where parallel.pipeline exists), at each batch size:
# decode and prefill tok/s, peak memory per GPU; the summary has the scaling efficiency at batch 128
# (tok/s(N) / (N * tok/s(1))) and the batch-1 speed-up. Copy $OUT/parallel-qwen2-7b-tpN.json (and the runs'
# JSONs in the folder of that name) to bench/results/parallel/.
WHEELS=".engine-whl" PLUGINS="attention/sdpa devices/cpu devices/cuda quant/float"
TAIL=40
# NVLink multicast stays off on shared hosts (.library/device/KINDS.md); a value the caller set is kept
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}" TORCH_SYMM_MEM_DISABLE_MULTICAST="${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}"
export NVSHMEM_DISABLE_NVLS="${NVSHMEM_DISABLE_NVLS:-1}"
N=${1:-$(nvidia-smi -L 2>/dev/null | wc -l)}
step 590 parallel --tensor "$N" --batch-size "${2:-1,8,32,128}" --pipeline-batch 128 --prompt-len 128 \
  --new-tokens 64 --reps 2 --timeout-s 120 --output "$OUT/parallel-qwen2-7b-tp$N.json"
