#!/usr/bin/env bash
# Every GPU measurement docs/speed.md asks for, in one call, for a session that has a GPU for a
# few minutes:
#     bash docs/gpu_checks.sh OUT_DIR        # 3 checks, each capped at 180 s: under 10 minutes in all
# Writes one text file per check into OUT_DIR and prints their tables. bench.py times train.py's
# own build() and train_step(). Nothing here is needed for CI or the tests.
set -u
out=${1:-gpu_results}
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" > "$out/nvidia-smi.txt"
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" > "$out/versions.txt" 2>&1

check() {   # check NAME COMMAND...: run it with a time limit, keep its output and exit status
    local name=$1; shift
    echo "== $name: $*"
    timeout 180 "$@" > "$out/$name.txt" 2>&1
    echo "exit status $?" >> "$out/$name.txt"
    grep -E '^(\||device|DiT|exit)' "$out/$name.txt"
}
# The targets: S/2 >= 40% MFU, B/2 >= 50%, dispersive overhead <= 1%, 50K S/2 samples (50 Euler steps) <= 90 s
check s2_compile python bench.py --model DiT-S/2 --compile --sample-batch 1024 --sample-batches 2
check b2_compile python bench.py --model DiT-B/2 --compile --sample-batches 0
# MeanFlow: the cost of its JVP step, and 1-step sampling
check s2_meanflow python bench.py --model DiT-S/2 --objective meanflow --compile --sample-batch 1024
