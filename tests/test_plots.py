"""plots.py: the figures are written at their size, and what they draw is the logs' and the probe
results' numbers (seeds of one arm averaged)."""
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

import plots
import probe
import train
from conftest import make_image_folder, read_jsonl, tiny_args
from utils import UserError

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A baseline over two seeds and a dispersive run, 3 steps each, a log line every step."""
    images = make_image_folder(tmp_path_factory.mktemp("images"))
    root = tmp_path_factory.mktemp("runs")
    dirs = {}
    for name, extra in [("baseline_s0", ["--disp-weight", "0", "--seed", "0"]),
                        ("baseline_s1", ["--disp-weight", "0", "--seed", "1"]),
                        ("dispersive_s0", ["--disp-weight", "0.5", "--seed", "0"])]:
        dirs[name] = str(root / name)
        train.main(tiny_args(images, dirs[name], "--steps", "3", "--log-every", "1", "--lr", "1e-3", *extra))
    return dirs


def train_lines(run_dir):
    return [r for r in read_jsonl(f"{run_dir}/metrics.jsonl") if r["type"] == "train"]


def test_curves_draw_the_log(runs, tmp_path):
    out = tmp_path / "curves.png"
    drawn = plots.curves(list(runs.values()), str(out))
    assert Image.open(out).size == (int(plots.CURVES_SIZE[0] * plots.DPI), int(plots.CURVES_SIZE[1] * plots.DPI))
    disp, b0, b1 = (train_lines(runs[n]) for n in ("dispersive_s0", "baseline_s0", "baseline_s1"))
    assert [r["step"] for r in disp] == [1, 2, 3]
    for key in ("flow", "disp_diag"):
        assert drawn[key][("dispersive",)] == ([1, 2, 3], [r[key] for r in disp])
        steps, mean = drawn[key][("baseline",)]                   # two seeds: their mean
        assert steps == [1, 2, 3] and mean == pytest.approx([(a[key] + b[key]) / 2 for a, b in zip(b0, b1)], rel=1e-12)
    for key in ("block_dist", "block_rms"):
        assert sorted(drawn[key]) == sorted((arm, b) for arm in ("baseline", "dispersive") for b in range(1, 5))
        for b in range(1, 5):
            assert drawn[key][("dispersive", b)] == ([1, 2, 3], [r[key][b - 1] for r in disp])
            assert drawn[key][("baseline", b)][1] == pytest.approx([(x[key][b - 1] + y[key][b - 1]) / 2
                                                                     for x, y in zip(b0, b1)], rel=1e-12)
    assert disp[0]["disp"] < 0 and all(r["disp"] == 0 for r in b0)       # the arms are what their labels say


def test_probe_figure_and_cli(runs, tmp_path, monkeypatch):
    paths = []
    for name, d in runs.items():
        res = probe.probe(d, ts=(0.9, 0.5), train_samples=16, test_samples=8, stats_samples=8,
                          out=str(tmp_path / f"{name}.probe.json"))
        paths.append(res["out"])
    out = tmp_path / "probe.png"
    drawn = plots.probe_figure(paths, str(out))
    w, h = Image.open(out).size
    assert h == int(4.8 * plots.DPI) and w > h
    results = {name: json.load(open(p)) for name, p in zip(runs, paths)}
    acc = lambda name, t: [r["accuracy"] for r in sorted(results[name]["rows"], key=lambda r: r["block"]) if r["t"] == t]
    for t in (0.9, 0.5):
        assert drawn[t]["dispersive"] == ([1, 2, 3, 4], acc("dispersive_s0", t))
        assert drawn[t]["baseline"][1] == pytest.approx(np.mean([acc("baseline_s0", t), acc("baseline_s1", t)], axis=0))

    # arms are the runs' settings: a result of another lambda is another arm, also one written before
    # probe.py kept the run's arguments (then only its weight is known)
    other = {**results["dispersive_s0"], "train_args": {**results["dispersive_s0"]["train_args"], "disp_weight": 1.0}}
    old = {k: v for k, v in results["dispersive_s0"].items() if k != "train_args"}
    drawn = plots.probe_figure([results["baseline_s0"], results["dispersive_s0"], other, {**old, "disp_weight": 0.25}],
                               str(out))
    assert list(drawn[0.5]) == ["baseline", "dispersive", "dispersive λ=1", "dispersive λ=0.25"]
    # the regularised block: a grey band when every arm has the same one; in a block sweep, a ring
    # on each line at its own block, in its colour, and no band
    from matplotlib.colors import to_rgba
    figs = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figs.append(fig))
    block3 = {**results["dispersive_s0"], "disp_blocks": [3],
              "train_args": {**results["dispersive_s0"]["train_args"], "disp_block": "3"}}
    plots.probe_figure([results["baseline_s0"], results["dispersive_s0"], other], str(out))
    plots.probe_figure([results["baseline_s0"], results["dispersive_s0"], block3], str(out))
    rings = lambda ax: [(list(line.get_xdata()), to_rgba(line.get_markeredgecolor())) for line in ax.lines
                        if line.get_markerfacecolor() == "none" and len(line.get_xdata())]
    shared, sweep = figs[0].axes[0], figs[1].axes[0]
    assert len(shared.patches) == 1 and rings(shared) == []
    colour = [to_rgba(c) for c in plots.colours(3)]        # the lines' colours: baseline, block 1, block 3
    assert len(sweep.patches) == 0 and rings(sweep) == [([1], colour[1]), ([3], colour[2])]
    monkeypatch.undo()
    # more arms than the 10 colours: each its own colour still
    many = [{**other, "train_args": {**other["train_args"], "disp_weight": w}} for w in np.arange(1, 12)]
    assert len(plots.probe_figure(many, str(out))[0.5]) == 11 and len(set(map(str, plots.colours(11)))) == 11

    # the command line: both figures
    plots.main([*runs.values(), "--out", str(tmp_path / "cli" / "c.png"), "--probe-json", *paths])
    assert Image.open(tmp_path / "cli" / "c.png").size[0] == int(plots.CURVES_SIZE[0] * plots.DPI)
    assert (tmp_path / "cli" / "probe.png").stat().st_size > 0
    # a bad probe file stops the command before it writes either figure
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="cannot read probe result"):
        plots.main([*runs.values(), "--out", str(tmp_path / "cli2" / "c.png"), "--probe-json", str(tmp_path / "bad.json")])
    assert not (tmp_path / "cli2").exists()


def test_the_probe_figures_reference_lines_and_axis_belong_to_what_it_shows(runs, tmp_path, monkeypatch):
    """The dashed line of the input's own probe is the objective's (one line per noising, drawn
    once where two noise alike); one figure holds one data set and one split; the axis holds every
    seed's accuracy, not the means only, so no error bar runs off the panel."""
    base = probe.probe(runs["baseline_s0"], ts=(0.5,), train_samples=16, test_samples=8, stats_samples=8, out=False)
    figs = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figs.append(fig))
    with_acc = lambda res, acc, **kw: {**res, "rows": [{**r, "accuracy": acc} for r in res["rows"]], **kw}
    pixels = lambda res, acc: {**res, "pixels": [{**p, "accuracy": acc} for p in res["pixels"]]}
    # two seeds at 0.40 and 0.60 on every block (the input's probe at 0.5, chance far below): the
    # mean is 0.5, the error bars reach both
    s1 = with_acc(base, 0.6, seed=1, train_args={**base["train_args"], "seed": 1}, chance=0.1)
    plots.probe_figure([pixels(with_acc(base, 0.4, chance=0.1), 0.5), pixels(s1, 0.5)], "p.png")
    lo, hi = figs[-1].axes[0].get_ylim()
    assert lo <= 0.4 and hi >= 0.6
    # flow matching, its contrastive counterpart (the same noising: one line) and DDPM's (another line)
    arm = lambda objective: {**base, "objective": objective, "train_args": {**base["train_args"], "objective": objective}}
    plots.probe_figure([pixels(base, 0.3), pixels(arm("contrastive"), 0.3), pixels(arm("diffusion"), 0.7)], "p.png")
    dashed = {line.get_label(): line.get_ydata()[0] for line in figs[-1].axes[0].lines if line.get_linestyle() in ("--", "-.")}
    assert dashed == {"linear probe on the input x_t (flow, contrastive)": 0.3, "linear probe on the input x_t (diffusion)": 0.7}
    plots.probe_figure([pixels(base, 0.3), pixels(arm("contrastive"), 0.3)], "p.png")
    assert [line.get_label() for line in figs[-1].axes[0].lines if line.get_linestyle() == "--"] == ["linear probe on the input x_t"]
    # another data set, or another split, is another figure
    other = {**base, "data": "fashion-mnist", "train_args": {**base["train_args"], "data": "fashion-mnist"}}
    with pytest.raises(UserError, match="one probe figure holds probes of one data set and one split"):
        plots.probe_figure([base, other], "p.png")
    moved = {**s1, "train_args": {**s1["train_args"], "data_path": "/elsewhere/copy"}}   # one set, another path
    plots.probe_figure([base, moved], "p.png")
    with pytest.raises(UserError, match=r"splits \[\(16, 8\), \(32, 8\)\]"):
        plots.probe_figure([base, {**s1, "train_samples": 32}], "p.png")
    # a JSON file that is not probe.py's result is one line
    no_test = {k: v for k, v in base.items() if k != "test_samples"}
    for text in ("null", '"rows pixels"', "[]", json.dumps(no_test)):
        (tmp_path / "x.json").write_text(text)
        with pytest.raises(UserError, match="is not a result of probe.py"):
            plots.read_probe(str(tmp_path / "x.json"))
    # a probe of latents from before the split by image is refused; one from after it is read
    (tmp_path / "x.json").write_text(json.dumps({k: v for k, v in {**base, "data": "latents"}.items() if k != "split"}))
    with pytest.raises(UserError, match="probed latents before probe.py split them by image"):
        plots.read_probe(str(tmp_path / "x.json"))
    assert base["split"] == "by image"
    (tmp_path / "x.json").write_text(json.dumps({**base, "data": "latents"}))
    assert plots.read_probe(str(tmp_path / "x.json"))["data"] == "latents"


def test_seeds_of_one_arm_without_a_common_step_are_refused(runs, tmp_path):
    """A seed continued in a new directory logs from a later step: its mean with another seed has
    no point, which drew nothing (or crashed in matplotlib's log scale); now it is a clear error."""
    lines = open(f"{runs['baseline_s1']}/metrics.jsonl").read().splitlines()
    later = tmp_path / "baseline_s1_later"
    later.mkdir()
    shifted = [json.dumps({**r, "step": r["step"] + 10}) if r.get("type") == "train" else json.dumps(r)
               for r in map(json.loads, lines)]
    (later / "metrics.jsonl").write_text("\n".join(shifted) + "\n")
    with pytest.raises(UserError, match="logged no step in common .*logged steps 11..13"):
        plots.curves([runs["baseline_s0"], str(later)], str(tmp_path / "c.png"))


def test_runs_of_two_experiments_are_not_averaged_as_seeds(runs, tmp_path):
    """The same arm on other data is another line, named by its data and model; the same arm and
    seed twice is refused (averaging it with itself would halve the seed spread)."""
    lines = open(f"{runs['baseline_s1']}/metrics.jsonl").read().splitlines()
    config = json.loads(lines[0])
    config["args"]["data"] = "fashion-mnist"           # as if trained on another data set
    other = tmp_path / "fmnist_baseline_s1"
    other.mkdir()
    (other / "metrics.jsonl").write_text("\n".join([json.dumps(config), *lines[1:]]) + "\n")
    drawn = plots.curves([runs["baseline_s0"], str(other)], str(tmp_path / "c.svg"))
    assert sorted(drawn["flow"]) == [("fashion-mnist DiT-Mi/4: baseline",), ("folder DiT-Mi/4: baseline",)]
    assert drawn["flow"][("folder DiT-Mi/4: baseline",)][1] == [r["flow"] for r in train_lines(runs["baseline_s0"])]
    assert open(tmp_path / "c.svg").read(5) == "<?xml" and os.listdir(tmp_path).count("c.svg") == 1
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]      # written atomically: no temporary file left
    with pytest.raises(UserError, match="two baseline runs of seed 0: a figure averages the seeds"):
        plots.curves([runs["baseline_s0"], runs["baseline_s0"]], str(tmp_path / "c.png"))


def test_plots_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not a run directory"):
        plots.curves([str(tmp_path)], str(tmp_path / "x.png"))
    with pytest.raises(UserError, match="give run directories"):
        plots.main([])
    with pytest.raises(UserError, match="--out 'c.txt': the file name must end in .png or .pdf or .svg"):
        plots.main([str(tmp_path), "--out", "c.txt"])
    monkeypatch.setitem(sys.modules, "matplotlib", None)         # as if it were not installed
    with pytest.raises(UserError, match="pip install matplotlib"):
        plots.pyplot()
    assert not plots.have_matplotlib()


def test_a_torn_last_line_is_skipped(runs, tmp_path):
    """What a run killed mid-write leaves: the last line cut short. Elsewhere a bad line is an error."""
    lines = open(f"{runs['baseline_s0']}/metrics.jsonl").read().splitlines()
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "metrics.jsonl").write_text("\n".join(lines) + "\n" + lines[-1][:20])
    assert plots.read_log(str(tmp_path / "torn"))[1] == plots.read_log(runs["baseline_s0"])[1]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text("\n".join([lines[0], lines[1][:20]] + lines[2:]) + "\n")
    with pytest.raises(UserError, match="line 2 is not JSON"):
        plots.read_log(str(tmp_path / "bad"))
    (tmp_path / "bad" / "metrics.jsonl").write_text("\n".join([lines[0], "[1, 2]"] + lines[1:]) + "\n")
    with pytest.raises(UserError, match="line 2 is not a JSON object"):
        plots.read_log(str(tmp_path / "bad"))
