"""ab.py: every arm on a tiny budget with the same data order and noise, a table that is the
statistics of its rows, --compare."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import ab
import data
import plots
import train
from conftest import make_image_folder, present, read_jsonl, tiny_args
from rundir import list_checkpoints, load_checkpoint
from utils import UserError


def ab_train_args(image_folder, *extra):
    """tiny_args without --out: ab.py chooses it (passing it is an error, tested below)."""
    targs = tiny_args(image_folder, "unused", *extra)
    i = targs.index("--out")
    return targs[:i] + targs[i + 2:]


def test_ab_arms_same_data_table_and_compare(image_folder, tmp_path, monkeypatch, capsys):
    seen = []          # (seed, step, indices) for every batch every run drew, in order

    class Recording(data.BatchStream):
        def indices(self, step):
            idx = super().indices(step)
            seen.append((self.seed, step, idx.tolist()))
            return idx
    monkeypatch.setattr(data, "BatchStream", Recording)

    root = tmp_path / "ab"
    targs = ab_train_args(image_folder, "--log-every", "1", "--lr", "1e-3", "--warmup-steps", "0")
    probe_args = ["--probe", "--probe-t", "0.9,0.5", "--probe-train-samples", "16", "--probe-test-samples", "8"]
    rows = ab.main(["--steps", "3", "--seeds", "0,1", "--disp-weight", "0.5", "--root", str(root), *probe_args,
                    "--", *targs])
    printed = capsys.readouterr().out

    # four runs: each seed trained both arms, over the very same batches
    runs = [seen[k:k + 3] for k in range(0, 12, 3)]
    assert len(seen) == 12 and [r[0][0] for r in runs] == [0, 0, 1, 1]
    assert runs[0] == runs[1] and runs[2] == runs[3] and runs[0] != runs[2]
    names = ("baseline_s0", "dispersive_s0", "baseline_s1", "dispersive_s1")
    logs = {n: [r for r in read_jsonl(root / n / "metrics.jsonl") if r["type"] == "train"] for n in names}
    ckpts = {n: load_checkpoint(list_checkpoints(root / n)[0]) for n in names}
    for seed in (0, 1):
        base, disp = f"baseline_s{seed}", f"dispersive_s{seed}"
        assert all(r["disp"] == 0 for r in logs[base]) and all(r["disp"] < 0 for r in logs[disp])
        assert ckpts[base]["args"]["disp_weight"] == 0 and ckpts[disp]["args"]["disp_weight"] == 0.5
        # the same start (the seed's weights), then the regulariser makes the arms' weights differ
        differ = [k for k in ckpts[base]["model"] if not torch.equal(ckpts[base]["model"][k], ckpts[disp]["model"][k])]
        assert any(k.startswith("blocks.0.") for k in differ)        # block 1 = depth // 4 is dispersed
        # the baseline logs the diagnostics too: -log G <= L_disp <= 0 for groups of 4
        assert all(-np.log(4) <= r["disp_diag"] <= 0 and r["mean_sq_dist"] > 0 for r in logs[base])

    # the table: one line per arm, and it is exactly the statistics of ab.json's rows
    saved = json.load(open(root / "ab.json"))
    assert len(saved["rows"]) == 4 and saved["rows"] == json.loads(json.dumps(rows))
    md = (root / "ab.md").read_text()
    assert md.strip() in printed
    assert [f"--- evaluating {root / n}" for n in names] == [line for line in printed.splitlines() if "evaluating" in line]
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in md.splitlines()[2:] if line.startswith("|")}
    assert not any(line.startswith("The baseline row") for line in md.splitlines())   # one block: no footnote
    header = [c.strip() for c in md.splitlines()[0].split("|")[1:-1]]
    by = {(r["arm"], r["seed"]): r for r in saved["rows"]}
    probe_cols = [f"probe_{k}_t{t}" for t in ("0.9", "0.5") for k in ("best", "reg")]
    assert header[3:] == ["flow", "disp_diag", "mean_sq_dist", "ema_flow", *probe_cols]
    for metric in ("flow", "ema_flow", "disp_diag", "mean_sq_dist", *probe_cols):
        col = header.index(metric) - 1
        for arm in ("baseline", "dispersive"):
            vals = [by[(arm, s)][metric] for s in (0, 1)]
            assert table[arm][col] == f"{np.mean(vals):.4g} ± {np.std(vals, ddof=1):.2g}"
        diffs = [by[("dispersive", s)][metric] - by[("baseline", s)][metric] for s in (0, 1)]
        half = 12.706 * np.std(diffs, ddof=1) / np.sqrt(2)        # t at 1 degree of freedom
        assert table["Δ dispersive - baseline, paired"][col] == (
            f"{np.mean(diffs):.4g} ± {np.std(diffs, ddof=1):.2g} [{np.mean(diffs) - half:.3g}, {np.mean(diffs) + half:.3g}]")
        if metric not in probe_cols:        # 8 held-out images: the probe's accuracies may tie
            assert diffs[0] != 0 and diffs[1] != 0
    assert table["baseline"][:2] == ["0,1", "3"]
    # the probe columns are the probe's own results: its JSON next to each newest checkpoint
    for r in saved["rows"]:
        res = json.load(open(r["probe_json"]))
        assert r["probe_json"] == list_checkpoints(r["run"])[0] + ".probe.json" and res["disp_blocks"] == [1]
        for t in (0.9, 0.5):
            acc = {p["block"]: p["accuracy"] for p in res["rows"] if p["t"] == t}
            assert sorted(acc) == [1, 2, 3, 4]
            assert r[f"probe_best_t{t}"] == max(acc.values()) and r[f"probe_reg_t{t}"] == acc[1]
    # the figures (where matplotlib is installed): the runs' curves and the probe accuracies
    figures = [(root / f).is_file() for f in ("curves.png", "probe.png")]
    assert figures == [plots.have_matplotlib()] * 2

    # --compare re-evaluates existing runs without training, to the same table;
    # re-running the A/B itself finds the runs done and trains nothing either
    def no_training(argv):
        raise AssertionError("trained again")
    monkeypatch.setattr(train, "main", no_training)
    ab.main(["--compare", *[str(root / n) for n in names], "--root", str(tmp_path / "cmp"), *probe_args])
    assert (tmp_path / "cmp" / "ab.md").read_text() == md
    ab.main(["--steps", "3", "--seeds", "0,1", "--root", str(root), *probe_args, "--", *targs])
    assert (root / "ab.md").read_text() == md
    # a table without the probe does not keep the probe figure of an earlier call beside it
    ab.main(["--compare", *[str(root / n) for n in names], "--root", str(root)])
    assert not (root / "probe.png").exists() and (root / "curves.png").is_file() == plots.have_matplotlib()


def test_a_paired_difference_carries_its_95_percent_t_interval():
    """A Δ cell reads: mean ± std of the per-seed differences [95% t-interval], and n where fewer
    seeds than the row names have the metric. The known answer is the README's β2 0.95 CIFAR-10
    study at 7,200 steps: four seeds, t(3) = 3.182, the interval -1.39..+0.11 holds zero."""
    assert ab.paired_cell([+0.04, -0.79, -1.05, -0.76], 4) == "-0.64 ± 0.47 [-1.39, 0.11]"
    assert ab.paired_cell([1.0, 3.0], 2) == "2 ± 1.4 [-10.7, 14.7]"          # 2 ± 12.706 * sqrt(2) / sqrt(2)
    assert ab.paired_cell([1.0, 3.0], 3) == "2 ± 1.4 [-10.7, 14.7] (n=2)"    # the third seed lacks it
    assert ab.paired_cell([0.5], 2) == "0.5 (n=1)" and ab.paired_cell([], 2) == "-"
    with pytest.raises(ValueError, match="at least 1 degree of freedom"):
        ab.t975(0)
    # the table's quantiles and the series beyond it, against the t distribution where scipy is installed
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 400):
        assert ab.t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=5e-4), df


def test_ab_bad_input(tmp_path):
    with pytest.raises(UserError, match="--steps"):
        ab.main(["--seeds", "0", "--root", str(tmp_path)])
    with pytest.raises(UserError, match="sets --seed"):
        ab.main(["--steps", "2", "--root", str(tmp_path), "--", "--seed", "3"])
    with pytest.raises(UserError, match="not a run directory"):
        ab.main(["--compare", str(tmp_path), "--root", str(tmp_path / "x")])
    with pytest.raises(UserError, match="--probe-t '0.9,2'"):
        ab.main(["--steps", "2", "--probe", "--probe-t", "0.9,2", "--root", str(tmp_path)])
    with pytest.raises(UserError, match="--arms 'baseline,nope'"):
        ab.main(["--steps", "2", "--arms", "baseline,nope", "--root", str(tmp_path)])
    with pytest.raises(UserError, match="--seeds '': give at least one seed"):
        ab.main(["--steps", "2", "--seeds", "", "--root", str(tmp_path)])
    # the evaluation's flags without --eval-samples did nothing, silently
    with pytest.raises(UserError, match="--ref-stats, --cfg-scale: flags of the evaluation samples, which only"):
        ab.main(["--steps", "2", "--ref-stats", "r.npz", "--cfg-scale", "2", "--root", str(tmp_path)])
    with pytest.raises(UserError, match="^--probe-t, --probe-test-samples: flags of the linear probe, which only --probe"):
        ab.main(["--steps", "2", "--probe-t", "0.5", "--probe-test-samples", "100", "--root", str(tmp_path)])
    with pytest.raises(UserError, match="--cfg-scale: these runs train --unconditional models"):
        ab.main(["--steps", "2", "--eval-samples", "4", "--cfg-scale", "2", "--root", str(tmp_path), "--",
                 "--unconditional"])


def test_guidance_of_unconditional_runs_is_refused_before_the_work(image_folder, tmp_path, monkeypatch):
    """fid.py --ckpt and ab.py --compare of an --unconditional model with --cfg-scale: sample.py
    refused it, these two sampled unguided and recorded the scale."""
    import fid
    root = str(tmp_path / "ab")
    ab.main(["--steps", "1", "--arms", "baseline", "--root", root, "--", *ab_train_args(image_folder), "--unconditional"])
    monkeypatch.setattr(fid, "generate_n", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(UserError, match="--cfg-scale: these runs trained --unconditional models"):
        ab.main(["--compare", os.path.join(root, "baseline_s0"), "--eval-samples", "4", "--cfg-scale", "2",
                 "--root", root])
    clf = str(tmp_path / "clf.pt")
    fid.main(["--train-classifier", clf, "--ref-data", "folder", "--ref-data-path", image_folder,
              "--classifier-epochs", "1", "--device", "cpu"])
    with pytest.raises(UserError, match="--cfg-scale: this checkpoint's model is unconditional"):
        fid.main(["--ckpt", os.path.join(root, "baseline_s0"), "--cfg-scale", "2", "--extractor", clf, "--ref-data",
                  "folder", "--ref-data-path", image_folder, "--device", "cpu"])


def test_ab_refuses_runs_trained_past_its_steps(image_folder, tmp_path):
    root = str(tmp_path / "ab")
    ab.main(["--steps", "2", "--arms", "baseline", "--root", root, "--", *ab_train_args(image_folder)])
    with pytest.raises(UserError, match="baseline_s0 is trained to step 2 already, past --steps 1: give --steps 2"):
        ab.main(["--steps", "1", "--arms", "baseline", "--root", root, "--", *ab_train_args(image_folder)])


@pytest.mark.parametrize("objective", present("diffusion", "meanflow")[:1])   # one, whichever a fork kept
def test_ab_trains_another_objectives_two_arms(image_folder, tmp_path, objective):
    """train.py's --objective after "--" sets what the baseline and dispersive arms train."""
    root = tmp_path / "ab"
    targs = ab_train_args(image_folder, "--objective", objective)
    rows = ab.main(["--steps", "2", "--seeds", "0", "--root", str(root), "--", *targs])
    assert sorted(r["arm"] for r in rows) == ["baseline", "dispersive"]
    for name, weight in (("baseline_s0", 0), ("dispersive_s0", 0.5)):
        config = read_jsonl(root / name / "metrics.jsonl")[0]
        assert config["args"]["objective"] == objective and config["args"]["disp_weight"] == weight
    # the root of these runs is not reused for flow matching's runs of the same arms and seed
    with pytest.raises(UserError, match=f"--objective {objective}, not flow"):
        ab.main(["--steps", "2", "--seeds", "0", "--root", str(root), "--", *ab_train_args(image_folder)])


@pytest.mark.parametrize("objective", present("meanflow"))
def test_a_meanflow_run_with_learnt_guidance_is_scored(image_folder, tmp_path, objective):
    """MeanFlow's --mf-cfg-omega needs --p-uncond > 0 to be built; the fixed-batch loss drops no
    labels all the same (it failed here, after the training)."""
    rows = ab.main(["--steps", "1", "--arms", "baseline", "--root", str(tmp_path / "ab"), "--",
                    *ab_train_args(image_folder, "--objective", objective, "--mf-cfg-omega", "2")])
    assert rows[0]["ema_flow"] > 0


def test_the_evaluations_files_are_checked_before_the_training(image_folder, tmp_path, monkeypatch):
    """A mistyped --inception-weights, --extractor or --ref-stats stops ab.py before it trains,
    not after the last run."""
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail("trained"))
    base = ["--steps", "1", "--arms", "baseline", "--root", str(tmp_path / "ab"), "--eval-samples", "4"]
    targs = ["--", *ab_train_args(image_folder)]
    with pytest.raises(UserError, match="--extractor 'nope.pt': no such classifier file"):
        ab.main([*base, "--extractor", "nope.pt", *targs])
    pytest.importorskip("torch_fidelity")
    with pytest.raises(UserError, match="--inception-weights 'nope.pth': no such file"):
        ab.main([*base, "--inception-weights", "nope.pth", *targs])
    import fid
    clf = str(tmp_path / "clf.pt")
    fid.main(["--train-classifier", clf, "--ref-data", "folder", "--ref-data-path", image_folder,
              "--classifier-epochs", "1", "--device", "cpu"])
    with pytest.raises(UserError, match="--ref-stats 'nope.npz': no such file"):
        ab.main([*base, "--extractor", clf, "--ref-stats", "nope.npz", *targs])


def test_an_ab_scored_with_the_papers_dopri5_sampler(image_folder, tmp_path, monkeypatch):
    """--sample-solver: the evaluation samples from another solver (the paper's tables: dopri5),
    named in the column, and the model evaluations dopri5 chose, per batch, beside it."""
    pytest.importorskip("torchdiffeq")
    import fid
    import sample
    root = str(tmp_path / "ab")
    # a high lr, so that the velocity is far from the zero of adaLN-Zero's start and the solvers' images differ
    ab.main(["--steps", "4", "--arms", "baseline", "--root", root, "--", *ab_train_args(image_folder, "--lr", "1e-2",
                                                                                         "--warmup-steps", "0")])
    run, clf = os.path.join(root, "baseline_s0"), str(tmp_path / "clf.pt")
    fid.main(["--train-classifier", clf, "--ref-data", "folder", "--ref-data-path", image_folder,
              "--classifier-epochs", "1", "--device", "cpu"])
    score = lambda *flags: ab.main(["--compare", run, "--root", root, "--eval-samples", "6", "--extractor", clf,
                                    *flags])[0]
    default, euler, dopri = score(), score("--sample-solver", "euler"), score("--sample-solver", "dopri5")
    assert default["FD-classifier-6"] == euler["FD-classifier-6 euler"]      # flow matching's own: 50 Euler steps
    assert "nfe euler" not in euler and "FD-classifier-6" not in dopri
    saved = json.load(open(os.path.join(root, "ab.json")))
    assert saved["sample_solver"] == "dopri5" and saved["sample_seed"] == 0
    # the distances can be traced to their features and reference: the classifier by its digest
    assert saved["extractor_info"]["name"] == "fd-classifier" and len(saved["extractor_info"]["sha256"]) == 16
    assert saved["reference"] == [{"data": "folder", "data_path": os.path.abspath(image_folder), "image_size": None}]
    assert "FD-classifier-6 euler 10" in score("--sample-steps", "10")     # other steps: another column
    # the dopri5 column is the FD of dopri5's samples, computed here the long way
    _, model, _, _ = sample.load_model(list_checkpoints(run)[0], "ema", "cpu", need_decoder=False)
    counter = {}
    images = fid.generate_n(model, 6, sample.dopri5, None, counter=counter)
    fn, _ = fid.load_extractor(clf, None, "cpu")
    ref = fid.statistics(fid.features(fn, data.load_dataset("folder", image_folder).images))
    expected = fid.frechet_distance(*fid.statistics(fid.features(fn, images)), *ref)
    assert dopri["FD-classifier-6 dopri5"] == pytest.approx(expected, rel=1e-9)
    assert not torch.equal(images, fid.generate_n(model, 6, sample.euler, 50))       # other images: another FD
    assert dopri["FD-classifier-6 dopri5"] != default["FD-classifier-6"]
    assert dopri["nfe dopri5"] == counter["nfe"] >= 8        # one batch of 6: 6 per step, 2 to choose the first
    # a solver that does not fit is refused before the training, or the first evaluation
    monkeypatch.setattr(train, "main", lambda argv: pytest.fail("trained"))
    monkeypatch.setattr(fid, "generate_n", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(UserError, match="--sample-steps: dopri5 chooses its own steps"):
        ab.main(["--steps", "3", "--root", str(tmp_path / "ab2"), "--eval-samples", "4", "--sample-solver", "dopri5",
                 "--sample-steps", "10", "--", *ab_train_args(image_folder)])
    with pytest.raises(UserError, match="--sample-steps: dopri5 chooses its own steps"):
        score("--sample-solver", "dopri5", "--sample-steps", "10")
    with pytest.raises(UserError, match="--sample-solver: flags of the evaluation samples"):
        ab.main(["--compare", run, "--root", root, "--sample-solver", "dopri5"])
    if present("diffusion"):
        with pytest.raises(UserError, match="--sample-solver dopri5: diffusion models are sampled with ddim"):
            ab.main(["--steps", "3", "--root", str(tmp_path / "ab3"), "--eval-samples", "4", "--sample-solver",
                     "dopri5", "--", *ab_train_args(image_folder, "--objective", "diffusion")])


@pytest.mark.parametrize("objective", present("diffusion", "meanflow")[:1] if present("contrastive") else [])
def test_the_contrastive_arm_goes_with_flow_matching_only(image_folder, tmp_path, objective):
    """The contrastive arm is flow matching's paired comparison: refused beside another objective's
    arms, and --objective contrastive is that arm, not an objective for both arms."""
    targs = ab_train_args(image_folder, "--objective", objective)
    with pytest.raises(UserError, match="the contrastive arm is flow matching's paired comparison"):
        ab.get_args(["--steps", "2", "--arms", "baseline,contrastive", "--root", str(tmp_path), "--", *targs])
    with pytest.raises(UserError, match="--objective contrastive is ab.py's contrastive arm"):
        ab.get_args(["--steps", "2", "--root", str(tmp_path), "--",
                     *ab_train_args(image_folder, "--objective", "contrastive")])


def test_compare_refuses_rows_that_do_not_compare(image_folder, tmp_path, capsys):
    """A paired table needs runs of one data set, model and objective, each (arm, seed) once."""
    runs = {name: str(tmp_path / name) for name in ("b0", "d0", "d0_longer")}
    train.main(tiny_args(image_folder, runs["b0"], "--steps", "2", "--disp-weight", "0"))
    train.main(tiny_args(image_folder, runs["d0"], "--steps", "2"))
    train.main(tiny_args(image_folder, runs["d0_longer"], "--steps", "3"))
    cmp = ["--root", str(tmp_path / "ab")]
    with pytest.raises(UserError, match="b0' is listed twice"):
        ab.main(["--compare", runs["b0"], runs["b0"], *cmp])
    with pytest.raises(UserError, match="are both arm dispersive, seed 0"):
        ab.main(["--compare", runs["b0"], runs["d0"], runs["d0_longer"], *cmp])
    with pytest.raises(UserError, match="--compare evaluates existing runs: --model DiT-Ti/4 would do nothing"):
        ab.main(["--compare", runs["b0"], runs["d0"], *cmp, "--", "--model", "DiT-Ti/4"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot write to --root"):
        ab.main(["--compare", runs["b0"], runs["d0"], "--root", str(tmp_path / "file" / "ab")])
    ab.main(["--compare", runs["b0"], runs["d0_longer"], *cmp])          # 2 and 3 steps: a warning
    assert "stopped at different steps ([2, 3])" in capsys.readouterr().err

    def copy_log(name, drop=(), **changes):      # a run directory with d0's log (and no checkpoint)
        lines = open(f"{runs['d0']}/metrics.jsonl").read().splitlines()
        config = json.loads(lines[0])
        config["args"].update(changes)
        for k in drop:                              # a flag an older train.py did not have
            del config["args"][k]
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("\n".join([json.dumps(config)] + lines[1:]) + "\n")
        return str(tmp_path / name)
    with pytest.raises(UserError, match="differ in data, model or objective"):
        ab.main(["--compare", runs["b0"], copy_log("other_model", model="DiT-Ti/4"), *cmp])
    # the arms share every other flag: an optimiser of its own is not the regulariser's effect
    beta2 = copy_log("beta2", adam_beta2=0.95)
    with pytest.raises(UserError, match=r"differ in more than the arm.*--adam-beta2 0.999 \('.*b0'\), 0.95 \('.*beta2'\)"):
        ab.main(["--compare", runs["b0"], beta2, *cmp])
    # the groups too, the baseline's included: its logged dispersive loss is paired with the arm's
    with pytest.raises(UserError, match=r"differ in more than the arm.*--disp-group-size 4 \('.*d0'\), 2"):
        ab.main(["--compare", runs["d0"], copy_log("b_g2", disp_weight=0, disp_group_size=2), *cmp])
    # an older log without the flag had train.py's default (0.999): the same as b0's, not beta2's
    old = copy_log("old", drop=["adam_beta2"])
    with pytest.raises(UserError, match=r"--adam-beta2 0.999 \('.*old'\), 0.95"):
        ab.main(["--compare", old, copy_log("beta2_b", adam_beta2=0.95, disp_weight=0), *cmp])
    ab.main(["--compare", runs["b0"], old, *cmp])
    # whole-batch groups (--disp-group-size 0) are what one pass holds: --accum-steps changes the loss
    with pytest.raises(UserError, match=r"--disp-group-size 0, samples per GPU pass 8 \('.*g0'\), 4 \('.*g0_accum'\)"):
        ab.main(["--compare", copy_log("g0", disp_group_size=0),
                 copy_log("g0_accum", disp_group_size=0, accum_steps=2, seed=1), *cmp])
    # what makes the arm may differ: lambda, tau, variant, block
    ab.main(["--compare", runs["b0"], copy_log("tau1", disp_tau=1.0, disp_variant="hinge", seed=1), *cmp])
    no_ckpt = copy_log("no_ckpt")
    rows = ab.main(["--compare", runs["b0"], no_ckpt, *cmp])
    assert "has no checkpoint: its row has the logged numbers only" in capsys.readouterr().err
    assert "ema_flow" in rows[0] and "ema_flow" not in rows[1]
    with pytest.raises(UserError, match="has no checkpoint to sample or probe"):
        ab.main(["--compare", no_ckpt, runs["b0"], "--probe", *cmp])

    # runs copied from another machine: their data set is elsewhere here
    moved = str(tmp_path / "moved")
    shutil.copytree(runs["b0"], moved)
    lines = open(f"{moved}/metrics.jsonl").read().splitlines()
    config = json.loads(lines[0])
    config["args"]["data_path"] = str(tmp_path / "gone")
    open(f"{moved}/metrics.jsonl", "w").write("\n".join([json.dumps(config)] + lines[1:]) + "\n")
    with pytest.raises(UserError, match=r"moved' was trained on --data folder, read from '.*gone': .*--eval-data-path"):
        ab.main(["--compare", moved, *cmp])
    rows = ab.main(["--compare", runs["d0"], moved, "--eval-data-path", str(image_folder), *cmp])
    assert "trained from" in capsys.readouterr().err      # d0 here, moved elsewhere: one data set? a warning
    assert rows[1]["ema_flow"] == pytest.approx(ab.main(["--compare", runs["b0"], *cmp])[0]["ema_flow"])
    with pytest.raises(UserError, match=r"^--eval-data-path '.*gone' is not a directory"):
        ab.main(["--compare", moved, "--eval-data-path", str(tmp_path / "gone"), *cmp])
    other = make_image_folder(tmp_path / "other", classes=2)          # another data set of the same size
    with pytest.raises(UserError, match=r"other' holds 3x16x16 images of 2 classes, but .*takes 3x16x16 of 3"):
        ab.main(["--compare", moved, "--eval-data-path", other, *cmp])


def test_at_step_scores_a_runs_earlier_checkpoint_as_that_of_a_shorter_run(image_folder, tmp_path):
    """--at-step N evaluates the checkpoint of step N, with the log up to it: the row of a run of
    the same seed trained to N steps only (the same batches and noise, so the same weights)."""
    long, short = str(tmp_path / "long"), str(tmp_path / "short")
    train.main(tiny_args(image_folder, long, "--steps", "4", "--ckpt-every", "2", "--keep-ckpts", "0", "--log-every", "1"))
    train.main(tiny_args(image_folder, short, "--steps", "2", "--ckpt-every", "2", "--log-every", "1"))
    cmp = ["--root", str(tmp_path / "ab")]
    at, ref = ab.main(["--compare", long, "--at-step", "2", *cmp])[0], ab.main(["--compare", short, *cmp])[0]
    assert at["step"] == ref["step"] == 2 and at["flow"] == ref["flow"] and at["disp_diag"] == ref["disp_diag"]
    assert at["ema_flow"] == pytest.approx(ref["ema_flow"], rel=1e-6)
    newest = ab.main(["--compare", long, *cmp])[0]
    assert newest["step"] == 4 and newest["ema_flow"] != pytest.approx(at["ema_flow"], rel=1e-6)
    assert json.load(open(tmp_path / "ab" / "ab.json"))["at_step"] is None
    with pytest.raises(UserError, match=r"--at-step 3: .*long' has no checkpoint of that step \(it has: 2, 4\)"):
        ab.main(["--compare", long, "--at-step", "3", *cmp])
    with pytest.raises(UserError, match="--at-step 5: past --steps 4"):
        ab.main(["--steps", "4", "--at-step", "5", *cmp, "--", *ab_train_args(image_folder)])


def test_arm_names_show_the_settings_that_differ_from_the_papers():
    """An arm is named by what differs from the paper's lambda, tau, variant and block, in tables and
    legends and, in its directory form, in ab.py's run directories."""
    defaults = vars(train.get_args([]))
    assert {k: defaults[k] for k in plots.DEFAULTS} == plots.DEFAULTS
    config = lambda **changes: {"args": {**defaults, "model": "DiT-S/2", **changes}}      # 12 blocks
    names = lambda **changes: (plots.arm_of(config(**changes)), plots.arm_of(config(**changes), dir_name=True))
    assert names() == ("dispersive", "dispersive")
    assert names(disp_weight=0, disp_variant="hinge") == ("baseline", "baseline")     # lambda 0: nothing else matters
    assert names(disp_variant="hinge", disp_weight=0.25) == ("dispersive hinge λ=0.25", "dispersive_hinge_w0.25")
    assert names(disp_tau=1.0) == ("dispersive τ=1", "dispersive_tau1")
    assert names(disp_variant="hinge", disp_tau=1.0) == ("dispersive hinge", "dispersive_hinge")   # no tau in hinge
    # blocks by number: block 3 of 12 is depth // 4, the default; 'last' is block 12
    assert names(disp_block="3") == ("dispersive", "dispersive")
    assert names(disp_block="last") == names(disp_block="12") == ("dispersive block 12", "dispersive_b12")
    assert names(disp_block="6,3") == ("dispersive blocks 3,6", "dispersive_b3-6")
    assert names(objective="contrastive", disp_variant="infonce_cos") == ("contrastive infonce_cos",
                                                                          "contrastive_infonce_cos")
    assert names(disp_group_size=0) == ("dispersive", "dispersive")     # not one of the paper's comparisons


def test_ab_sweeps_the_papers_settings(image_folder, tmp_path, capsys):
    """Several values of ab.py's --disp-* flags: one run of the dispersive arm per combination, each
    with its own settings and directory, each paired with the one baseline, whose diagnostics are
    taken as the arm measures its own."""
    root = tmp_path / "ab"
    targs = ab_train_args(image_folder, "--log-every", "1")
    probe_args = ["--probe", "--probe-t", "0.5", "--probe-train-samples", "16", "--probe-test-samples", "8"]
    rows = ab.main(["--steps", "2", "--seeds", "0", "--disp-variant", "infonce_l2", "hinge", "--disp-tau", "0.5", "1",
                    "--disp-block", "1", "last", "--root", str(root), *probe_args, "--", *targs])
    runs = {p.name: read_jsonl(p / "metrics.jsonl")[0] for p in root.iterdir() if p.is_dir()}
    # hinge has no tau (train.py refuses --disp-tau there): its two taus are one run, without the flag;
    # DiT-Mi/4 has 4 blocks, the default is block 1
    assert "note: hinge take(s) no temperature: those runs leave out --disp-tau" in capsys.readouterr().err
    assert sorted(runs) == ["baseline_s0", "dispersive_b4_s0", "dispersive_hinge_b4_s0", "dispersive_hinge_s0",
                            "dispersive_s0", "dispersive_tau1_b4_s0", "dispersive_tau1_s0"]
    assert runs["baseline_s0"]["args"]["disp_weight"] == 0 and runs["baseline_s0"]["args"]["disp_variant"] == "infonce_l2"
    run = runs["dispersive_tau1_b4_s0"]
    assert [run["args"][k] for k in ("disp_variant", "disp_tau", "disp_weight")] == ["infonce_l2", 1, 0.5]
    assert run["disp_blocks"] == [4] and runs["dispersive_hinge_s0"]["disp_blocks"] == [1]

    md = (root / "ab.md").read_text()
    header = [c.strip() for c in md.splitlines()[0].split("|")[1:-1]]
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in md.splitlines()[2:] if line.startswith("|")}
    # the baseline row shows block 1, which a Δ of a block-4 arm does not subtract: said under the table
    assert md.splitlines()[-1] == ("The baseline row's mean_sq_dist, probe_reg_t0.5 are at its block(s) [1]; each Δ "
                                   "line takes the baseline's at that arm's own block(s) (here also [4]).")
    assert list(table) == ["baseline", "dispersive", "dispersive block 4", "dispersive τ=1", "dispersive τ=1 block 4",
                           "dispersive hinge", "dispersive hinge block 4"] + [
        f"Δ {a} - baseline, paired" for a in ("dispersive", "dispersive block 4", "dispersive τ=1",
                                              "dispersive τ=1 block 4", "dispersive hinge", "dispersive hinge block 4")]
    by = {r["arm"]: r for r in rows}
    base = by["baseline"]
    delta = lambda arm, metric: table[f"Δ {arm} - baseline, paired"][header.index(metric) - 1]
    # the distances and the probe of the arm's own block, in the baseline too
    for arm, block in (("dispersive", 1), ("dispersive block 4", 4), ("dispersive hinge block 4", 4)):
        dist = base["per_block"]["mean_sq_dist"][block - 1]
        assert delta(arm, "mean_sq_dist") == f"{by[arm]['mean_sq_dist'] - dist:.4g}"
        acc = json.load(open(base["probe_json"]))
        acc = [p["accuracy"] for p in acc["rows"] if p["block"] == block]
        assert delta(arm, "probe_reg_t0.5") == f"{by[arm]['probe_reg_t0.5'] - acc[0]:.4g}"
    # the dispersive loss's value is comparable only in the baseline's form and block
    assert delta("dispersive", "disp_diag") == f"{by['dispersive']['disp_diag'] - base['disp_diag']:.4g}"
    assert all(delta(a, "disp_diag") == "-" for a in ("dispersive τ=1", "dispersive block 4", "dispersive hinge"))

    # --accum-steps is plumbing, except with whole-batch groups, where a group is one micro-batch
    there = dict(plots.read_log(root / "baseline_s0")[0]["args"])
    ab.check_reusable(root / "baseline_s0", dict(there, accum_steps=2))
    g0 = tmp_path / "g0"
    g0.mkdir()
    (g0 / "metrics.jsonl").write_text(json.dumps({"type": "config", "args": dict(there, disp_group_size=0)}) + "\n")
    with pytest.raises(UserError, match=r"--accum-steps 1, not 2, with --disp-group-size 0"):
        ab.check_reusable(g0, dict(there, disp_group_size=0, accum_steps=2))
    ab.check_reusable(g0, dict(there, disp_group_size=0, accum_steps=1))
    # a directory that holds a run trained with other flags is not taken for the one ab.py would train there
    with pytest.raises(UserError, match=r"dispersive_s0 holds a run trained with other flags \(--lr 0.0001, not 0.05\)"):
        ab.main(["--steps", "2", "--arms", "dispersive", "--root", str(root), "--", *targs, "--lr", "0.05"])
    other = tmp_path / "other"
    train.main(tiny_args(image_folder, other / "dispersive_s0", "--steps", "2", "--disp-variant", "hinge"))
    with pytest.raises(UserError, match="arm 'dispersive hinge', not 'dispersive'"):
        ab.main(["--steps", "2", "--arms", "dispersive", "--root", str(other), "--", *targs])
    with pytest.raises(UserError, match="sets .*--disp-tau"):
        ab.main(["--steps", "2", "--root", str(other), "--", *targs, "--disp-tau", "1"])
    with pytest.raises(UserError, match="--disp-block '9' is out of range"):
        ab.main(["--steps", "2", "--disp-block", "9", "--root", str(other), "--", *targs])
    with pytest.raises(UserError, match="--compare evaluates existing runs: --disp-tau would do nothing"):
        ab.main(["--compare", str(root / "baseline_s0"), "--disp-tau", "1", "--root", str(other)])
