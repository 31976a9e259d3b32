"""ab.py: both arms on a tiny budget, the same data order and noise, the table, --compare."""
import json

import numpy as np
import pytest
from PIL import Image

import ab
import train
from conftest import read_jsonl, tiny_args
from utils import UserError


def test_ab_two_arms_same_data_table_and_compare(image_folder, tmp_path, monkeypatch, capsys):
    seen = []          # (seed, step, indices) for every batch every run drew, in order

    class Recording(train.BatchStream):
        def indices(self, step):
            idx = super().indices(step)
            seen.append((self.seed, step, idx.tolist()))
            return idx
    monkeypatch.setattr(train, "BatchStream", Recording)

    root = tmp_path / "ab"
    # tiny_args' --out is dropped: ab.py chooses it (passing it is an error, tested below)
    targs = tiny_args(image_folder, "unused", "--log-every", "1")
    i = targs.index("--out")
    targs = targs[:i] + targs[i + 2:]
    rows = ab.main(["--steps", "3", "--seeds", "0,1", "--disp-weight", "0.5", "--root", str(root), "--", *targs])
    printed = capsys.readouterr().out

    # four runs: each seed trained both arms, over the very same batches
    runs = [seen[k:k + 3] for k in range(0, 12, 3)]
    assert len(seen) == 12 and [r[0][0] for r in runs] == [0, 0, 1, 1]
    assert runs[0] == runs[1] and runs[2] == runs[3] and runs[0] != runs[2]
    logs = {name: [r for r in read_jsonl(root / name / "metrics.jsonl") if r["type"] == "train"]
            for name in ("w0_s0", "w0.5_s0", "w0_s1", "w0.5_s1")}
    for seed in (0, 1):
        base, disp = logs[f"w0_s{seed}"], logs[f"w0.5_s{seed}"]
        # step 1 runs before any update: same weights, batch and noise give the same numbers
        assert base[0]["flow"] == pytest.approx(disp[0]["flow"], rel=1e-6)
        assert base[0]["disp_diag"] == pytest.approx(disp[0]["disp_diag"], rel=1e-6)
        assert all(r["disp"] == 0 for r in base) and all(r["disp"] < 0 for r in disp)
        # the baseline logs the diagnostics too: -log B <= L_disp <= 0
        assert all(-np.log(8) <= r["disp_diag"] <= 0 and r["mean_sq_dist"] > 0 for r in base)

    # the table: one line per arm (mean ± std over both seeds), and the paired difference
    assert "| baseline (w=0) | 0,1 | 3 |" in printed and "| dispersive (w=0.5) | 0,1 | 3 |" in printed
    assert "Δ (w=0.5) - baseline, paired" in printed and "±" in printed
    assert {"flow", "ema_flow", "disp_diag", "mean_sq_dist"} <= set(rows[0])
    md = (root / "ab.md").read_text()
    assert md.strip() in printed and len(json.load(open(root / "ab.json"))["rows"]) == 4
    assert Image.open(root / "ab.png").size == (640, 400)

    # --compare re-evaluates existing runs without training, to the same table;
    # re-running the A/B itself finds the runs done and trains nothing either
    def no_training(argv):
        raise AssertionError("trained again")
    monkeypatch.setattr(train, "main", no_training)
    dirs = [str(root / n) for n in ("w0_s0", "w0.5_s0", "w0_s1", "w0.5_s1")]
    ab.main(["--compare", *dirs, "--root", str(tmp_path / "cmp")])
    assert (tmp_path / "cmp" / "ab.md").read_text() == md
    ab.main(["--steps", "3", "--seeds", "0,1", "--root", str(root), "--", *targs])
    assert (root / "ab.md").read_text() == md


def test_ab_bad_input(tmp_path):
    with pytest.raises(UserError, match="--steps"):
        ab.main(["--seeds", "0", "--root", str(tmp_path)])
    with pytest.raises(UserError, match="sets --seed"):
        ab.main(["--steps", "2", "--root", str(tmp_path), "--", "--seed", "3"])
    with pytest.raises(UserError, match="not a run directory"):
        ab.main(["--compare", str(tmp_path), "--root", str(tmp_path / "x")])
