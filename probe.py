"""Linear probe: what each block's output knows about the image's class, next to how dispersed it
is and how large it has grown.

    python probe.py --ckpt runs/fmnist/checkpoints/step_0001500.pt      # all blocks, t = 0.9 and 0.5
    python probe.py --ckpt runs/fmnist --blocks 1,3 --t 0.9             # a run directory: its newest checkpoint

The dispersive loss only pushes a block's outputs apart. Whether that makes the representation
more useful (the paper's argument, as REPA's) is asked here the usual way: a linear classifier
on frozen features. For each block and noise level t, the EMA model's block output on noised
training images, mean-pooled over tokens to (B, C), feeds a multinomial logistic regression
fitted on one split and scored (top-1) on held-out images of the same training set. Each row
also has the block's mean squared pairwise distance / d and mean rms norm (loss.block_stats, the
numbers train.py logs, on the unpooled (B, T*C) outputs of the first --stats-samples training
images): a block can look more "dispersed" only because its activations grew.

The model is given the NULL label (y = num_classes, classifier-free guidance's null class; 0 for
an unconditional model): with the true label in its conditioning, every block would carry the
label through adaLN and a probe would read it back, measuring the label it was given rather than
what the representation knows about the image.

Noise: the input is noised as the checkpoint's objective trains (its noised(x, eps, t)): t = 1
is data, x_t = t x + (1 - t) eps for flow matching, MeanFlow (called with r = t) and the
contrastive comparison; 0.9 is nearly clean, 0.5 the middle. Diffusion checkpoints take the same
t as their time input, DDPM step k = 1000 (1 - t), noised as sqrt(abar_k) x + sqrt(1 - abar_k) eps:
the same t is therefore NOT the same noise level across objectives (t = 0.9: signal-to-noise 81
for flow, about 9 for diffusion). One noise draw eps (seeded) serves every t and block.

For scale: the chance rate (the commonest class of the held-out split) and the same probe on
the model's input x_t itself (the "pixels" row; latents for --data latents). The classifier is
fitted by L-BFGS (up to 500 iterations, on the CPU); its weight decay is chosen per row among
--weight-decay's values by the accuracy on a fifth of the fitting split, so that the 784 pixels
of Fashion-MNIST do not lose by overfitting (at a fixed 1e-4 they fit 100% of the fitting split
and scored 0.78 held out, 0.82 with the choice, at t = 0.9).
Writes a JSON (default <ckpt>.probe.json) that ab.py and plots.py read.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from data import load_dataset
from loss import block_stats, parse_blocks
from objectives import OBJECTIVES
from plots import arm_of
from rundir import resolve_checkpoint
from sample import load_model
from utils import HelpFormatter, UserError, atomic_output, autocast, number, output_file, pick_device, run_main


# ----------------------------------------------------------------------------------------
# The linear classifier
# ----------------------------------------------------------------------------------------

def fit_linear(x, y, num_classes, weight_decay=1e-4, max_iter=500):
    """Multinomial logistic regression by full-batch L-BFGS on features x (N, D) standardised with
    their own mean and std: mean cross-entropy + weight_decay / 2 * ||W||^2 (the bias is not
    decayed; the decay keeps the optimum finite when the classes are separable). Starts from
    zero, so the fit is deterministic (the problem is convex: one optimum). Returns a function
    features -> logits, which standardises with the training split's statistics."""
    x = x.float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)          # constant features (image borders) stay 0
    xs = (x - mean) / std
    W = torch.zeros(x.shape[1], num_classes, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-9,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xs @ W + b, y) + 0.5 * weight_decay * W.pow(2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    W, b = W.detach(), b.detach()
    return lambda f: ((f.float() - mean) / std) @ W + b


def linear_probe(train_x, train_y, test_x, test_y, num_classes, weight_decay=1e-4):
    """(train accuracy, held-out top-1 accuracy, weight decay used) of fit_linear on the training
    split. weight_decay: one value, or several to choose from by the accuracy on the last fifth
    of the training split of a fit on the other four fifths (then refitted on all of it)."""
    acc = lambda classify, x, y: (classify(x).argmax(1) == y).float().mean().item()
    wds = list(weight_decay) if isinstance(weight_decay, (list, tuple)) else [weight_decay]
    if len(wds) > 1:
        n = len(train_x) * 4 // 5
        val = [acc(fit_linear(train_x[:n], train_y[:n], num_classes, wd), train_x[n:], train_y[n:]) for wd in wds]
        wds = [wds[val.index(max(val))]]                  # ties: the first listed
    classify = fit_linear(train_x, train_y, num_classes, wds[0])
    return acc(classify, train_x, train_y), acc(classify, test_x, test_y), wds[0]


# ----------------------------------------------------------------------------------------
# Features of a checkpoint
# ----------------------------------------------------------------------------------------

def split_indices(n, train, test, seed=0, rows_per_image=1):
    """Two disjoint sets of row indices into a data set of n rows: the first train and the next
    test images of one seeded permutation of its images. A latent set with mirror images
    (encode_latents.py) stores image i as rows 2i and 2i+1, whose mean-pooled features are
    nearly the same: the permutation is of images, each read once, unflipped (row 2i), so no
    image's mirror sits in the held-out split beside it in the fitting one."""
    images = n // rows_per_image
    if train + test > images:
        raise UserError(f"--train-samples {train} + --test-samples {test} exceed the {images} images of the data set")
    perm = torch.randperm(images, generator=torch.Generator().manual_seed(seed)) * rows_per_image
    return perm[:train], perm[train:train + test]


def noised(x, eps, t, objective):
    """(the model's input, its time input (B,)) at noise level t, as the objective trains."""
    tt = torch.full((x.shape[0],), t, device=x.device)
    return OBJECTIVES[objective].noised(x, eps, tt), tt


@torch.no_grad()
def features(model, x, eps, t, objective, blocks, batch_size=256, keep=512):
    """For the images x (N, C, H, W) noised with eps at level t: {block: mean-pooled output (N, C)},
    the inputs (N, C*H*W), and {block: unpooled output of the first `keep` images (keep, T, C)}."""
    device = next(model.parameters()).device
    pooled, raw, inputs = {b: [] for b in blocks}, {b: [] for b in blocks}, []
    for i in range(0, len(x), batch_size):
        xt, tt = noised(x[i:i + batch_size].to(device), eps[i:i + batch_size].to(device), t, objective)
        y = torch.full((len(xt),), model.num_classes, dtype=torch.long, device=device)   # the null label
        with autocast(device):
            _, out = model(xt, tt, y, return_blocks=blocks)
        inputs.append(xt.flatten(1).float())
        for b in blocks:
            pooled[b].append(out[b].float().mean(1))
            if i < keep:
                raw[b].append(out[b][:keep - i].float())
    return ({b: torch.cat(v) for b, v in pooled.items()}, torch.cat(inputs),
            {b: torch.cat(v) for b, v in raw.items()})


def parse_floats(text, flag="--t", low=0.0, high=1.0):
    """'0.9,0.5' -> [0.9, 0.5], each in [low, high]: --t's noise levels (1 = data), --weight-decay."""
    try:
        vals = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        vals = None
    if not vals or not all(low <= v <= high and math.isfinite(v) for v in vals):
        raise UserError(f"{flag} {text!r}: expected comma-separated numbers in [{low:g}, {high:g}]"
                        + (" (noise levels: 1 = data)" if flag == "--t" else ""))
    return vals


def probe(ckpt_path, blocks=None, ts=(0.9, 0.5), train_samples=5000, test_samples=2000, stats_samples=512,
          weight_decay=(1e-5, 1e-4, 1e-3, 1e-2), seed=0, batch_size=256, device="cpu", data=None, data_path=None, out=None, verbose=False):
    """Probe a checkpoint (a file or a run directory); returns the result (also written to out,
    default <ckpt>.probe.json; out=False writes nothing). blocks: block numbers from 1 (default
    all); data: the data set already loaded (else the checkpoint's, from data_path if given)."""
    start = time.perf_counter()
    ckpt_path = resolve_checkpoint(ckpt_path)
    device = torch.device(device)
    ckpt, model, objective, _ = load_model(ckpt_path, "ema", device, need_decoder=False)
    blocks = tuple(range(1, model.depth + 1)) if blocks is None else tuple(sorted(set(blocks)))
    bad = [b for b in blocks if not 1 <= b <= model.depth]
    if bad or not blocks:
        raise UserError(f"block(s) {bad or blocks} out of range: this model has blocks 1..{model.depth}")
    cargs = ckpt.get("args", {})
    if model.num_classes and cargs.get("p_uncond") == 0:
        print("warning: the probe feeds the null label, and this model was trained with --p-uncond 0: that "
              "label's embedding never trained, so the features are those of a random label", file=sys.stderr)
    if data is None:
        data = load_dataset(cargs.get("data", "cifar10"), data_path or cargs.get("data_path", "data"),
                            cargs.get("image_size"))
    if data.num_classes < 2:
        raise UserError(f"a linear probe needs labelled data of at least 2 classes; this set has {data.num_classes}")
    if tuple(data.shape) != (model.in_channels, model.image_size, model.image_size):
        raise UserError(f"the data's samples are {tuple(data.shape)}; the checkpoint's model takes "
                        f"{(model.in_channels, model.image_size, model.image_size)}")
    train_idx, test_idx = split_indices(len(data), train_samples, test_samples, seed, getattr(data, "rows_per_image", 1))
    g = torch.Generator().manual_seed(seed)
    x, labels = data.batch(torch.cat([train_idx, test_idx]).to(data.index_device), generator=g)  # latents: seeded
    x, labels = x.cpu(), labels.cpu()
    eps = torch.randn(x.shape, generator=g)
    y_tr, y_te = labels[:train_samples], labels[train_samples:]
    chance = torch.bincount(y_te, minlength=data.num_classes).max().item() / len(y_te)
    keep = min(stats_samples, train_samples)

    def row(name, t, feats, raw, seconds):
        t_fit = time.perf_counter()
        # The fits run on the CPU whatever the device: L-BFGS reads a number back at each of its up
        # to 500 iterations, and on a GPU that is busy sampling beside it (docs/gpu_ab.sh) each read
        # waits its turn: two S/2 runs' probes did not finish in 200 s on an H200. On 2 CPU threads
        # a 384-wide block's row took 2 to 4 s and 3,072 pixels' 7 s (made-up features of 5,000
        # images; 100 to 400 loss evaluations for the row's five fits).
        feats = feats.cpu()
        train_acc, acc, wd = linear_probe(feats[:train_samples], y_tr, feats[train_samples:], y_te,
                                          data.num_classes, weight_decay)
        dist, rms = block_stats(raw)
        r = {"block": name, "t": t, "accuracy": acc, "train_accuracy": train_acc, "weight_decay": wd,
             "mean_sq_dist": dist.item(), "rms": rms.item(), "seconds": seconds + time.perf_counter() - t_fit}
        return r

    rows, pixels = [], []
    for t in ts:
        t_fwd = time.perf_counter()
        pooled, inputs, raw = features(model, x, eps, t, objective, blocks, batch_size, keep)
        share = (time.perf_counter() - t_fwd) / len(blocks)       # the forward pass serves every block
        pixels.append(row("pixels", t, inputs, inputs[:keep], 0.0))
        rows += [row(b, t, pooled[b], raw[b], share) for b in blocks]
        if verbose:
            print(f"t = {t:g}: done ({time.perf_counter() - t_fwd:.1f} s)", flush=True)
    disp_blocks = list(parse_blocks(cargs.get("disp_block"), model.depth)) if "disp_weight" in cargs else []
    result = {"checkpoint": os.path.abspath(ckpt_path), "step": ckpt.get("step"), "objective": objective,
              "arm": arm_of({"args": cargs}) if "disp_weight" in cargs else None, "train_args": cargs,
              "seed": cargs.get("seed"),
              "disp_weight": cargs.get("disp_weight"), "disp_blocks": disp_blocks, "depth": model.depth,
              "data": cargs.get("data"), "num_classes": data.num_classes, "null_label": model.num_classes,
              "train_samples": train_samples, "test_samples": test_samples, "stats_samples": keep,
              "split": "by image",        # not by row: results on latents before this field split mirrors apart
              "weight_decay": weight_decay, "probe_seed": seed, "t": list(ts), "blocks": list(blocks),
              "chance": chance, "pixels": pixels, "rows": rows, "seconds": time.perf_counter() - start,
              "device": str(device)}
    if out is not False:
        out = out or ckpt_path + ".probe.json"
        with atomic_output(out, f"the probe's result {out!r}", mode="w") as f:
            json.dump(result, f, indent=1)
        result["out"] = out
    return result


def table(result):
    """Markdown: one line per (block, t), the pixel baseline first. seconds: the fit, plus the row's
    share of the forward passes (one per t serves every block)."""
    reg = set(result["disp_blocks"]) if result.get("disp_weight") else set()
    lines = ["| block | t | probe accuracy | mean sq dist / d | rms | seconds |", "|" + " --- |" * 6]
    for r in result["pixels"] + sorted(result["rows"], key=lambda r: (-r["t"], r["block"])):
        name = f"{r['block']}{' (regularised)' if r['block'] in reg else ''}"
        lines.append(f"| {name} | {r['t']:g} | "
                     f"{r['accuracy']:.4f} | {r['mean_sq_dist']:.4g} | {r['rms']:.4g} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--ckpt", required=True, help="checkpoint written by train.py, or a run directory (its newest checkpoint)")
    a("--blocks", default="all", help="blocks to probe, counted from 1: N,M,... or 'all'")
    a("--t", default="0.9,0.5", help="noise levels, comma-separated, in [0, 1]: 1 is data, 0.9 nearly clean "
      "(diffusion checkpoints: DDPM step k = 1000 (1 - t))")
    a("--train-samples", type=number(int, min=10), default=5000, help="training images the classifier is fitted on "
      "(at least 10: a fifth of them chooses the weight decay)")
    a("--test-samples", type=number(int, min=1), default=2000, help="other training images it is scored on")
    a("--stats-samples", type=number(int, min=2), default=512, help="images (the first of the fitting split, so at "
      "most --train-samples) for the mean squared distance and rms norm of the unpooled outputs")
    a("--weight-decay", default="1e-5,1e-4,1e-3,1e-2", help="L2 penalties of the classifier's weights (on "
      "standardised features), chosen among per row by the accuracy on a fifth of the fitting split")
    a("--seed", type=number(int, min=0, max=2**63 - 1), default=0, help="seed of the split and of the noise")
    a("--batch-size", type=number(int, min=1), default=256, help="images per forward pass")
    a("--data-path", default=None, help="where the checkpoint's data set is (default: the path it was trained from)")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    a("--out", default=None, help="JSON result (default: <ckpt>.probe.json)")
    args = p.parse_args(argv)
    # where the result goes, checked before the minutes of probing (the default: beside the checkpoint)
    args.out = output_file(args.out or resolve_checkpoint(args.ckpt) + ".probe.json", "--out", (".json",))
    blocks = None
    if args.blocks != "all":
        try:
            blocks = [int(s) for s in args.blocks.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--blocks {args.blocks!r}: expected N,M,... or 'all'") from None
    result = probe(args.ckpt, blocks, parse_floats(args.t), args.train_samples, args.test_samples, args.stats_samples,
                   parse_floats(args.weight_decay, "--weight-decay", 0, float("inf")), args.seed, args.batch_size,
                   pick_device(args.device), data_path=args.data_path, out=args.out, verbose=True)
    print(f"{result['checkpoint']} (step {result['step']}, {result['objective']}, arm {result['arm']}): "
          f"{result['train_samples']} fitting / {result['test_samples']} held-out images, null label, "
          f"chance {result['chance']:.4f}")
    print(table(result))
    print(f"{result['seconds']:.1f} s in all; wrote {result['out']}")
    return result


if __name__ == "__main__":
    run_main(main)
