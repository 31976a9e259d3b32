#!/usr/bin/env bash
# The baseline against the dispersive loss on CIFAR-10, DiT-S/2, in one GPU call of at most
# 9 minutes, for a session that has one H100/H200 for a few minutes:
#     bash docs/gpu_ab.sh OUT_DIR .data/cifar10-train-jpeg.zip
# The zip holds CIFAR-10's 50,000 training images as JPEG files (quality 75), train/<class>/*.jpg,
# 54 MB: small enough to travel to a device machine that reaches no data host. From torchvision's
# copy, on a machine that has internet:
#     mkdir -p .data && python -c "import os, torchvision
#     d = torchvision.datasets.CIFAR10('data', train=True, download=True)
#     for i, (im, y) in enumerate(d):
#         os.makedirs(f'cifar10/train/{d.classes[y]}', exist_ok=True)
#         im.save(f'cifar10/train/{d.classes[y]}/{i:05d}.jpg', quality=75)"
#     python -m zipfile -c .data/cifar10-train-jpeg.zip cifar10/train
# 1. unzips the CIFAR-10 JPEG copy to /tmp/cifar and trains both arms at once on the one GPU
#    with train.py (--compile): --disp-weight 0 and the paper's 0.5 (tau 0.5, block depth // 4,
#    groups of 16: train.py's defaults), the same seed, steps and every other flag; meanwhile
#    fid.py --train-classifier trains the small classifier of the FD-classifier;
# 2. scores both runs with ab.py --compare: the EMA model's loss on a fixed batch, the logged
#    dispersion diagnostics, and the FD-classifier of 10K EMA samples (50 Euler steps) against
#    the 50K training images; beside it, at the same time, a linear probe (ab.py --probe): its
#    forward passes on the GPU, its L-BFGS fits on the CPU (probe.py; on the GPU, beside the
#    sampling, they did not finish in 203 s);
# 3. writes to OUT_DIR (at most 8 files, no checkpoints): ab.md (the table, with steps, images
#    seen and epochs), ab.json, probe.md (if the probe ran), grid_{baseline,dispersive}.png (the
#    last grid of each run), metrics_{baseline,dispersive}.jsonl and log.txt; prints ab.md last.
# FD-classifier is NOT FID, and no FID is computed: torch-fidelity's Inception weights
# (weights-inception-2015-12-05, over 90 MB) cannot be downloaded on the device machine (no internet)
# nor carried there (64 MiB in all), so FID-10K is not possible in this call. FD-classifier
# compares these two runs with each other only.
# Every phase runs under `timeout`, against one deadline (BUDGET seconds after the start): a
# training cut short saves a checkpoint at the step it reached (train.py stops cleanly on
# SIGTERM) and is scored there; if the scoring runs out of time, the metrics, grids and log are
# in OUT_DIR already.
#
# Step budget: 540 s in all. Measured on one NVIDIA H200 (torch 2.11) on 2026-11-27, in this
# script's first run (README, "CIFAR-10 on one H200"): the unzip 8 s; both trainings ran 300 s
# from launch to their last checkpoint, of which about 72 s were start-up (imports, decoding the
# 50K JPEGs, each process compiling its graph, the two at once) and the rest 2800 steps at 3137
# (baseline) and 3013 (dispersive) images/s while both ran: together 92% of what one process
# alone gets (bench.py, the same card: 6713); the classifier was done at 54 s; the scoring took 123 s.
# The probe, run after the scoring then, was cut at its 80 s limit: it now runs beside the scoring.
# The second run (SEED=1, commit c382404, the same card): both trainings 300 s again, the scoring
# 148 s with the probe beside it (its fits then on the GPU; cut at 203 s), the whole call 519 s.
#   MARGIN = 15 s at the end (copying, the summary); the unzip, ~15 s;
#   SCORE_S = 150 s for the scoring (123 measured; the probe beside it);
#   GRACE = 10 s: a training cut by `timeout` finishes its step and saves a checkpoint;
#   the training gets the rest, 350 s, of which STARTUP_S = 90 s are start-up (72 measured);
#   the rest less SPARE = 15 s, STEP_S = 245 s, runs steps at IMG_S = 3010 images/s, the slower
#     arm's -> 245 s x 3010 / 256 = 2880 steps -> STEPS = 2800 (rounded down to 100): 717K images,
#     14.3 epochs of the 50K, per arm. Rather a few steps fewer than a cut: a run stopped by the
#     time limit has no final grid, and the two arms would stop at different steps.
# Schedule for ~3000 steps (the same for both arms): lr 1e-4 constant, as the paper, but
# --warmup-steps 0 (the paper states a constant lr 1e-4, as DiT and SiT train; train.py's default 1000 would spend a third
# of this run below the full rate; --grad-clip stays at train.py's 1.0, which guards the
# start). The EMA keeps --ema-decay 0.9999 with train.py's ramp min(decay, (1+s)/(10+s)): the
# ramp rules the whole run (0.9999 is reached at s ~ 90K), at s = 2800 the decay is 0.9968 and
# the EMA weighs step k as ~ 9 (k/s)^8: about the last 20% of the run (87% of its weight), a
# sensible average here, whereas a constant 0.9999 (a 10K-step memory) would not be.
#
# Everything can be changed by environment variables (below), e.g. the CPU check of this script,
# about 3 minutes on 2 cores (DEVICE=cpu turns --compile off and trains the classifier 1 epoch):
#     MODEL=DiT-Mi/4 STEPS=20 BATCH=32 EVAL_SAMPLES=64 DEVICE=cpu PROBE_TRAIN=500 PROBE_TEST=200 \
#         OMP_NUM_THREADS=1 bash docs/gpu_ab.sh /tmp/gab_out .data/cifar10-train-jpeg.zip
set -u
out=${1:?usage: bash docs/gpu_ab.sh OUT_DIR CIFAR_ZIP}
zip=${2:?usage: bash docs/gpu_ab.sh OUT_DIR CIFAR_ZIP}
py=${PYTHON:-python3}           # the device image's python3 holds its PyTorch
export PYTHONUNBUFFERED=1

BUDGET=${BUDGET:-540}           # seconds for the whole script
MARGIN=${MARGIN:-15}            # kept back at the end: copying, the summary
SCORE_S=${SCORE_S:-150}         # kept back for the scoring (ab.py) after the training
GRACE=${GRACE:-10}              # for a training cut by the time limit to save its checkpoint
STARTUP_S=${STARTUP_S:-90}      # training start-up: imports, JPEG decoding, compiling (72 s measured)
IMG_S=${IMG_S:-3010}            # images/s of the slower of the two training processes (measured)
BATCH=${BATCH:-256}
STEP_S=$(( BUDGET - MARGIN - 15 - SCORE_S - GRACE - STARTUP_S - 15 ))   # 245 s of steps (15: unzip, spare)
STEPS=${STEPS:-$(( STEP_S * IMG_S / BATCH / 100 * 100 ))}                  # 2800
MODEL=${MODEL:-DiT-S/2}
SEED=${SEED:-0}
DISP_WEIGHT=${DISP_WEIGHT:-0.5} # the paper's lambda for the dispersive arm
WARMUP=${WARMUP:-0}
LOG_EVERY=${LOG_EVERY:-50}
TRAIN_FLAGS=${TRAIN_FLAGS:-}    # more train.py flags for both arms, e.g. the paper's optimiser:
                                # TRAIN_FLAGS="--adam-beta2 0.95 --grad-clip 0" (train.py's defaults: 0.999, 1.0)
SAMPLE_EVERY=${SAMPLE_EVERY:-$STEPS}   # a grid at the end
DEVICE=${DEVICE:-cuda}
on_gpu=0; case $DEVICE in cuda*) on_gpu=1 ;; esac
COMPILE=${COMPILE:-$on_gpu}     # off on a CPU: compiling there takes minutes
EVAL_SAMPLES=${EVAL_SAMPLES:-10000}
EVAL_DEVICE=${EVAL_DEVICE:-$DEVICE}
CLF=${CLF:-}                    # an FD-classifier .pt to use instead of training one
CLF_EPOCHS=${CLF_EPOCHS:-$(( on_gpu ? 10 : 1 ))}   # fid.py --classifier-epochs (0: one step, a smoke test)
CLF_DEVICE=${CLF_DEVICE:-$DEVICE}
PROBE=${PROBE:-1}               # the linear probe, beside the scoring (0: none)
PROBE_T=${PROBE_T:-0.9}
PROBE_TRAIN=${PROBE_TRAIN:-5000}   # images the probe is fitted on, and scored on (ab.py's defaults)
PROBE_TEST=${PROBE_TEST:-2000}
CIFAR=${CIFAR_DIR:-/tmp/cifar}  # the unzipped copy: $CIFAR/train/<class>/NNNN.jpg
WORK=${WORK:-/tmp/gab}          # run directories, logs, the classifier

t0=$SECONDS
left() { echo $(( BUDGET - MARGIN - (SECONDS - t0) )); }
atleast() { [ "$1" -gt "$2" ] && echo "$1" || echo "$2"; }   # timeout 0 would mean no limit
say() { echo "[$(( SECONDS - t0 )) s] $*"; }
clean_log() {   # a process's log without tqdm's redraws: its other lines, then its last progress line
    [ -f "$1" ] || return 0
    tr '\r' '\n' < "$1" | grep -av -E '\| *[0-9]+/[0-9]+ \[|^ *$'
    tr '\r' '\n' < "$1" | grep -a -E '\| *[0-9]+/[0-9]+ \[' | tail -1
}
write_log() {   # the one log file of OUT_DIR, rebuilt after every phase
    { for f in env unzip baseline dispersive classifier score probe; do
          [ -f "$WORK/$f.log" ] && { echo "===== $f"; clean_log "$WORK/$f.log"; }
      done
      for j in "$WORK"/*/checkpoints/*.probe.json; do
          [ -f "$j" ] && { echo "===== $j"; cat "$j"; echo; }
      done
    } > "$out/log.txt"
}

mkdir -p "$out"
rm -rf "$WORK" && mkdir -p "$WORK"
{ date -u; nvidia-smi 2>&1 | head -15
  $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  echo "MODEL=$MODEL STEPS=$STEPS BATCH=$BATCH SEED=$SEED DISP_WEIGHT=$DISP_WEIGHT WARMUP=$WARMUP DEVICE=$DEVICE" \
       "TRAIN_FLAGS=$TRAIN_FLAGS" \
       "COMPILE=$COMPILE EVAL_SAMPLES=$EVAL_SAMPLES CLF_EPOCHS=$CLF_EPOCHS BUDGET=$BUDGET"
} > "$WORK/env.log" 2>&1
tail -2 "$WORK/env.log"

# --- 1. the data: the JPEG copy, unzipped once ------------------------------------------------
if [ ! -d "$CIFAR/train" ]; then
    rm -rf "$CIFAR.part"
    timeout 120 $py -m zipfile -e "$zip" "$CIFAR.part" > "$WORK/unzip.log" 2>&1 \
        && rm -rf "$CIFAR" && mv "$CIFAR.part" "$CIFAR"
fi
n_images=$(find "$CIFAR/train" -name '*.jpg' 2>/dev/null | wc -l)
say "data: $n_images images in $CIFAR/train"
if [ "$n_images" -eq 0 ]; then
    echo "no images: cannot train" | tee -a "$WORK/unzip.log"; write_log; exit 1
fi

# --- 2. both arms at once on the one GPU, and the FD-classifier beside them -------------------
train_limit=$(atleast $(( $(left) - SCORE_S - GRACE )) 30)
compile_flag=(); [ "$COMPILE" = 1 ] && compile_flag=(--compile)
say "training 2 x $STEPS steps of $MODEL, batch $BATCH, at most $train_limit s"
pids=()
for arm in baseline dispersive; do
    w=0; [ "$arm" = dispersive ] && w=$DISP_WEIGHT
    timeout -k 15 "$train_limit" $py train.py --data folder --data-path "$CIFAR/train" --model "$MODEL" \
        --batch-size "$BATCH" --steps "$STEPS" --warmup-steps "$WARMUP" --seed "$SEED" --disp-weight "$w" \
        --log-every "$LOG_EVERY" --sample-every "$SAMPLE_EVERY" --ckpt-every "$STEPS" --keep-ckpts 1 \
        --device "$DEVICE" ${compile_flag[@]+"${compile_flag[@]}"} $TRAIN_FLAGS --out "$WORK/$arm" \
        < /dev/null > "$WORK/$arm.log" 2>&1 &
    pids+=($!)
done
clf=$CLF
if [ -z "$clf" ]; then
    clf=$WORK/clf.pt
    ( timeout -k 5 "$train_limit" $py fid.py --train-classifier "$clf" --ref-data folder \
          --ref-data-path "$CIFAR/train" --classifier-epochs "$CLF_EPOCHS" --device "$CLF_DEVICE" < /dev/null
      s=$?; echo "exit status $s after $(( SECONDS - t0 )) s from the start of the script"; exit $s
    ) > "$WORK/classifier.log" 2>&1 &
    clf_pid=$!
fi
last=$SECONDS
while kill -0 "${pids[0]}" 2>/dev/null || kill -0 "${pids[1]}" 2>/dev/null; do
    sleep 2
    if [ $(( SECONDS - last )) -ge 60 ]; then       # a heartbeat a minute: each arm's progress bar
        last=$SECONDS
        for arm in baseline dispersive; do
            say "$arm: $(tr '\r' '\n' < "$WORK/$arm.log" | grep -a -E '\| *[0-9]+/[0-9]+ \[' | tail -1)"
        done
    fi
done
rc=()
for i in 0 1; do wait "${pids[$i]}"; rc+=($?); done
say "training ended: exit status baseline ${rc[0]}, dispersive ${rc[1]} (124: cut by the time limit)"
if [ -z "$CLF" ]; then
    wait "$clf_pid"; say "classifier: $(grep -a -E 'held-out|exit status' "$WORK/classifier.log" | tr '\n' ' ')"
fi
runs=()
for arm in baseline dispersive; do
    cp "$WORK/$arm/metrics.jsonl" "$out/metrics_$arm.jsonl" 2>/dev/null
    grid=$(ls "$WORK/$arm"/samples/step_*.png 2>/dev/null | tail -1)
    [ -n "$grid" ] && cp "$grid" "$out/grid_$arm.png"
    say "$arm: last grid ${grid:-none}; checkpoint $(ls "$WORK/$arm"/checkpoints/ 2>/dev/null | tail -1)"
    # scored: a run with a checkpoint (ab.py refuses to sample one without); ab.md lists the others
    ls "$WORK/$arm"/checkpoints/step_*.pt > /dev/null 2>&1 && runs+=("$WORK/$arm")
    grep -a -E 'Error|error:|stopped by' "$WORK/$arm.log" | tail -3
done
write_log

# --- 3. the scores (FD-classifier of EVAL_SAMPLES EMA samples), and the probe beside them ------
eval_flags=()
if [ "$EVAL_SAMPLES" -gt 0 ] && [ -s "$clf" ]; then
    eval_flags=(--eval-samples "$EVAL_SAMPLES" --extractor "$clf")
elif [ "$EVAL_SAMPLES" -gt 0 ]; then
    say "no classifier ($clf): scoring without the FD-classifier"
fi
if [ ${#runs[@]} -gt 0 ]; then
    limit=$(atleast $(( $(left) - 10 )) 10)
    beside=""; [ "$PROBE" = 1 ] && beside=", and the probe (t = $PROBE_T) beside it"
    say "scoring ${#runs[@]} run(s)$beside, at most $limit s"
    timeout -k 10 "$limit" $py ab.py --compare "${runs[@]}" --root "$WORK/ab" --eval-device "$EVAL_DEVICE" \
        ${eval_flags[@]+"${eval_flags[@]}"} < /dev/null > "$WORK/score.log" 2>&1 &
    score_pid=$!
    if [ "$PROBE" = 1 ]; then   # the two write to different roots; the probe's JSON lies beside each checkpoint
        timeout -k 10 "$limit" $py ab.py --compare "${runs[@]}" --root "$WORK/probe" --probe --probe-t "$PROBE_T" \
            --probe-train-samples "$PROBE_TRAIN" --probe-test-samples "$PROBE_TEST" --eval-device "$EVAL_DEVICE" \
            < /dev/null > "$WORK/probe.log" 2>&1 &
        probe_pid=$!
    fi
    wait "$score_pid"; say "scoring: exit status $?"
    cp "$WORK/ab/ab.json" "$out/ab.json" 2>/dev/null
    if [ "$PROBE" = 1 ]; then
        wait "$probe_pid"; say "probe: exit status $? (124: cut by the time limit)"
        cp "$WORK/probe/ab.md" "$out/probe.md" 2>/dev/null
    fi
else
    say "no run has a checkpoint: nothing to score"
fi
write_log

# --- 4. ab.md: what each arm trained (steps, images seen, epochs), then ab.py's table ----------
$py - "$WORK" "$n_images" "$EVAL_SAMPLES" "$clf" > "$out/ab.md" <<'EOF'
import os, sys
from plots import read_log      # the project's reader of metrics.jsonl (it skips a torn last line)
from rundir import checkpoint_step, list_checkpoints
work, n_images, eval_samples, clf = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
print("# Baseline vs dispersive loss: CIFAR-10 (the JPEG copy), docs/gpu_ab.sh\n")
scored = {}
for arm in ("baseline", "dispersive"):
    run = os.path.join(work, arm)
    config, train, _ = read_log(run) if os.path.exists(os.path.join(run, "metrics.jsonl")) else (None, [], [])
    if not config or not train:
        print(f"- {arm}: no training log")
        continue
    a = config["args"]
    ckpts = list_checkpoints(run)                                   # newest first
    step = scored[arm] = checkpoint_step(ckpts[0]) if ckpts else train[-1]["step"]    # the one ab.py scores
    seen = step * a["batch_size"]
    ips = [l["img_per_s"] for l in train[1:]] or [train[-1]["img_per_s"]]   # the first holds the compile
    print(f"- {arm}: {a['model']}, --disp-weight {a['disp_weight']:g} (tau {a['disp_tau']:g}, block(s) "
          f"{config.get('disp_blocks')}, groups of {a['disp_group_size']}), seed {a['seed']}: {step} of {a['steps']} "
          f"steps{'' if ckpts else ' (no checkpoint)'} x batch {a['batch_size']} = {seen:,} images seen = "
          f"{seen / max(n_images, 1):.2f} epochs of {n_images:,}; lr {a['lr']:g}, warm-up {a['warmup_steps']}, "
          f"AdamW beta2 {a['adam_beta2']:g}, EMA {a['ema_decay']} (ramped), compile {a['compile']}; "
          f"{sum(ips) / len(ips):.0f} img/s after the first log line; {config.get('device')}")
    norms = [l["grad_norm"] for l in train if "grad_norm" in l]       # logged before clipping
    if norms:
        clip = a["grad_clip"]
        print(f"  gradient norm before clipping: {norms[0]:.3g} at the first log step, {norms[-1]:.3g} at the last; "
              + (f"above --grad-clip {clip:g} at {sum(n > clip for n in norms)} of {len(norms)} log steps"
                 if clip > 0 else "no clipping"))
if len(set(scored.values())) > 1:
    print(f"\nWARNING: the arms stopped at different steps {scored} (the time limit cut them): not an equal-budget "
          f"comparison.")
if eval_samples and os.path.exists(clf):
    import torch
    ck = torch.load(clf, map_location="cpu", weights_only=True)
    print(f"\nFD-classifier-{eval_samples}: Frechet distance of {eval_samples} EMA samples (50 Euler steps, no "
          f"guidance) to the {n_images:,} training images in the 128-d features of fid.py's small classifier "
          f"(held-out accuracy {ck.get('held_out_accuracy', float('nan')):.3f}, {ck.get('epochs')} epoch(s)). "
          f"It is not FID: torch-fidelity's Inception weights cannot reach the device machine (no internet).")
table = os.path.join(work, "ab", "ab.md")
print("\n" + (open(table).read() if os.path.exists(table) else "(no table: the scoring did not finish; see log.txt)"))
EOF
say "done; OUT_DIR holds: $(cd "$out" && ls | tr '\n' ' ')"
echo
cat "$out/ab.md"
[ -f "$out/probe.md" ] && { echo; echo "linear probe (ab.py --probe --probe-t $PROBE_T):"; cat "$out/probe.md"; }
exit 0
