#!/usr/bin/env bash
# The benchmark runner for the lent GPU machine (no package registry there). From the repo root:
#
#   bash bench/gpu.sh CONFIG [ARG...]
#       run the matrix bench/configs/CONFIG.sh (its ARGs are that file's $1, $2 ...)
#   bash bench/gpu.sh [-w "WHEEL_DIR..."] [-p "PLUGIN..."] [-t SECONDS] [-n LINES] -- STEP [ARG...]
#       run one step
#
# First it installs the carried wheel dirs (dsr1's pure-Python dependencies in .engine-whl, torchao in .ao-whl,
# pytest in .test-whl, the HTTP server's in .serve-whl), then dsr1, the SDK and the named plugins (FAMILY/NAME
# under plugins/) into a fresh $SITE (default /tmp/site), and puts it on PYTHONPATH (the machine's torch, triton
# and transformers stay as they are). A STEP is a module of the benchmark library (`decode_modes ...` runs
# `python3 -m dsr1.benchmarks.decode_modes ...`), `dsr1 ...` (the CLI, e.g. `dsr1 bench --shape qwen2-7b ...`)
# or `pytest ...`. Each step runs under its time limit (-t, default 600 s) with its whole output in
# $OUT/logs/NN-STEP.log and its last -n lines (default 20, warnings left out) printed; a failed step is reported
# and the next one runs. Results go where the steps' --output point, normally under $OUT (the device call's
# output dir; /tmp/bench-out when unset). The exit status is the number of failed steps.
#
# A config file sets WHEELS and PLUGINS and calls `step SECONDS STEP [ARG...]` once per measurement
# (`STDOUT=FILE step ...` also keeps the step's standard output in FILE).
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT/logs"
SITE=${SITE:-/tmp/site}  # where dsr1 is installed; the checkout itself is not imported
WHEELS=".engine-whl" PLUGINS="attention/sdpa devices/cpu devices/cuda" TIMEOUT=600 TAIL=20
FAILED=0 STEPS=0 INSTALLED=""

install() {  # the wheels of $WHEELS, then dsr1, the SDK and $PLUGINS, into $SITE (once per run)
    [ -n "$INSTALLED" ] && return 0
    INSTALLED=1
    local pip="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE"
    local wheels=() dirs=() d p
    for d in $WHEELS; do wheels+=("$d"/*.whl); done
    for p in $PLUGINS; do dirs+=("./plugins/$p"); done
    rm -rf "$SITE"
    if [ ${#wheels[@]} -gt 0 ]; then
        $pip --upgrade "${wheels[@]}" || { echo "gpu.sh: installing the wheels of $WHEELS failed"; exit 100; }
    fi
    $pip --no-build-isolation ./ ./sdk "${dirs[@]}" >/dev/null || { echo "gpu.sh: installing dsr1 failed"; exit 100; }
    export PYTHONPATH=$SITE PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "gpu.sh: no nvidia-smi"
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
}

step() {  # step SECONDS STEP [ARG...]
    local seconds=$1 name=$2; shift 2
    local cmd
    case "$name" in
        dsr1) cmd=(python3 -m dsr1.cli "$@") ;;
        pytest) cmd=(python3 -m pytest -q -p no:cacheprovider "$@") ;;
        *) cmd=(python3 -m "dsr1.benchmarks.$name" "$@") ;;
    esac
    install
    STEPS=$((STEPS + 1))
    local log
    log="$OUT/logs/$(printf %02d "$STEPS")-$name.log"
    echo "== ${cmd[*]}"
    timeout "$seconds" "${cmd[@]}" 2>>"$log" | tee "${STDOUT:-/dev/null}" >>"$log"
    local code=${PIPESTATUS[0]}
    grep -v -i warning "$log" | cut -c1-400 | tail -n "$TAIL"
    if [ "$code" -ne 0 ]; then
        FAILED=$((FAILED + 1))
        echo "== failed with exit code $code$([ "$code" -eq 124 ] && echo " (timed out after $seconds s)"): ${cmd[*]}"
    fi
}

if [ $# -eq 0 ]; then
    sed -n '2,/^set /p' "$0" | sed '$d' | cut -c3-
    exit 2
fi
if [ -f "bench/configs/$1.sh" ]; then
    config=$1; shift
    . "bench/configs/$config.sh"
else
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do
        case "$1" in
            -w) WHEELS=$2 ;;
            -p) PLUGINS=$2 ;;
            -t) TIMEOUT=$2 ;;
            -n) TAIL=$2 ;;
            *) echo "gpu.sh: no config bench/configs/$1.sh and no option $1 (bash bench/gpu.sh for help)"; exit 2 ;;
        esac
        shift 2
    done
    [ "${1:-}" = "--" ] && [ $# -ge 2 ] || { echo "gpu.sh: give -- STEP [ARG...] after the options"; exit 2; }
    shift
    step "$TIMEOUT" "$@"
fi
exit "$FAILED"
