"""probe.py: the classifier separates what is separable and nothing more, the CLI writes one
finite row per (block, t), its statistics are loss.block_stats of the very inputs described, and
bad input is a one-line error."""
import contextlib
import json
import math
import os
import shutil

import pytest
import torch

import probe
import train
from conftest import make_image_folder, present, run_script, tiny_args
from data import load_dataset
from loss import block_stats
from rundir import list_checkpoints
from sample import load_model
from utils import UserError, run_main


def blobs(n=3000, d=32, k=4, seed=0):
    """k Gaussian clusters of unit variance whose means lie >= 30 sigma apart (checked): linearly
    separable in all but a vanishing fraction of draws (a point 15 sigma from its mean)."""
    g = torch.Generator().manual_seed(seed)
    means = 4 * torch.randn(k, d, generator=g)
    assert torch.cdist(means, means).add(torch.eye(k) * 1e9).min() > 30
    y = torch.randint(0, k, (n,), generator=g)
    return means[y] + torch.randn(n, d, generator=g), y, g


def test_linear_probe_separable_and_shuffled():
    x, y, g = blobs()
    train_acc, acc, _ = probe.linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], 4)
    assert train_acc == 1.0 and acc >= 0.995
    # several weight decays: chosen on a fifth of the fitting split. With classes 0 and 1 as 9 to 1,
    # 1e4 shrinks W to ~0 and the (undecayed) bias answers class 0: 90%, not 100%
    zero, one = torch.where(y == 0)[0], torch.where(y == 1)[0]
    idx = torch.cat([zero[:450], one[:50]])[torch.randperm(500, generator=g)]
    xi, yi = x[idx], (y[idx] == 1).long()
    assert probe.linear_probe(xi[:400], yi[:400], xi[400:], yi[400:], 2, [1e4, 1e-4])[1:] == (1.0, 1e-4)
    assert probe.linear_probe(xi[:400], yi[:400], xi[400:], yi[400:], 2, 1e4)[1] < 0.95
    # Shuffled labels carry no information about x: whatever the classifier learnt, each held-out
    # prediction is right with probability sum_k p(pred k) p(label k) ~ 1/4, so the accuracy of 2000
    # is Binomial(2000, 1/4) / 2000, sd 0.0097; 0.05 is 5 sd (and the seed is fixed).
    ys = y[torch.randperm(len(y), generator=g)]
    train_acc, acc, _ = probe.linear_probe(x[:1000], ys[:1000], x[1000:], ys[1000:], 4)
    assert abs(acc - 0.25) < 0.05
    assert train_acc > acc          # it does fit noise of the fitting split (D = 32 weights per class)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    images = make_image_folder(tmp_path_factory.mktemp("images"))
    out = tmp_path_factory.mktemp("run") / "flow"
    train.main(tiny_args(images, out, "--steps", "2"))
    return images, out


def by_hand_stats(ckpt_path, images, block, t, objective, train=16, test=8, keep=8, seed=0):
    """loss.block_stats of one block on the inputs probe.py's docstring describes, computed here
    from the documented recipe (not from probe.py's helpers)."""
    _, model, obj, _ = load_model(ckpt_path)
    assert obj == objective
    data = load_dataset("folder", images)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    x, _ = data.batch(perm[:train + test], generator=g)
    eps = torch.randn(x.shape, generator=g)
    x, eps = x[:keep], eps[:keep]
    if objective == "diffusion":
        import diffusion        # here, so that deleting diffusion.py leaves this file importable
        k = round(1000 * (1 - t))
        a = diffusion.alphas_cumprod()[k].item()
        xt, tt = math.sqrt(a) * x + math.sqrt(1 - a) * eps, torch.full((keep,), 1 - k / 1000)
    else:
        xt, tt = t * x + (1 - t) * eps, torch.full((keep,), t)
    null = torch.full((keep,), model.num_classes, dtype=torch.long)
    with torch.no_grad():
        _, blocks = model(xt, tt, null, return_blocks=(block,))
    return [v.item() for v in block_stats(blocks[block])]


def test_cli_writes_rows_and_block_stats(tiny_run, tmp_path):
    images, run = tiny_run
    ckpt = list_checkpoints(run)[0]
    r = run_script("probe.py", "--ckpt", str(run), "--train-samples", "16", "--test-samples", "8", "--stats-samples",
                   "8", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    res = json.load(open(ckpt + ".probe.json"))          # default: next to the newest checkpoint of the run
    assert res["checkpoint"] == ckpt and res["null_label"] == 3 and res["blocks"] == [1, 2, 3, 4]
    assert sorted((row["block"], row["t"]) for row in res["rows"]) == [(b, t) for b in range(1, 5) for t in (0.5, 0.9)]
    assert [p["t"] for p in res["pixels"]] == [0.9, 0.5]
    for row in res["rows"] + res["pixels"]:
        assert all(math.isfinite(row[k]) for k in ("accuracy", "train_accuracy", "mean_sq_dist", "rms", "seconds"))
        assert 0 <= row["accuracy"] <= 1 and row["mean_sq_dist"] > 0 and row["rms"] > 0
    held_out = load_dataset("folder", images).labels[torch.randperm(24, generator=torch.Generator().manual_seed(0))[16:]]
    assert res["chance"] == torch.bincount(held_out).max().item() / 8
    assert res["arm"] == "dispersive" and res["disp_blocks"] == [1]
    # the printed table: the pixel rows, then one line per (block, t)
    lines = [l for l in r.stdout.splitlines() if l.startswith("| ")]
    assert len(lines) == 2 + 2 + 8 and lines[2].startswith("| pixels | 0.9 |") and "1 (regularised)" in r.stdout
    row = next(row for row in res["rows"] if row["block"] == 2 and row["t"] == 0.5)
    assert [row["mean_sq_dist"], row["rms"]] == pytest.approx(by_hand_stats(ckpt, images, 2, 0.5, "flow"), rel=1e-5)


@pytest.mark.parametrize("objective", present("diffusion", "meanflow", "contrastive"))
def test_other_objectives(tiny_run, tmp_path, objective):
    images, _ = tiny_run
    out = tmp_path / objective
    train.main(tiny_args(images, out, "--steps", "2", "--objective", objective))
    ckpt = list_checkpoints(out)[0]
    res = probe.probe(ckpt, blocks=[3], ts=(0.9, 0.2), train_samples=16, test_samples=8, stats_samples=8,
                      out=str(tmp_path / "p.json"))
    assert res["objective"] == objective and len(res["rows"]) == 2
    assert all(math.isfinite(r["accuracy"]) and math.isfinite(r["mean_sq_dist"]) for r in res["rows"])
    row = res["rows"][1]
    assert row["t"] == 0.2
    assert [row["mean_sq_dist"], row["rms"]] == pytest.approx(by_hand_stats(ckpt, images, 3, 0.2, objective), rel=1e-5)


def test_a_model_that_never_dropped_labels_is_warned_of(tiny_run, tmp_path, capsys):
    """The probe feeds the null label; with --p-uncond 0 its embedding is the untrained initial one."""
    images, _ = tiny_run
    train.main(tiny_args(images, tmp_path / "run", "--steps", "1", "--p-uncond", "0"))
    capsys.readouterr()
    probe.probe(str(tmp_path / "run"), blocks=[1], ts=(0.9,), train_samples=16, test_samples=8, stats_samples=8, out=False)
    assert "trained with --p-uncond 0: that label's embedding never trained" in capsys.readouterr().err


def test_bad_input(tiny_run, tmp_path, capsys):
    _, run = tiny_run
    for argv, message in [(["--ckpt", str(tmp_path / "nope.pt")], "does not exist"),
                          (["--ckpt", str(run), "--blocks", "2,5"], "out of range: this model has blocks 1..4"),
                          (["--ckpt", str(run), "--t", "0.9,1.5"], "--t '0.9,1.5'"),
                          (["--ckpt", str(run), "--train-samples", "20", "--test-samples", "8"], "exceed the 24 images")]:
        with pytest.raises(SystemExit) as e:
            run_main(lambda: probe.main(argv))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    with pytest.raises(UserError, match="no checkpoint in"):
        probe.probe(str(tmp_path))


def test_the_default_output_is_checked_before_probing(tiny_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(tiny_run[1], run)           # a copy: the other tests share tiny_run
    ckpt = list_checkpoints(run)[0]
    monkeypatch.setattr(probe, "probe", lambda *a, **k: pytest.fail("probed before checking where the result goes"))
    with contextlib.suppress(FileNotFoundError):
        os.remove(ckpt + ".probe.json")
    os.mkdir(ckpt + ".probe.json")              # the default name, taken by a directory
    with pytest.raises(UserError, match=r"--out .*\.probe\.json' is a directory"):
        probe.main(["--ckpt", str(run)])
