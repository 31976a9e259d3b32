"""Figures of what dispersion does over training and to the representations, from runs' logs and
probe.py's results: the baseline and the dispersive arm side by side.

    python plots.py runs/ab/baseline_s0 runs/ab/dispersive_s0 --out curves.png
    python plots.py runs/ab/*_s* --out curves.png --probe-json runs/ab/*/checkpoints/*.probe.json

curves (--out): against the training step, the flow loss; the dispersive diagnostic disp_diag
(train.py logs it for the baseline too); each block's mean squared pairwise distance / d (log
scale); each block's rms norm. Whether a block is "dispersed" because its outputs moved apart
or because they grew shows in the last two side by side.
probe (--probe-out, with --probe-json): probe.py's held-out accuracy per block, one panel per
noise level t, with the pixel baseline and the chance rate.

One colour per arm (arm_of: baseline if disp_weight is 0, dispersive, contrastive, each with the
settings that differ from the paper's: "dispersive hinge"), block by block in shades of it
(darker = deeper) with the regularised block(s) drawn thick. Runs of the same arm (and
objective) are taken as seeds of it: their mean is drawn, and the seeds' min to max as a light
band (error bars in the probe figure).

matplotlib is optional (pip install matplotlib) and draws to files only (the Agg backend). The
reading of a run's log lives here too (read_log, arm_of), so ab.py and probe.py share it.
"""
import argparse
import json
import os

import numpy as np

from loss import USES_TAU, parse_blocks
from model import MODELS
from utils import HelpFormatter, UserError, atomic_output, output_file, run_main

FIGURE_TYPES = (".png", ".pdf", ".svg")

COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
           "tab:cyan", "tab:gray")
ARM_ORDER = ("baseline", "dispersive", "contrastive")
DPI = 100
CURVES_SIZE = (12, 8.5)       # inches: 1200 x 850 pixels at DPI


# ----------------------------------------------------------------------------------------
# Runs and their arms
# ----------------------------------------------------------------------------------------

def read_log(run_dir):
    """(config line, train lines, fid lines) of a run directory's metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir!r} is not a run directory (no metrics.jsonl)")
    with open(path) as f:
        lines = [l for l in f if l.strip()]
    recs = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i < len(lines) - 1:      # a torn last line is what a killed run leaves: skip it
                raise UserError(f"{path!r}: line {i + 1} is not JSON") from None
            continue
        if not isinstance(rec, dict):
            raise UserError(f"{path!r}: line {i + 1} is not a JSON object (train.py writes one per line)")
        recs.append(rec)
    if not recs or recs[0].get("type") != "config":
        raise UserError(f"{path!r} does not start with a config line")
    return recs[0], [r for r in recs if r.get("type") == "train"], [r for r in recs if r.get("type") == "fid"]


# The settings the paper compares, with train.py's defaults (the paper's; a test checks they are
# train.py's), and how an arm's name shows one that differs: in a table or legend, and in a run
# directory's name.
DEFAULTS = {"disp_variant": "infonce_l2", "disp_weight": 0.5, "disp_tau": 0.5, "disp_block": None}
SHOWN = {"disp_variant": ("{}", "{}"), "disp_weight": ("λ={:g}", "w{:g}"), "disp_tau": ("τ={:g}", "tau{:g}")}


def settings_of(args):
    """[(key, value)] of the regulariser's settings in args (a run's train.py arguments) that
    differ from DEFAULTS and change the loss: tau only for the forms that have one, the block(s)
    as the numbers --disp-block names for this model ('last' of DiT-S/2 is (12,))."""
    out = []
    for key, default in DEFAULTS.items():
        value = args.get(key, default)
        if key == "disp_block":
            depth = MODELS[args["model"]][0]
            value, default = parse_blocks(value, depth), parse_blocks(default, depth)
        if value != default and (key != "disp_tau" or args.get("disp_variant", "infonce_l2") in USES_TAU):
            out.append((key, value))
    return out


def shown(key, value, dir_name):
    """One setting as an arm's name shows it: "λ=0.25", "block 12", "blocks 3,6"; in a directory's
    name "w0.25", "b12", "b3-6"."""
    if key != "disp_block":
        return SHOWN[key][dir_name].format(value)
    if dir_name:
        return "b" + "-".join(map(str, value))
    return ("block " if len(value) == 1 else "blocks ") + ",".join(map(str, value))


def arm_of(config, dir_name=False):
    """A run's arm: baseline (lambda 0), dispersive, or contrastive (its paired comparison), then
    the regulariser's settings that differ from the paper's: "dispersive hinge λ=0.25 block 12".
    dir_name: the same as a directory name, "dispersive_hinge_w0.25_b12"."""
    a = config["args"]
    arm = "contrastive" if a.get("objective", "flow") == "contrastive" else \
        "baseline" if a["disp_weight"] == 0 else "dispersive"
    if arm == "baseline":        # lambda 0: the other settings change nothing
        return arm
    return ("_" if dir_name else " ").join([arm] + [shown(k, v, dir_name) for k, v in settings_of(a)])


def labels_of(kinds):
    """kinds: [(arm, objective)] -> a label each: the arm, with the objective where it is not
    flow matching's (nor the contrastive arm's)."""
    return [(f"{obj} " if obj not in ("flow", "contrastive") else "") + arm for arm, obj in kinds]


def arm_order(arm):
    """Sort key of arm names: baseline, then the dispersive arms, then the contrastive ones (a
    stable sort keeps each kind's arms in the order they come)."""
    return ARM_ORDER.index(arm.split()[0])


def group(items, kind, setting, seed):
    """items -> [(label, [items])], grouped by labels_of(kind(item)) and by setting(item) (the data
    and model: runs of two experiments are not seeds of one), arms in ARM_ORDER. The label names
    the setting where the items hold more than one (None: not known, an old file's). A group's
    items must have distinct seeds."""
    labels = labels_of([kind(it) for it in items])
    if len({setting(it) for it in items} - {None}) > 1:
        labels = [f"{setting(it) or '?'}: {label}" for label, it in zip(labels, items)]
    groups = {}
    for label, it in zip(labels, items):
        if seed(it) in [seed(other) for other in groups.get(label, [])]:
            raise UserError(f"two {label} runs of seed {seed(it)}: a figure averages the seeds of an arm, so give "
                            f"each run once")
        groups.setdefault(label, []).append(it)
    order = lambda lab: min(arm_order(kind(it)[0]) for it in groups[lab])
    return [(lab, groups[lab]) for lab in sorted(groups, key=order)]


def colours(n):
    """n distinct colours: matplotlib's 10 "tab" colours, or its 20 of tab20 for a larger sweep."""
    if n <= len(COLOURS):
        return COLOURS
    from matplotlib import colormaps
    return [colormaps["tab20"](i % 20) for i in range(n)]


def shade(colour, block, depth):
    """The arm's colour, lighter for shallow blocks: mixed with white, from 35% + 65% / depth colour
    for block 1 up to 100% for the last."""
    from matplotlib.colors import to_rgb
    mix = 0.35 + 0.65 * (block / depth if depth > 1 else 1.0)
    return tuple(1 - mix * (1 - c) for c in to_rgb(colour))


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def have_matplotlib():
    try:
        pyplot()
        return True
    except UserError:
        return False


def seed_text(seeds):
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"mean of seeds {','.join(map(str, seeds))}"


# ----------------------------------------------------------------------------------------
# Training curves
# ----------------------------------------------------------------------------------------

def seed_mean(runs, value):
    """(steps, mean, min, max) over the runs of one group at the steps they all logged;
    value(log line) -> a number."""
    steps = sorted(set.intersection(*[{r["step"] for r in logs} for _, logs in runs]))
    if not steps:           # e.g. a seed continued in a new directory, whose log starts later
        spans = "; ".join(f"{c['args'].get('out')!r} logged steps {logs[0]['step']}..{logs[-1]['step']}"
                          for c, logs in runs)
        raise UserError(f"runs of one arm, averaged over their seeds, logged no step in common ({spans}): "
                        f"plot them in separate calls")
    at = [{r["step"]: value(r) for r in logs} for _, logs in runs]
    vals = np.array([[a[s] for s in steps] for a in at], dtype=float)      # (runs, steps)
    return np.array(steps), vals.mean(0), vals.min(0), vals.max(0)


def curves(run_dirs, out):
    """The figure of the runs' training logs, written to out (PNG). Returns the series it drew:
    {panel: {(label,) or (label, block): (steps, values)}}, values the mean over the group's seeds."""
    plt = pyplot()
    runs = []
    for d in run_dirs:
        config, logs, _ = read_log(d)
        if not logs:
            raise UserError(f"{d!r} has no training log lines")
        runs.append((config, logs))
    kind = lambda run: (arm_of(run[0]), run[0]["args"].get("objective", "flow"))
    fig, axes = plt.subplots(2, 2, figsize=CURVES_SIZE, dpi=DPI)
    panels = [("flow", "flow loss (training batch)", False), ("disp_diag", "dispersive loss of the regularised "
              "block(s), disp_diag", False), ("block_dist", "mean squared pairwise distance / d, per block", True),
              ("block_rms", "rms norm ||z|| / sqrt(d), per block", False)]
    drawn = {name: {} for name, _, _ in panels}
    groups = group(runs, kind, lambda run: f"{run[0]['args']['data']} {run[0]['args']['model']}",
                   lambda run: run[0]["args"]["seed"])
    for (label, members), colour in zip(groups, colours(len(groups))):
        seeds = sorted(c["args"]["seed"] for c, _ in members)
        name = f"{label} ({seed_text(seeds)})"
        reg = set(members[0][0].get("disp_blocks", [])) if members[0][0]["args"]["disp_weight"] > 0 else set()
        depth = len(members[0][1][0].get("block_dist", []))
        # a legend of every block of many arms is no help: then the regularised ones (baseline: first, last)
        named = lambda b: (depth <= 6 and len(groups) <= 3) or b in (reg or (1, depth))
        for (key, _, _), ax in zip(panels, axes.flat):
            if key in ("flow", "disp_diag"):
                series = [((label,), colour, 1.6, name, lambda r, key=key: r[key])]
            else:
                series = [((label, b), shade(colour, b, depth), 3.0 if b in reg else 1.2,
                           f"{label} block {b}" + (" (regularised)" if b in reg else "") if named(b) else None,
                           lambda r, key=key, b=b: r[key][b - 1]) for b in range(1, depth + 1)]
            for k, c, lw, lab, value in series:
                steps, mean, lo, hi = seed_mean(members, value)
                ax.plot(steps, mean, color=c, lw=lw, label=lab)
                if len(members) > 1:
                    ax.fill_between(steps, lo, hi, color=c, alpha=0.15, lw=0)
                drawn[key][k] = (steps.tolist(), mean.tolist())
    floors = {floor_of(c) for c, _ in runs} - {None}
    for G in sorted(floors):       # the InfoNCE-L2 form's floor: all pairs of a group infinitely far apart
        axes.flat[1].axhline(-np.log(G), color="0.5", ls=":", lw=1, label=f"floor -log G (groups of G = {G})")
    forms = {c["args"].get("disp_variant", "infonce_l2") for c, _ in runs}
    for (key, title, log_y), ax in zip(panels, axes.flat):
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        if log_y:
            ax.set_yscale("log")
        if key == "disp_diag" and len(forms) > 1:   # each run's own form: scales from -log G to d / G
            ax.set_yscale("symlog", linthresh=1.0)
            title += "\n(each run's own form of the loss; symmetric log scale)"
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, ncol=2 if key in ("block_dist", "block_rms") else 1)
    what = sorted({f"{c['args']['data']}, {c['args']['model']}" for c, _ in runs})
    fig.suptitle(f"{'; '.join(what)}. Per block: darker = deeper, thick = the regularised block", fontsize=11)
    fig.tight_layout()
    save(fig, out)
    plt.close(fig)
    return drawn


def floor_of(config):
    """G of the log's disp_diag (train.log_values: the training groups, or what one forward pass holds)
    for the InfoNCE-L2 form, whose value lies in [-log G, 0]; None for the other forms."""
    a = config["args"]
    if a.get("disp_variant", "infonce_l2") != "infonce_l2":
        return None
    local = a["batch_size"] // (config.get("world_size", 1) * a.get("accum_steps", 1))    # one forward pass
    G = a.get("disp_group_size", 0)
    return G if G and local % G == 0 else local


def save(fig, out):
    """The figure, written atomically (a kill leaves the old file or the new one, never half of one)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with atomic_output(out, f"the figure {out!r}") as f:
        fig.savefig(f, dpi=DPI, format=os.path.splitext(out)[1][1:].lower())


# ----------------------------------------------------------------------------------------
# Probe accuracy per block
# ----------------------------------------------------------------------------------------

def read_probe(path):
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read probe result {path!r} ({e})") from None
    if not isinstance(res, dict) or not all(k in res for k in ("rows", "pixels", "depth", "chance", "train_samples",
                                                                  "test_samples")):
        raise UserError(f"{path!r} is not a result of probe.py")
    if res.get("data") == "latents" and "split" not in res:
        raise UserError(f"{path!r} probed latents before probe.py split them by image (an image's mirror row could "
                        f"sit in the held-out split beside it in the fitting one): probe that checkpoint again")
    return res


def probe_arm(res):
    """The arm of a probe result, from the run's arguments; a result written before probe.py kept
    them has its arm's name of that day, which showed no setting: its weight is added back."""
    if "train_args" in res:
        return arm_of({"args": res["train_args"]})
    arm, w = res.get("arm") or "baseline", res.get("disp_weight")
    return arm if arm == "baseline" or w in (None, DEFAULTS["disp_weight"]) else f"{arm} λ={w:g}"


def probe_setting(res):
    """The data and model of a probe result (None for one written before probe.py kept its run's
    arguments)."""
    a = res.get("train_args")
    return f"{a.get('data')} {a.get('model')}" if a else None


def probe_figure(results, out):
    """Held-out probe accuracy per block, one panel per t, one line per arm (mean over seeds, min
    to max as error bars); results: probe.py results (dicts) or paths to their JSON. Returns the
    series it drew: {t: {label: (blocks, mean accuracy)}}."""
    plt = pyplot()
    results = [read_probe(r) if isinstance(r, str) else r for r in results]
    if not results:
        raise UserError("no probe results to plot")
    # the dashed line of the input's probe, chance and the title belong to one data set and split (by
    # name and image size: ab.py scores runs trained from copies at other paths on one --eval-data-path)
    data = {f"{res['data']} {res.get('train_args', {}).get('image_size') or ''}".strip()
            for res in results if res.get("data")}
    split = {(res["train_samples"], res["test_samples"]) for res in results}
    if len(data) > 1 or len(split) > 1:
        raise UserError(f"one probe figure holds probes of one data set and one split (fit / held out); these have "
                        f"data {sorted(data)} and splits {sorted(split)}: plot them in separate calls")
    ts = sorted({r["t"] for res in results for r in res["rows"]}, reverse=True)
    kind = lambda res: (probe_arm(res), res.get("objective", "flow"))
    depth = max(res["depth"] for res in results)
    fig, axes = plt.subplots(1, len(ts), figsize=(max(6.0, 1.1 * depth + 3) * len(ts), 4.8), dpi=DPI, squeeze=False)
    drawn = {}
    for ax, t in zip(axes[0], ts):
        drawn[t] = {}
        reg = []                    # (regularised blocks, their points, colour) of each dispersive arm
        shown = []                  # every seed's accuracy, so that the axis holds the error bars
        groups = group(results, kind, probe_setting, lambda res: res.get("seed"))
        for (label, members), colour in zip(groups, colours(len(groups))):
            accs = {}
            for res in members:
                for r in res["rows"]:
                    if r["t"] == t:
                        accs.setdefault(r["block"], []).append(r["accuracy"])
            blocks = sorted(accs)
            shown += [a for v in accs.values() for a in v]
            mean = [float(np.mean(accs[b])) for b in blocks]
            err = np.array([[m - min(accs[b]) for b, m in zip(blocks, mean)],
                            [max(accs[b]) - m for b, m in zip(blocks, mean)]])
            seeds = sorted(res.get("seed") for res in members)
            ax.errorbar(blocks, mean, yerr=err if len(members) > 1 else None, color=colour,
                        marker="o", capsize=3, lw=1.6, label=f"{label} ({seed_text(seeds)})")
            drawn[t][label] = (blocks, mean)
            if members[0].get("disp_weight"):
                own = set(members[0]["disp_blocks"])
                reg.append((own, [(b, m) for b, m in zip(blocks, mean) if b in own], colour))
        if len({tuple(sorted(r[0])) for r in reg}) == 1:     # one block (set) for all arms: a band
            for b in sorted(reg[0][0]):
                ax.axvspan(b - 0.2, b + 0.2, color="0.88", zorder=0, label="regularised block" if b == min(reg[0][0]) else None)
        elif reg:                   # a block sweep: ring each line at its own regularised block(s)
            for _, points, colour in reg:
                if points:
                    ax.plot(*zip(*points), ls="none", marker="o", ms=12, mfc="none", mec=colour, mew=1.5)
            if any(points for _, points, _ in reg):
                ax.plot([], [], ls="none", marker="o", ms=12, mfc="none", mec="0.3",
                        label="ringed: the line's regularised block")
        # the input x_t is the objective's noising of the data: one line per objective. The input's
        # probe does not depend on the model, so objectives that noise alike (the contrastive arm's is
        # flow matching's) give the same accuracy, to the digit, and share one line
        pix = {}
        for res in results:
            accs = [p["accuracy"] for p in res["pixels"] if p["t"] == t]
            if accs:
                pix.setdefault(res.get("objective", "flow"), []).extend(accs)
        lines = {}
        for objective, accs in pix.items():
            lines.setdefault(round(float(np.mean(accs)), 6), []).append(objective)
        for i, (acc, objectives) in enumerate(sorted(lines.items())):
            ax.axhline(acc, color="0.3", ls="--" if i == 0 else "-.", lw=1, label="linear probe on the input x_t"
                       + (f" ({', '.join(objectives)})" if len(lines) > 1 else ""))
        # the axis spans the accuracies (differences of a point or two matter), chance only if near them
        chance = float(np.mean([res["chance"] for res in results]))
        shown += list(lines)
        lo, hi = max(0.0, min(shown) - 0.04), min(1.0, max(shown) + 0.04)
        if chance >= lo - 0.1:
            ax.axhline(chance, color="0.5", ls=":", lw=1, label="chance")
            lo = min(lo, chance - 0.02)
        ax.set_ylim(lo, hi)
        ax.set_xticks(range(1, depth + 1))
        ax.set_xlabel("block")
        ax.set_ylabel("held-out top-1 accuracy")
        ax.grid(alpha=0.3)
        ax.set_title(f"t = {t:g} (1 = data): {results[0]['train_samples']} fit / {results[0]['test_samples']} held "
                     f"out, null label; chance {chance:.3f}", fontsize=10)
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    save(fig, out)
    plt.close(fig)
    return drawn


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("runs", nargs="*", metavar="RUN_DIR", help="run directories (train.py's --out) whose metrics.jsonl to plot")
    a("--out", default="curves.png", help="the figure of the training curves (.png, .pdf or .svg)")
    a("--probe-json", nargs="+", default=[], metavar="JSON", help="probe.py results to plot as accuracy per block")
    a("--probe-out", default=None, help="the figure of the probe accuracies (default: probe.png next to --out)")
    args = p.parse_args(argv)
    if not args.runs and not args.probe_json:
        raise UserError("give run directories and/or --probe-json files")
    output_file(args.out, "--out", FIGURE_TYPES)
    if args.probe_out:
        output_file(args.probe_out, "--probe-out", FIGURE_TYPES)
    probes = [read_probe(path) for path in args.probe_json]     # a bad file stops us before any figure
    if args.runs:
        curves(args.runs, args.out)
        print(f"wrote {args.out}")
    if probes:
        out = args.probe_out or os.path.join(os.path.dirname(args.out), "probe.png")
        probe_figure(probes, out)
        print(f"wrote {out}")


if __name__ == "__main__":
    run_main(main)
