#!/usr/bin/env bash
# Every GPU measurement docs/speed.md asks for, in one call of about 6 minutes, for a session
# that has a GPU for a few minutes:
#     bash docs/gpu_checks.sh OUT_DIR [CIFAR_ZIP]
# Writes one text file per check into OUT_DIR and prints their tables. bench.py times train.py's
# own build() and train_step(); --profile adds where the compiled step's GPU time goes. The last
# check trains DiT-S/2 on CIFAR-10 with train.py itself for 300 steps (its JPEG copy, unzipped
# from CIFAR_ZIP; skipped without it), to show the real command runs on a GPU. Nothing here is
# needed for CI or the tests.
set -u
out=${1:-gpu_results}
zip=${2:-}
py=${PYTHON:-python3}          # the device image's python3 holds its PyTorch
cifar=${CIFAR_DIR:-/tmp/cifar} # where CIFAR_ZIP is unzipped
e2e=${WORK:-/tmp/e2e}          # train.py's run directory
export PYTHONUNBUFFERED=1
mkdir -p "$out"
{ nvidia-smi; $py -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } \
    > "$out/env.txt" 2>&1
tail -1 "$out/env.txt"

check() {   # check NAME SECONDS COMMAND...: run it with a time limit, keep its output and exit status
    local name=$1 limit=$2; shift 2
    echo "== $name: $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    echo "exit status $? after $((SECONDS - t0)) s" >> "$out/$name.txt"
    grep -E '^(\||device|DiT|profile|exit|step|Traceback|[A-Za-z]*Error)' "$out/$name.txt"
}
# The targets: S/2 >= 40% MFU, B/2 >= 50%, dispersive overhead <= 1%, 50K S/2 samples (50 Euler steps) <= 90 s
check s2 200 $py bench.py --model DiT-S/2 --compile --warmup 3 --sample-batch 1024 --sample-batches 2 --profile 5
check b2 130 $py bench.py --model DiT-B/2 --compile --warmup 3 --sample-batches 0 --profile 3
if [ -n "$zip" ]; then
    rm -rf "$cifar" && $py -m zipfile -e "$zip" "$cifar"
    check train 90 $py train.py --data folder --data-path "$cifar/train" --model DiT-S/2 --batch-size 256 \
        --steps 300 --log-every 50 --sample-every 300 --ckpt-every 300 --out "$e2e" --device cuda
    cp "$e2e/metrics.jsonl" "$out/train_metrics.jsonl" 2>/dev/null
    cp "$e2e/samples/step_0000300.png" "$out/train_grid.png" 2>/dev/null
fi
# B/2 with Inductor's max-autotune (Triton matrix-product templates that can take in the elementwise
# work around them: docs/speed.md's candidate for the 50% target; it compiles for minutes): when asked
if [ -n "${AUTOTUNE:-}" ]; then
    check b2_autotune 400 $py bench.py --model DiT-B/2 --compile --compile-mode max-autotune-no-cudagraphs \
        --warmup 3 --sample-batches 0
fi
# MeanFlow's step (its JVP) and 1-step sampling: only when the session has time for it
if [ -n "${MEANFLOW:-}" ]; then
    check s2_meanflow 180 $py bench.py --model DiT-S/2 --objective meanflow --compile --warmup 3 --sample-batch 1024
fi
