"""The A/B: the baseline (--disp-weight 0) against the dispersive run, same seeds, same data.

    python ab.py --steps 20000 --seeds 0,1,2 --root runs/ab -- --data cifar10 --model DiT-S/2
    python ab.py --compare runs/ab/w0_s0 runs/ab/w0.5_s0 ...        # existing runs, no training

For each seed both arms are trained with train.py's own main(): the weights, the data order
and every step's noise are functions of (seed, step), so the two arms differ only in the
regulariser. Each run is then evaluated the same way and a markdown table (mean and std over
seeds, and the paired per-seed difference) is printed and written to <root>/ab.md, with
<root>/ab.json and a plot of the flow loss against steps, <root>/ab.png.

Columns: the training flow loss (mean of the last 10 log lines), the EMA model's flow loss on
a fixed evaluation batch (the same images, noise and times for every run; it is the training
objective, so lower is better, but it is not sample quality), the diagnostics of the
regularised block (dispersive loss value and mean pairwise squared distance / d, logged even
for the baseline), and with --eval-samples a Frechet distance of EMA samples (fid.py): FID with
the Inception extractor, FD-classifier with a classifier .pt (offline; not FID).
A run directory that already holds the final checkpoint is not trained again.
"""
import argparse
import json
import os

import numpy as np
import torch

import fid
import train
from data import load_dataset
from loss import training_losses
from utils import UserError, build_from_checkpoint, list_checkpoints, load_checkpoint, pick_device, run_main


def read_log(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir!r} is not a run directory (no metrics.jsonl)")
    with open(path) as f:
        recs = [json.loads(l) for l in f if l.strip()]
    if not recs or recs[0].get("type") != "config":
        raise UserError(f"{path!r} does not start with a config line")
    return recs[0], [r for r in recs if r.get("type") == "train"], [r for r in recs if r.get("type") == "fid"]


@torch.no_grad()
def ema_flow_loss(model, data, n=1024, seed=12345, batch=256, device="cpu"):
    """Flow loss of a model on a fixed batch: the same images, noise, times (and no dropped
    labels) for every run, so arms are compared on identical terms."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[:n]
    total = 0.0
    for i in range(0, len(idx), batch):
        x, y = (v.to(device) for v in data.batch(idx[i:i + batch], generator=g))   # latents: seeded posterior noise
        eps = torch.randn(x.shape, generator=g).to(device)      # drawn on the CPU: the same on every device
        t = torch.rand(len(x), generator=g).to(device)
        y = y if model.num_classes else torch.zeros_like(y)
        total += training_losses(model, x, y, disp_weight=0, eps=eps, t=t, p_uncond=0)["flow"].item() * len(x)
    return total / len(idx)


def evaluate(run_dir, args, cache):
    """One run's row: numbers from its log, plus evaluations of its newest checkpoint."""
    config, logs, fid_logs = read_log(run_dir)
    if not logs:
        raise UserError(f"{run_dir!r} has no training log lines")
    cargs = config["args"]
    row = {"run": run_dir, "disp_weight": cargs["disp_weight"], "seed": cargs["seed"], "step": logs[-1]["step"],
           "flow": float(np.mean([r["flow"] for r in logs[-10:]])),
           "disp_diag": logs[-1].get("disp_diag"), "mean_sq_dist": logs[-1].get("mean_sq_dist")}
    if fid_logs:
        row["periodic_" + fid_logs[-1]["metric"]] = fid_logs[-1]["value"]
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return row
    key = (cargs["data"], cargs["data_path"], cargs.get("image_size"))
    if key not in cache:                    # one data set (and reference) per distinct data
        cache[key] = {"data": load_dataset(*key)}
    data = cache[key]["data"]
    dev = args.device
    model = build_from_checkpoint(load_checkpoint(ckpts[0]), "ema").to(dev).eval()
    row["ema_flow"] = ema_flow_loss(model, data, device=dev)
    if args.eval_samples:
        if getattr(data, "images", None) is None:
            raise UserError(f"--eval-samples: {run_dir} trained on latents; score its checkpoints with fid.py --ckpt")
        if "ref" not in cache[key]:
            fn, info = fid.load_extractor(args.extractor, args.inception_weights, dev)
            mu, sigma = (fid.statistics(fid.features(fn, data.images, device=dev)) if not args.ref_stats
                         else fid.reference_stats(fn, info, stats_path=args.ref_stats)[:2])
            cache[key]["ref"] = (fn, info, mu, sigma)
        fn, info, mu, sigma = cache[key]["ref"]
        images = fid.generate_n(model, args.eval_samples, steps=args.sample_steps, seed=args.sample_seed, device=dev)
        row[fid.fid_name(info, args.eval_samples)] = fid.frechet_distance(
            *fid.statistics(fid.features(fn, images, device=dev)), mu, sigma)
    return row


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.4g}"
    return f"{np.mean(xs):.4g} ± {np.std(xs, ddof=1):.2g}"


def table(rows):
    """Markdown: one line per arm (mean ± std over seeds) and the paired difference."""
    metrics = [k for k in rows[0] if k not in ("run", "disp_weight", "seed", "step")]
    metrics += [k for r in rows for k in r if k not in metrics and k not in ("run", "disp_weight", "seed", "step")]
    arms = sorted({r["disp_weight"] for r in rows})
    lines = ["| arm | seeds | steps | " + " | ".join(metrics) + " |", "|" + " --- |" * (3 + len(metrics))]
    by_arm = {w: sorted((r for r in rows if r["disp_weight"] == w), key=lambda r: r["seed"]) for w in arms}
    for w in arms:
        rs = by_arm[w]
        name = "baseline (w=0)" if w == 0 else f"dispersive (w={w:g})"
        steps = sorted({r["step"] for r in rs})
        lines.append(f"| {name} | {','.join(str(r['seed']) for r in rs)} | {','.join(map(str, steps))} | "
                     + " | ".join(mean_std([r.get(m) for r in rs]) for m in metrics) + " |")
    if 0 in by_arm:
        for w in arms[1:]:    # paired over the seeds both arms have: the seed's noise cancels
            base = {r["seed"]: r for r in by_arm[0]}
            pairs = [(base[r["seed"]], r) for r in by_arm[w] if r["seed"] in base]
            if pairs:
                diffs = [mean_std([d[m] - b[m] if b.get(m) is not None and d.get(m) is not None else None
                                   for b, d in pairs]) for m in metrics]
                lines.append(f"| Δ (w={w:g}) - baseline, paired | {','.join(str(b['seed']) for b, _ in pairs)} | | "
                             + " | ".join(diffs) + " |")
    return "\n".join(lines)


def plot(run_dirs, path, key="flow"):
    """Flow loss against steps, mean over seeds, one line per arm; drawn with PIL alone."""
    from PIL import Image, ImageDraw
    curves = {}
    for d in run_dirs:
        config, logs, _ = read_log(d)
        curves.setdefault(config["args"]["disp_weight"], []).append({r["step"]: r[key] for r in logs})
    series = {}
    for w, runs in sorted(curves.items()):
        steps = sorted(set.intersection(*(set(c) for c in runs)))
        series[w] = [(s, float(np.mean([c[s] for c in runs]))) for s in steps]
    pts = [p for s in series.values() for p in s]
    if len(pts) < 2:
        return None
    W, H, m = 640, 400, 50
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    ys = sorted(p[1] for p in pts)
    y0, y1 = ys[0], ys[int(0.95 * (len(ys) - 1))]    # clip the first steps' spike
    sx = lambda s: m + (W - 2 * m) * (s - x0) / max(x1 - x0, 1)
    sy = lambda v: H - m - (H - 2 * m) * (min(v, y1) - y0) / max(y1 - y0, 1e-12)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([m, m, W - m, H - m], outline="black")
    d.text((m, H - m + 8), f"step {x0}", fill="black")
    d.text((W - m - 60, H - m + 8), f"step {x1}", fill="black")
    d.text((4, m - 14), f"{key} {y1:.4g}", fill="black")
    d.text((4, H - m - 2), f"{y0:.4g}", fill="black")
    for i, (w, s) in enumerate(series.items()):
        color = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")[i % 4]
        d.line([(sx(a), sy(b)) for a, b in s], fill=color, width=2)
        d.text((W - m - 150, m + 8 + 14 * i), ("baseline (w=0)" if w == 0 else f"dispersive (w={w:g})"), fill=color)
    img.save(path)
    return path


def main(argv=None):
    # allow_abbrev off: train.py flags after "--" must never be taken for a prefix of ours
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    a = p.add_argument
    a("--steps", type=int, default=None, help="training budget in steps, per run (needed unless --compare)")
    a("--seeds", default="0", help="comma-separated seeds; each trains both arms")
    a("--disp-weight", type=float, default=0.5, help="lambda of the dispersive arm (the baseline arm has 0)")
    a("--root", default="runs/ab", help="where the runs (<root>/w<weight>_s<seed>) and ab.md, ab.json, ab.png go")
    a("--compare", nargs="+", default=None, metavar="RUN_DIR", help="evaluate these existing run directories; no training")
    a("--eval-samples", type=int, default=0, help="EMA samples per run for a Frechet distance (0: none)")
    a("--extractor", default=fid.INCEPTION, help="feature extractor for it (fid.py --extractor): Inception (FID) "
      "or a classifier .pt (FD-classifier, offline, not FID)")
    a("--inception-weights", default=None, help="local Inception weights file (offline)")
    a("--ref-stats", default=None, help="reference statistics .npz (default: computed from each run's training data)")
    a("--sample-steps", type=int, default=None, help="solver steps for the evaluation samples (default: 50 Euler "
      "steps; 1 jump for --objective meanflow runs)")
    a("--sample-seed", type=int, default=0, help="noise seed for the evaluation samples (the same for every run)")
    a("--eval-device", default="auto", help="device for the evaluation: auto, cpu, cuda, cuda:N, mps")
    args, train_args = p.parse_known_args(argv)
    if args.sample_steps is not None and args.sample_steps < 1:
        raise UserError(f"--sample-steps must be at least 1, got {args.sample_steps}")
    if train_args and train_args[0] == "--":
        train_args = train_args[1:]
    if any(a.split("=")[0] in ("--seed", "--steps", "--disp-weight", "--out", "--resume") for a in train_args):
        raise UserError("ab.py sets --seed, --steps, --disp-weight, --out and --resume itself; use its own flags")
    if args.eval_samples and args.eval_samples < 2:
        raise UserError(f"--eval-samples must be 0 or at least 2, got {args.eval_samples}")

    if args.compare:
        run_dirs = args.compare
    else:
        if args.steps is None or args.steps < 1:
            raise UserError("give --steps (the training budget), or --compare RUN_DIR ...")
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
        if args.disp_weight <= 0:
            raise UserError("--disp-weight must be > 0: it is the dispersive arm's lambda")
        run_dirs = []
        for seed in seeds:
            for w in (0.0, args.disp_weight):
                out = os.path.join(args.root, f"w{w:g}_s{seed}")
                run_dirs.append(out)
                have = list_checkpoints(out)
                if have and load_checkpoint(have[0]).get("step") == args.steps:
                    print(f"{out}: already trained to step {args.steps}")
                    continue
                print(f"--- training {out} (disp-weight {w:g}, seed {seed}, {args.steps} steps)")
                train.main([*train_args, "--steps", str(args.steps), "--seed", str(seed), "--disp-weight", str(w),
                            "--out", out] + (["--resume"] if have else []))
                done = list_checkpoints(out)
                if not done or load_checkpoint(done[0]).get("step") != args.steps:   # stopped by a signal
                    raise UserError(f"{out} stopped before step {args.steps}; run the same command again to continue")

    args.device = pick_device(args.eval_device)
    cache = {}
    rows = [evaluate(d, args, cache) for d in run_dirs]
    md = table(rows)
    os.makedirs(args.root, exist_ok=True)
    with open(os.path.join(args.root, "ab.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.root, "ab.json"), "w") as f:
        json.dump({"rows": rows, "train_args": train_args, "steps": args.steps, "eval_samples": args.eval_samples,
                   "extractor": args.extractor if args.eval_samples else None}, f, indent=1)
    png = plot(run_dirs, os.path.join(args.root, "ab.png"))
    print(md)
    print(f"wrote {os.path.join(args.root, 'ab.md')}, ab.json" + (", ab.png" if png else ""))
    return rows


if __name__ == "__main__":
    run_main(main)
