"""The A/B: the baseline against the dispersive run (and the paper's contrastive comparison),
same seeds, same data, same number of forward passes.

    python ab.py --steps 20000 --seeds 0,1,2 --root runs/ab -- --data cifar10 --model DiT-S/2
    python ab.py --arms baseline,dispersive,contrastive ...       # + the paired contrastive arm
    python ab.py --compare runs/ab/baseline_s0 runs/ab/dispersive_s0 ...   # existing runs, no training
    python ab.py --compare ... --eval-samples 10000 --sample-solver dopri5   # the paper's ODE sampler
    python ab.py --disp-variant infonce_l2 infonce_cos hinge covariance ...  # the paper's Table 1
    python ab.py --disp-weight 0.25 0.5 1 --disp-tau 0.25 0.5 1 2 ...        # its lambda x tau sweep
    python ab.py --steps 1000 --root runs/ab_mf -- --objective meanflow ...  # another objective's two arms

For each seed every arm is trained with train.py's own main(): the weights, the data order and
every step's noise are functions of (seed, step), so the baseline and dispersive arms differ only
in the regulariser. Several values of --disp-weight, --disp-tau, --disp-variant or --disp-block
train the dispersive (and contrastive) arm once per combination, each compared with the one
baseline of its seed (whose diagnostics are taken at the arm's blocks: baseline_value; the baseline's
own row shows its own block, and a line under the table says so); a run is
named by the settings that differ from the paper's (plots.arm_of): <root>/dispersive_hinge_w0.25_s0,
"dispersive hinge λ=0.25" in the table.

Each run is then evaluated the same way, and a markdown table (mean and std
over seeds, and the paired per-seed difference from the baseline with its 95% t-interval
in brackets) is printed and written to
<root>/ab.md, with <root>/ab.json and, where matplotlib is installed, <root>/curves.png, the runs'
training curves (plots.py).

Columns: the training flow loss (mean of the last 10 log lines); the EMA model's loss on a fixed
evaluation batch (the same images, noise and times for every run; the objective's own loss,
so lower is better, but it is not sample quality); the diagnostics of the regularised block
(dispersive loss value and mean pairwise squared distance / d, logged for the baseline too);
with --eval-samples a Frechet distance of EMA samples (fid.py: FID with the Inception
extractor, FD-classifier with a classifier .pt, offline and not FID); with --probe the held-out
accuracy of a linear probe of the EMA model's blocks (probe.py, with the null label) at each --probe-t:
probe_best_t<t>, the best block's, and probe_reg_t<t>, the regularised block's (for the baseline the
block its --disp-block names, the one the dispersive arm regularises; the mean if several). Every
block's accuracy is in the probe's JSON next to the checkpoint (ab.json's probe_json) and in
<root>/probe.png.
A run directory that already holds the final checkpoint is not trained again.
"""
import argparse
import contextlib
import itertools
import json
import os
import sys

import numpy as np
import torch

import fid
import plots
import probe
import train
from data import load_dataset
from loss import USES_TAU, VARIANTS
from objectives import OBJECTIVES
from plots import DEFAULTS, arm_of, arm_order, read_log
from rundir import PLUMBING, changed_flags, checkpoint_step, list_checkpoints
from sample import SOLVERS, load_model, sampler
from utils import HelpFormatter, UserError, atomic_output, number, pick_device, run_main, writable_dir

# The arms: train.py flags on top of the common ones; the regularised two also get one
# combination of the swept settings (sweep). The contrastive arm exists while contrastive.py does.
ARMS = {"baseline": ["--disp-weight", "0"], "dispersive": [],
        **({"contrastive": ["--objective", "contrastive"]} if "contrastive" in OBJECTIVES else {})}
SWEPT = ("--disp-variant", "--disp-weight", "--disp-tau", "--disp-block")      # ab.py's flags, as train.py's


def swept(args):
    """{flag: values} of the SWEPT flags given to ab.py."""
    return {flag: v for flag in SWEPT if (v := getattr(args, flag[2:].replace("-", "_"))) is not None}


def sweep(args):
    """train.py flags for each combination of the values given to ab.py's SWEPT flags. A variant
    without a temperature takes no --disp-tau (train.py refuses it): its combinations leave tau
    out, and the repeats that this makes are dropped."""
    given = [[(flag, str(v)) for v in values] for flag, values in swept(args).items()]
    combos, tau_free = [], set()
    for combo in itertools.product(*given):
        flags = dict(combo)
        variant = flags.get("--disp-variant", DEFAULTS["disp_variant"])
        if variant not in USES_TAU and "--disp-tau" in flags:
            combo = tuple(pair for pair in combo if pair[0] != "--disp-tau")
            tau_free.add(variant)
        if combo not in combos:
            combos.append(combo)
    if tau_free:
        print(f"note: {', '.join(sorted(tau_free))} take(s) no temperature: those runs leave out --disp-tau", file=sys.stderr)
    return [[part for pair in combo for part in pair] for combo in combos]


def run_dir(root, targs, seed):
    """<root>/<arm>_s<seed> for train.py's arguments targs; the arm's name lists the settings that
    differ from the paper's (plots.arm_of), so two combinations that train the same run (block
    'last' and its number) share one directory."""
    return os.path.join(root, f"{arm_of({'args': targs}, dir_name=True)}_s{seed}")


def check_reusable(out, wanted):
    """Refuse to take an existing run directory for the run of train.py's arguments wanted if it
    was trained with other flags (by hand, or by another ab.py command), plumbing aside."""
    if not os.path.isfile(os.path.join(out, "metrics.jsonl")):
        return
    there = read_log(out)[0]["args"]
    # the regulariser's settings compared as the arm's name shows them (block numbers, tau where it counts)
    arm_there, arm_wanted = arm_of({"args": there}), arm_of({"args": wanted})
    changed = [] if arm_there == arm_wanted else [f"arm {arm_there!r}, not {arm_wanted!r}"]
    changed += [f"--{k.replace('_', '-')} {there[k]}, not {wanted[k]}" for k in changed_flags(there, wanted)
                if k not in DEFAULTS]
    # --accum-steps is plumbing, but with whole-batch groups a group is one micro-batch: another loss
    if wanted.get("disp_group_size") == 0 and there.get("accum_steps", 1) != wanted.get("accum_steps", 1):
        changed.append(f"--accum-steps {there.get('accum_steps', 1)}, not {wanted.get('accum_steps', 1)}, "
                       f"with --disp-group-size 0")
    if changed:
        raise UserError(f"{out} holds a run trained with other flags ({'; '.join(changed)}); move it, "
                        f"or give another --root")


# What may differ between the rows of one table: the arm (the regulariser's settings; the contrastive
# arm's objective and its own flags) and the seed. Every other train.py flag, plumbing aside, is the
# set-up the arms share: a baseline trained with AdamW beta2 0.95 beside a dispersive run with 0.999
# is no paired comparison.
ARM_FLAGS = {*DEFAULTS, "seed", "objective",
             *(a.dest for a in (OBJECTIVES["contrastive"].add_args(argparse.ArgumentParser())
                                if "contrastive" in OBJECTIVES else []))}

SAMPLE_FLAGS = ("--sample-solver", "--sample-steps")     # sampler()'s errors name ab.py's flags

# A row's fields that are not table columns: what the run is, and what pairing it needs
KEYS = ("run", "arm", "seed", "step", "probe_json", "settings", "per_block")


@torch.no_grad()
def ema_loss(model, objective, ckpt_args, data, n=1024, seed=12345, batch=256, device="cpu"):
    """The objective's own loss (its "flow" term) of a model on a fixed batch: the same images,
    noise and times, and no dropped labels, for every run of one objective, so its arms are
    compared on equal terms. Another objective draws its own randomness in its own order (the
    contrastive one two noises per image), so across objectives the batch is the same, not the
    noise: a difference then also carries the noise draw's variance."""
    args = train.get_args([])
    vars(args).update({**ckpt_args, "disp_weight": 0.0, "compile": False})
    obj = OBJECTIVES[objective].from_args(args, model, model.num_classes or None)
    obj.p_uncond = 0.0      # no dropped labels; set here, as MeanFlow's learnt guidance is refused without them
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[:n]
    total = 0.0
    for i in range(0, len(idx), batch):
        x, y = data.batch(idx[i:i + batch], generator=g)   # latents: seeded posterior noise
        noise = {k: v.to(device) for k, v in obj.draw(g, x.shape).items()}   # drawn on the CPU: any device agrees
        y = y if model.num_classes else torch.zeros_like(y)
        total += obj(model, x.to(device), y.to(device), noise)["flow"].item() * len(x)
    return total / len(idx)


def checkpoint_at(run_dir, step=None):
    """The checkpoint of a run to evaluate: its newest (None if it has none), or that of `step`."""
    ckpts = list_checkpoints(run_dir)
    if step is None:
        return ckpts[0] if ckpts else None
    at = [c for c in ckpts if checkpoint_step(c) == step]
    if not at:
        have = ", ".join(str(checkpoint_step(c)) for c in reversed(ckpts)) or "none"
        raise UserError(f"--at-step {step}: {run_dir!r} has no checkpoint of that step (it has: {have}); "
                        f"train.py --keep-ckpts 0 keeps every one")
    return at[0]


def evaluate(run_dir, args, cache):
    """One run's row: numbers from its log, plus evaluations of its newest checkpoint (or, with
    --at-step, of that step's, and its log up to that step)."""
    config, logs, fid_logs = read_log(run_dir)
    if args.at_step:
        logs, fid_logs = ([r for r in rs if r["step"] <= args.at_step] for rs in (logs, fid_logs))
    if not logs:
        raise UserError(f"{run_dir!r} has no training log lines")
    cargs = config["args"]
    row = {"run": run_dir, "arm": arm_of(config), "seed": cargs["seed"], "step": logs[-1]["step"],
           # how its dispersion diagnostics were measured, and the per-block values paired() needs
           "settings": {"variant": cargs.get("disp_variant", "infonce_l2"), "tau": cargs.get("disp_tau"),
                        "blocks": config.get("disp_blocks")},
           "per_block": {"mean_sq_dist": logs[-1]["block_dist"]} if "block_dist" in logs[-1] else {},
           "flow": float(np.mean([r["flow"] for r in logs[-10:]])),
           "disp_diag": logs[-1].get("disp_diag"), "mean_sq_dist": logs[-1].get("mean_sq_dist")}
    if fid_logs:    # a sampler other than the objective's default is named: other samplers, other columns
        last, Obj = fid_logs[-1], OBJECTIVES[cargs.get("objective", "flow")]
        solver, steps = last.get("solver", Obj.solvers[0]), last.get("steps", Obj.sample_steps)
        own = "" if (solver, steps) == (Obj.solvers[0], Obj.sample_steps) else f" {solver}" + (f" {steps}" if steps else "")
        row["periodic_" + last["metric"] + own] = last["value"]
    ckpt_path = checkpoint_at(run_dir, args.at_step)
    if ckpt_path is None:
        if args.eval_samples or args.probe:
            raise UserError(f"{run_dir!r} has no checkpoint to sample or probe")
        print(f"warning: {run_dir!r} has no checkpoint: its row has the logged numbers only", file=sys.stderr)
        return row
    key = (cargs["data"], args.eval_data_path or cargs["data_path"], cargs.get("image_size"))
    if key not in cache:                    # one data set (and reference) per distinct data
        try:
            cache[key] = {"data": load_dataset(*key, flags=("--data", "--eval-data-path" if args.eval_data_path
                                                             else "--data-path"))}
        except UserError as e:
            if args.eval_data_path:
                raise
            raise UserError(f"{run_dir!r} was trained on --data {key[0]}, read from {key[1]!r}: {e}; "
                            f"--eval-data-path says where it is on this machine") from None
    data, dev = cache[key]["data"], args.device
    ckpt, model, objective, _ = load_model(ckpt_path, "ema", dev, need_decoder=False)
    fits = data.shape == (model.in_channels, model.image_size, model.image_size) and \
        data.num_classes == (model.num_classes or data.num_classes)
    if not fits:          # --eval-data-path (or a folder changed since) holds another data set
        C, H, W = data.shape
        raise UserError(f"{key[1]!r} holds {C}x{H}x{W} images of {data.num_classes} classes, but {run_dir!r}'s model "
                        f"takes {model.in_channels}x{model.image_size}x{model.image_size} of {model.num_classes}")
    row["step"] = ckpt["step"]     # the step evaluated: later than the last log line if a signal stopped the run
    row["ema_flow"] = ema_loss(model, objective, ckpt["args"], data, device=dev)
    if args.eval_samples:
        if data.images is None:
            raise UserError(f"--eval-samples: {run_dir} trained on latents; score its checkpoints with fid.py --ckpt")
        if "ref" not in cache[key]:
            fn, info = fid.load_extractor(args.extractor, args.inception_weights, dev)
            if args.ref_stats:
                mu, sigma, ref = fid.reference_stats(fn, info, stats_path=args.ref_stats)
                fid.check_size(data.shape, ref)     # where the stats file records its images' shape
            else:
                mu, sigma = fid.statistics(fid.features(fn, data.images, device=dev, progress=True))
            cache[key]["ref"] = (fn, info, mu, sigma)
        fn, info, mu, sigma = cache[key]["ref"]
        solver, name, steps = sampler(objective, args.sample_solver, args.sample_steps, SAMPLE_FLAGS)
        counter = {}
        images = fid.generate_n(model, args.eval_samples, solver, steps, cfg_scale=args.cfg_scale,
                                seed=args.sample_seed, device=dev, counter=counter, progress=True)
        # a solver asked for by name, or steps other than its default, are named in the column, so
        # that two scorings' tables are told apart
        other_steps = steps is not None and steps != OBJECTIVES[objective].sample_steps
        metric = (fid.fid_name(info, args.eval_samples) + (f" {name}" if args.sample_solver or other_steps else "")
                  + (f" {steps}" if other_steps else ""))
        row[metric] = fid.frechet_distance(*fid.statistics(fid.features(fn, images, device=dev, progress=True)),
                                           mu, sigma)
        if steps is None:       # an adaptive solver (dopri5) chose its steps: how many, per batch of 256
            row[f"nfe {name}"] = counter["nfe"] / -(-args.eval_samples // 256)
    if args.probe:
        res = probe.probe(ckpt_path, ts=args.probe_t, train_samples=args.probe_train_samples,
                          test_samples=args.probe_test_samples, device=dev, data=data)
        row["probe_json"] = res["out"]
        for t in args.probe_t:
            acc = {r["block"]: r["accuracy"] for r in res["rows"] if r["t"] == t}
            row[f"probe_best_t{t:g}"] = max(acc.values())
            row[f"probe_reg_t{t:g}"] = float(np.mean([acc[b] for b in res["disp_blocks"]]))
            row["per_block"][f"probe_reg_t{t:g}"] = [acc[b] for b in sorted(acc)]
    return row


def check_comparable(run_dirs, eval_data_path=None, at_step=None):
    """Refuse a table whose rows cannot be compared: runs of other data or models, runs whose
    set-up differs in a flag that is not the arm's (ARM_FLAGS), a run listed twice, or two runs of
    one arm and seed. Different step counts draw a warning, and so do runs trained from different
    paths that --eval-data-path scores on one data set."""
    seen, kinds, steps, paths, setup = {}, set(), set(), set(), {}
    defaults = vars(train.get_args([]))     # what a flag missing from an older run's log was
    for d in run_dirs:
        config, logs, _ = read_log(d)
        a = config["args"]
        for k, v in {**defaults, **a}.items():
            if k not in PLUMBING and k not in ARM_FLAGS:
                setup.setdefault(k, {}).setdefault(str(v), d)      # flag -> {value: the first run with it}
        if a.get("disp_group_size") == 0:   # whole-batch groups: the group is what one pass on one GPU holds
            per_pass = a["batch_size"] // (config.get("world_size", 1) * a.get("accum_steps", 1))
            setup.setdefault("disp_group_size 0, samples per GPU pass", {}).setdefault(str(per_pass), d)
        key, real = (arm_of(config), a["seed"]), os.path.realpath(d)
        if real in seen.values():
            raise UserError(f"{d!r} is listed twice")
        if key in seen:
            raise UserError(f"{d!r} and {seen[key]!r} are both arm {key[0]}, seed {key[1]}")
        seen[key] = real
        # the contrastive arm is flow matching with two views; every other arm shares one objective
        objective = "flow" if a.get("objective", "flow") == "contrastive" else a.get("objective", "flow")
        kinds.add((a["data"], eval_data_path or a["data_path"], a.get("image_size"), a["model"], objective))
        paths.add(a["data_path"])
        steps.add(logs[-1]["step"] if logs else None)
    if len(kinds) > 1:
        raise UserError("these runs differ in data, model or objective, so a paired table means nothing: "
                        + "; ".join(", ".join(map(str, k)) for k in sorted(kinds, key=str)))
    differ = {k: v for k, v in setup.items() if len(v) > 1}
    if differ:
        raise UserError("these runs differ in more than the arm and the seed, so a paired table would mix the "
                        "regulariser's effect with the set-up's: "
                        + "; ".join(f"--{k.replace('_', '-')} " + ", ".join(f"{v} ({d!r})" for v, d in vs.items())
                                    for k, vs in differ.items()))
    if eval_data_path and len(paths) > 1:
        print(f"warning: the runs were trained from {', '.join(map(repr, sorted(paths)))}, and are all scored on "
              f"--eval-data-path {eval_data_path!r}: make sure they are one data set", file=sys.stderr)
    if len(steps) > 1 and at_step is None:
        print(f"warning: the runs stopped at different steps ({sorted(steps, key=str)}): "
              f"their differences mix the arm with the budget", file=sys.stderr)


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.4g}"
    return f"{np.mean(xs):.4g} ± {np.std(xs, ddof=1):.2g}"


# Student's t, 97.5% quantile, for 1..30 degrees of freedom (a textbook table; scipy is optional).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042)


def t975(df):
    """The t quantile that makes mean ± t975 * SE a 95% interval; beyond the table, the
    Cornish-Fisher series in 1/df about the normal's 1.96 (within 1e-4 from 31 on)."""
    if df < 1:
        raise ValueError(f"a t-interval needs at least 1 degree of freedom, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_cell(diffs, n_seeds):
    """A Δ cell: mean ± std of the per-seed differences, then their 95% t-interval (what tells a
    difference from the seed-to-seed noise), and n where fewer seeds than the row's have this metric."""
    cell = mean_std(diffs)
    n = len(diffs)
    if n >= 2:
        half = t975(n - 1) * np.std(diffs, ddof=1) / np.sqrt(n)
        cell += f" [{np.mean(diffs) - half:.3g}, {np.mean(diffs) + half:.3g}]"
    if 0 < n < n_seeds:
        cell += f" (n={n})"
    return cell


def baseline_value(base, r, metric):
    """The baseline's metric measured as run r measures its own. The dispersion diagnostics are
    those of the regularised block(s): the baseline's are taken at r's blocks (its log and probe
    have every block's); the dispersive loss's own value, logged in the baseline's form only, is
    None when r's variant, tau or blocks differ."""
    if "settings" not in r:                     # a row of an older ab.json
        return base.get(metric)
    blocks = r["settings"]["blocks"]
    if metric in base.get("per_block", {}) and blocks:
        return float(np.mean([base["per_block"][metric][b - 1] for b in blocks]))
    if metric.startswith("disp_diag") and base["settings"] != r["settings"]:
        return None
    return base.get(metric)


def paired(rows, arm, metric):
    """Per-seed differences arm - baseline over the seeds both have (the seed's noise cancels)."""
    base = {r["seed"]: r for r in rows if r["arm"] == "baseline"}
    diffs = []
    for r in rows:
        if r["arm"] == arm and r["seed"] in base and r.get(metric) is not None:
            b = baseline_value(base[r["seed"]], r, metric)
            if b is not None:
                diffs.append(r[metric] - b)
    return diffs


def table(rows):
    """Markdown: one line per arm (mean ± std over seeds) and each arm's paired difference."""
    metrics = []
    for r in rows:
        metrics += [k for k in r if k not in KEYS and k not in metrics]
    arms = sorted(dict.fromkeys(r["arm"] for r in rows), key=arm_order)     # kinds in order, each as it came
    lines = ["| arm | seeds | steps | " + " | ".join(metrics) + " |", "|" + " --- |" * (3 + len(metrics))]
    for arm in arms:
        rs = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["seed"])
        lines.append(f"| {arm} | {','.join(str(r['seed']) for r in rs)} | {','.join(map(str, sorted({r['step'] for r in rs})))} | "
                     + " | ".join(mean_std([r.get(m) for r in rs]) for m in metrics) + " |")
    for arm in arms:
        if arm == "baseline":
            continue
        seeds = sorted({r["seed"] for r in rows if r["arm"] == arm} & {r["seed"] for r in rows if r["arm"] == "baseline"})
        if seeds:
            lines.append(f"| Δ {arm} - baseline, paired | {','.join(map(str, seeds))} | | "
                         + " | ".join(paired_cell(paired(rows, arm, m), len(seeds)) for m in metrics) + " |")
    # Under a --disp-block sweep the baseline row shows its own block, and a Δ line is not that row's
    # difference: say so under the table.
    base = [r for r in rows if r["arm"] == "baseline" and "settings" in r]
    other = sorted({str(r["settings"]["blocks"]) for r in rows if r["arm"] != "baseline" and "settings" in r}
                   - {str(r["settings"]["blocks"]) for r in base})
    per_block = [m for m in metrics if any(m in r.get("per_block", {}) for r in base)]
    if base and other and per_block:
        lines.append(f"\nThe baseline row's {', '.join(per_block)} are at its block(s) {base[0]['settings']['blocks']}; "
                     f"each Δ line takes the baseline's at that arm's own block(s) (here also {', '.join(other)}).")
    return "\n".join(lines)


def get_args(argv=None):
    """ab.py's flags, train.py's flags (those after "--"), and the arms, all checked."""
    # allow_abbrev off: train.py flags after "--" must never be taken for a prefix of ours
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                allow_abbrev=False)
    a = p.add_argument
    a("--steps", type=number(int, min=1), default=None, help="training budget in steps, per run (needed unless --compare)")
    a("--seeds", default="0", help="comma-separated seeds; each trains every arm")
    a("--arms", default="baseline,dispersive", help=f"comma-separated arms among {', '.join(ARMS)}")
    a("--disp-weight", type=number(float, above=0), nargs="+", default=None, metavar="W", help="lambda of the "
      "dispersive and contrastive arms (default: train.py's, 0.5); several values, here or in the three flags "
      "below, train those arms once per combination")
    a("--disp-tau", type=number(float, above=0), nargs="+", default=None, metavar="TAU",
      help="tau (default: train.py's)")
    a("--disp-variant", choices=VARIANTS, nargs="+", default=None, metavar="NAME",
      help=f"the loss's form, among {', '.join(VARIANTS)} (default: train.py's)")
    a("--disp-block", nargs="+", default=None, metavar="BLOCK", help="block(s) to regularise, each value as "
      "train.py's --disp-block: '3 last' compares block 3 with the last (default: train.py's)")
    a("--root", default="runs/ab", help="where the runs (<root>/<arm>_s<seed>) and ab.md, ab.json go")
    a("--compare", nargs="+", default=None, metavar="RUN_DIR", help="evaluate these existing run directories; no "
      "training. They may differ in the arm and the seed only")
    a("--eval-samples", type=number(int, min=0), default=0, help="EMA samples per run for a Frechet distance (0: none)")
    a("--extractor", default=fid.INCEPTION, help="feature extractor for it (fid.py --extractor): Inception (FID) "
      "or a classifier .pt (FD-classifier, offline, not FID)")
    a("--inception-weights", default=None, help="local Inception weights file (offline)")
    a("--ref-stats", default=None, help="reference statistics .npz (default: computed from each run's training data)")
    a("--sample-solver", choices=SOLVERS, default=None, help="solver of the evaluation samples (default: the "
      "objective's; the paper's tables: dopri5, whose model evaluations per batch become a column)")
    a("--sample-steps", type=number(int, min=1), default=None, help="solver steps for the evaluation samples "
      "(default: the objective's)")
    a("--cfg-scale", type=number(float), default=1.0, help="guidance scale of the evaluation samples")
    a("--sample-seed", type=number(int, min=0, max=2**63 - 1), default=0, help="noise seed for the evaluation "
      "samples (the same for every run)")
    a("--eval-data-path", default=None, help="where the runs' data set is on this machine, if not where they "
      "were trained from (runs copied from another machine)")
    a("--at-step", type=number(int, min=1), default=None, help="evaluate every run at its checkpoint of this step "
      "(and its log up to it), not its newest: one training scored at several budgets (train.py --keep-ckpts 0 "
      "keeps them all)")
    a("--eval-device", default="auto", help="device for the evaluation: auto, cpu, cuda, cuda:N, mps")
    a("--probe", action="store_true", help="also a linear probe of every block of each run's newest checkpoint "
      "(probe.py): columns probe_best_t<t> and probe_reg_t<t>, and <root>/probe.png")
    a("--probe-t", default="0.9,0.5", help="the probe's noise levels, comma-separated, in [0, 1] (1 = data)")
    a("--probe-train-samples", type=number(int, min=10), default=5000, help="training images the probe is fitted "
      "on (at least 10)")
    a("--probe-test-samples", type=number(int, min=1), default=2000, help="other training images it is scored on")
    args, train_args = p.parse_known_args(argv)
    train_args = [a for a in train_args if a != "--"]     # train.py's flags, wherever "--" stood
    own = ("--seed", "--steps", "--out", "--resume") + SWEPT
    if any(a.split("=")[0] in own for a in train_args):
        raise UserError(f"ab.py sets {', '.join(own)} itself; use its own flags")
    if args.compare and (train_args or args.steps is not None or swept(args)):
        raise UserError(f"--compare evaluates existing runs: {' '.join(train_args or swept(args)) or '--steps'} "
                        f"would do nothing")
    writable_dir(args.root, "--root")
    if args.eval_samples == 1:
        raise UserError("--eval-samples must be 0 or at least 2")
    evaluation = {"--extractor": fid.INCEPTION, "--inception-weights": None, "--ref-stats": None,
                  "--sample-solver": None, "--sample-steps": None, "--cfg-scale": 1.0, "--sample-seed": 0}   # flags, defaults
    unused = [f for f, default in evaluation.items() if getattr(args, f[2:].replace("-", "_")) != default]
    if unused and not args.eval_samples:
        raise UserError(f"{', '.join(unused)}: flags of the evaluation samples, which only --eval-samples N turns on")
    unused = [f for f in ("--probe-t", "--probe-train-samples", "--probe-test-samples")
              if getattr(args, f[2:].replace("-", "_")) != p.get_default(f[2:].replace("-", "_"))]
    if unused and not args.probe:
        raise UserError(f"{', '.join(unused)}: flags of the linear probe, which only --probe turns on")
    if args.cfg_scale != 1 and "--unconditional" in train_args:
        raise UserError("--cfg-scale: these runs train --unconditional models, which take no labels, so no guidance")
    args.probe_t = probe.parse_floats(args.probe_t, "--probe-t")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or any(a not in ARMS for a in arms):
        raise UserError(f"--arms {args.arms!r}: choose among {', '.join(ARMS)}")
    # train.py's --objective picks what the baseline and dispersive arms train (flow matching by
    # default); the contrastive arm is flow matching's paired comparison, so it goes with flow only
    objective = train.get_args(train_args).objective
    if objective == "contrastive":
        raise UserError("--objective contrastive is ab.py's contrastive arm: --arms baseline,dispersive,contrastive")
    if objective != "flow" and "contrastive" in arms:
        raise UserError(f"--arms {args.arms}: the contrastive arm is flow matching's paired comparison, "
                        f"not one of --objective {objective}")
    if not args.compare and args.steps is None:
        raise UserError("give --steps (the training budget), or --compare RUN_DIR ...")
    if not args.compare and args.at_step and args.at_step > args.steps:
        raise UserError(f"--at-step {args.at_step}: past --steps {args.steps}")
    if not args.compare and args.eval_samples:      # a solver that does not fit, now, not after the training
        sampler(objective, args.sample_solver, args.sample_steps, SAMPLE_FLAGS)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
    if not args.compare and not args.seeds:
        raise UserError("--seeds '': give at least one seed")
    return args, train_args, arms


def main(argv=None):
    args, train_args, arms = get_args(argv)
    if args.compare:
        run_dirs = args.compare
    else:
        runs = {}                   # run directory: train.py flags but --out and --resume
        combos = sweep(args)
        for seed in args.seeds:
            for arm in arms:
                for settings in ([[]] if arm == "baseline" else combos):
                    argv = [*train_args, *settings, *ARMS[arm], "--steps", str(args.steps), "--seed", str(seed)]
                    targs = vars(train.get_args(argv))
                    out = run_dir(args.root, targs, seed)
                    if out not in runs:          # else a combination that trains the same run as another
                        check_reusable(out, targs)
                        have = list_checkpoints(out)
                        done = checkpoint_step(have[0]) if have else 0
                        if done > args.steps:
                            raise UserError(f"{out} is trained to step {done} already, past --steps {args.steps}: "
                                            f"give --steps {done} (or more), or another --root")
                        runs[out] = argv
        if args.eval_samples:     # the extractor and the reference now, not after hours of training
            fn, info = fid.load_extractor(args.extractor, args.inception_weights)
            if args.ref_stats:
                fid.reference_stats(fn, info, stats_path=args.ref_stats)
            del fn                # evaluate() loads it again, on its device
        run_dirs = list(runs)     # every check passed: now train what is not trained yet
        for out, argv in runs.items():
            have = list_checkpoints(out)
            if have and checkpoint_step(have[0]) == args.steps:   # its name's step: a damaged file is resume's to skip
                print(f"{out}: already trained to step {args.steps}")
                continue
            print(f"--- training {out} ({args.steps} steps)")
            train.main([*argv, "--out", out] + (["--resume"] if have else []))
            done = list_checkpoints(out)
            if not done or checkpoint_step(done[0]) != args.steps:   # stopped by a signal
                raise UserError(f"{out} stopped before step {args.steps}; run the same command again to continue")

    args.device = pick_device(args.eval_device)
    check_comparable(run_dirs, args.eval_data_path, args.at_step)
    if args.at_step:            # every run has that step's checkpoint, before the first evaluation
        for d in run_dirs:
            checkpoint_at(d, args.at_step)
    if args.eval_samples:       # the runs' objective(s) and the solver flags, before the first evaluation
        for objective in {read_log(d)[0]["args"].get("objective", "flow") for d in run_dirs}:
            sampler(objective, args.sample_solver, args.sample_steps, SAMPLE_FLAGS)
    if args.cfg_scale != 1 and any(read_log(d)[0]["args"].get("unconditional") for d in run_dirs):
        raise UserError("--cfg-scale: these runs trained --unconditional models, which take no labels, so no guidance")
    cache = {}
    rows = []
    for d in run_dirs:
        print(f"--- evaluating {d}", flush=True)
        rows.append(evaluate(d, args, cache))
    md = table(rows)
    os.makedirs(args.root, exist_ok=True)
    with atomic_output(os.path.join(args.root, "ab.md"), mode="w") as f:
        f.write(md + "\n")
    with atomic_output(os.path.join(args.root, "ab.json"), mode="w") as f:
        json.dump({"rows": rows, "train_args": train_args, "steps": args.steps, "at_step": args.at_step,
                   "eval_samples": args.eval_samples,
                   "eval_data_path": args.eval_data_path,
                   "extractor": args.extractor if args.eval_samples else None, "cfg_scale": args.cfg_scale,
                   # what the Frechet distances were measured with: the features (a classifier's by its
                   # digest), the reference (a stats file, or the data set of each distinct data) and the noise
                   "extractor_info": next((c["ref"][1] for c in cache.values() if "ref" in c), None),
                   "reference": ({"stats_file": os.path.abspath(args.ref_stats)} if args.ref_stats else
                                 [{"data": k[0], "data_path": os.path.abspath(k[1]), "image_size": k[2]} for k, c in cache.items()
                                  if "ref" in c]) if args.eval_samples else None,
                   "sample_seed": args.sample_seed if args.eval_samples else None,
                   "sample_solver": args.sample_solver, "sample_steps": args.sample_steps,
                   "probe": {"t": args.probe_t, "train_samples": args.probe_train_samples,
                             "test_samples": args.probe_test_samples} if args.probe else None}, f, indent=1)
    print(md)
    written = ["ab.md", "ab.json"]
    if plots.have_matplotlib():
        plots.curves(run_dirs, os.path.join(args.root, "curves.png"))
        written.append("curves.png")
        probes = [r["probe_json"] for r in rows if "probe_json" in r]
        if probes:
            plots.probe_figure(probes, os.path.join(args.root, "probe.png"))
            written.append("probe.png")
    else:
        print("no plots: they need matplotlib (pip install matplotlib)")
    for figure in sorted({"curves.png", "probe.png"} - set(written)):
        # an earlier call's figure (of other runs, or without the probe's numbers in this table)
        # would read as this table's
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(args.root, figure))
            print(f"removed {figure}, an earlier call's, from {args.root}")
    print(f"wrote {', '.join(written)} to {args.root}")
    return rows


if __name__ == "__main__":
    run_main(main)
