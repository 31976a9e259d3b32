"""fid.py: the Frechet distance against closed forms, and the FID plumbing end to end with
stand-in feature extractors (the Inception weights are not downloadable in CI)."""
import json
import os
import re
import sys

import numpy as np
import pytest
import torch

import data
import fid
import sample
import train
from conftest import make_image_folder, read_jsonl, run_script, tiny_args, torchrun
from utils import UserError


def random_rotation(d, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


# ----------------------------------------------------------------------------------------
# The Frechet distance
# ----------------------------------------------------------------------------------------

def test_frechet_1d_closed_form():
    # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2
    d = fid.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]]))
    assert d == pytest.approx(9.0 + 1.0, abs=1e-12)


def test_frechet_commuting_covariances():
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1 + 4 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()      # 5 + 4 + 1 + 0.25
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-10)


def test_frechet_non_commuting_closed_form():
    # S1 = c I and S2 = R diag(b) R^T (not diagonal): tr((S1 S2)^(1/2)) = sqrt(c) sum sqrt(b)
    d, c = 6, 2.0
    b = np.array([0.5, 1.0, 2.0, 3.0, 4.0, 5.0])
    R = random_rotation(d, 0)
    s2 = R @ np.diag(b) @ R.T
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    expected = d * 0.25 + c * d + b.sum() - 2 * np.sqrt(c) * np.sqrt(b).sum()
    assert fid.frechet_distance(mu1, c * np.eye(d), mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert fid.frechet_distance(mu2, s2, mu2, s2) == pytest.approx(0.0, abs=1e-9)


def sqrtm_frechet(mu1, s1, mu2, s2):
    """The textbook formula (pytorch-fid's), with scipy's general matrix square root."""
    from scipy import linalg
    covmean = linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real))


def test_frechet_rank_deficient_matches_scipy_sqrtm():
    pytest.importorskip("scipy")
    rng = np.random.default_rng(0)
    m1, s1 = fid.statistics(rng.normal(size=(5, 20)))          # N < D: singular covariances
    m2, s2 = fid.statistics(rng.normal(size=(5, 20)) @ rng.normal(size=(20, 20)) * 0.5 + 1)
    value = fid.frechet_distance(m1, s1, m2, s2)
    assert np.isfinite(value) and value > 0
    assert value == pytest.approx(sqrtm_frechet(m1, s1, m2, s2), rel=1e-6)
    # the cross term matters here: dropping it, or taking tr(S1 S2) for it, is far off
    assert value != pytest.approx(((m1 - m2) ** 2).sum() + np.trace(s1 + s2), rel=1e-2)
    same_mean = fid.frechet_distance(m1, s1, m1, s2)
    assert same_mean == pytest.approx(sqrtm_frechet(m1, s1, m1, s2), rel=1e-6)
    with pytest.raises(UserError):
        fid.frechet_distance(m1, s1, m2[:3], s2[:3, :3])


def test_statistics_match_numpy():
    x = np.random.default_rng(1).normal(size=(50, 4))
    mu, sigma = fid.statistics(x)
    assert np.allclose(mu, x.mean(0)) and np.allclose(sigma, np.cov(x.T, ddof=1))


def test_frechet_agrees_with_torch_fidelity():
    tf_fid = pytest.importorskip("torch_fidelity.metric_fid")
    rng = np.random.default_rng(2)
    m1, s1 = fid.statistics(rng.normal(size=(300, 8)))
    m2, s2 = fid.statistics(rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) + 0.3)
    theirs = tf_fid.fid_statistics_to_metric({"mu": m1, "sigma": s1}, {"mu": m2, "sigma": s2}, False)
    assert fid.frechet_distance(m1, s1, m2, s2) == pytest.approx(theirs[tf_fid.KEY_METRIC_FID], rel=1e-8)


# ----------------------------------------------------------------------------------------
# Plumbing with the offline classifier extractor (no torch-fidelity needed)
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder_and_classifier(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    images = make_image_folder(root / "images")
    clf = str(root / "clf.pt")
    fid.main(["--train-classifier", clf, "--ref-data", "folder", "--ref-data-path", images,
              "--classifier-epochs", "1", "--device", "cpu"])
    return root, images, clf


def test_training_the_classifier_shows_its_progress_and_loss(tmp_path, capsys):
    """Ten epochs of CIFAR-10 take minutes on a CPU: the user sees the steps and the loss go by."""
    images = make_image_folder(tmp_path / "images")
    fid.main(["--train-classifier", str(tmp_path / "clf.pt"), "--ref-data", "folder", "--ref-data-path", images,
              "--classifier-epochs", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert "training the classifier" in err and "1/1" in err and re.search(r"loss=\d+\.\d{3}", err)


def test_fid_of_npz_writes_protocol_json(folder_and_classifier, tmp_path):
    root, images, clf = folder_and_classifier
    arr = fid.load_images(images)[0].permute(0, 2, 3, 1).numpy()       # (24, 16, 16, 3)
    np.savez(tmp_path / "same.npz", arr_0=arr)                          # the reference itself: FD ~ 0
    np.savez(tmp_path / "dark.npz", arr_0=(arr // 4).astype(np.uint8))  # a shifted set: FD > 0
    common = ["--ref-data", "folder", "--ref-data-path", images, "--extractor", clf, "--device", "cpu"]
    same = fid.main(["--samples", str(tmp_path / "same.npz"), *common])
    dark = fid.main(["--samples", str(tmp_path / "dark.npz"), *common, "--out", str(tmp_path / "d.json")])
    assert abs(same["value"]) < 1e-6 and dark["value"] > 1e-3
    saved = json.load(open(tmp_path / "same.fid.json"))
    assert saved["value"] == same["value"] and saved["num_samples"] == 24
    assert saved["metric"] == "FD-classifier-24" and saved["feature_extractor"]["name"] == "fd-classifier"
    assert saved["reference"]["data"] == "folder" and saved["reference"]["num_images"] == 24
    assert json.load(open(tmp_path / "d.json"))["value"] == dark["value"]


def test_samples_of_another_size_or_an_empty_classifier_are_refused(folder_and_classifier, tmp_path, monkeypatch):
    root, images, clf = folder_and_classifier
    arr = fid.load_images(images)[0].permute(0, 2, 3, 1).numpy()       # (24, 16, 16, 3)
    np.savez(tmp_path / "small.npz", arr_0=np.ascontiguousarray(arr[:, :12, :12]))
    common = ["--ref-data", "folder", "--ref-data-path", images, "--device", "cpu"]
    with pytest.raises(UserError, match="samples are 12x12 pixels, the reference images .* 16x16"):
        fid.main(["--samples", str(tmp_path / "small.npz"), "--extractor", clf, *common])
    train.main(tiny_args(make_image_folder(tmp_path / "big", size=32), tmp_path / "run", "--steps", "1"))
    with monkeypatch.context() as m:
        m.setattr(fid, "generate_n", lambda *a, **k: pytest.fail("sampled before checking the size"))
        with pytest.raises(UserError, match="samples are 32x32 pixels"):
            fid.main(["--ckpt", str(tmp_path / "run"), "--num-samples", "4", "--extractor", clf, *common])
    grey = np.ascontiguousarray(arr[..., :1])                           # the same images, 1 channel
    np.savez(tmp_path / "grey.npz", arr_0=grey)
    with pytest.raises(UserError, match=r"samples have 1 channel\(s\), the reference images .* 3: not the same"):
        fid.main(["--samples", str(tmp_path / "grey.npz"), "--extractor", clf, *common])
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(UserError, match="--extractor .*empty.pt.*: cannot read it"):
        fid.load_extractor(str(tmp_path / "empty.pt"))


def test_saved_reference_stats_know_their_classifier_and_image_shape(folder_and_classifier, tmp_path):
    """Every FD-classifier is "fd-classifier" by name: statistics saved with one classifier, read
    with another, would score samples in a feature space that is not theirs. The stats file keeps
    the classifier's digest, and the shape of the images, and both are checked when it is read."""
    root, images, clf = folder_and_classifier
    arr = fid.load_images(images)[0].permute(0, 2, 3, 1).numpy()       # (24, 16, 16, 3)
    np.savez(tmp_path / "same.npz", arr_0=arr)
    stats = str(tmp_path / "ref.npz")
    made = fid.main(["--samples", str(tmp_path / "same.npz"), "--ref-data", "folder", "--ref-data-path", images,
                     "--extractor", clf, "--save-ref-stats", stats, "--device", "cpu"])
    with np.load(stats) as z:
        assert list(z["image_shape"]) == [3, 16, 16] and len(str(z["extractor_sha256"])) == 16
    again = fid.main(["--samples", str(tmp_path / "same.npz"), "--ref-stats", stats, "--extractor", clf,
                      "--device", "cpu", "--out", str(tmp_path / "again.json")])
    assert again["value"] == pytest.approx(made["value"], abs=1e-9) and again["reference"]["image_shape"] == [3, 16, 16]
    other = str(tmp_path / "other.pt")            # a second classifier: other weights, the same name and size
    fid.main(["--train-classifier", other, "--ref-data", "folder", "--ref-data-path", images,
              "--classifier-epochs", "0", "--seed", "1", "--device", "cpu"])
    with pytest.raises(UserError, match=r"--ref-stats .*ref.npz' was made with another classifier \(sha256 "):
        fid.main(["--samples", str(tmp_path / "same.npz"), "--ref-stats", stats, "--extractor", other, "--device", "cpu"])
    np.savez(tmp_path / "small.npz", arr_0=np.ascontiguousarray(arr[:, :12, :12]))
    with pytest.raises(UserError, match=r"samples are 12x12 pixels, the reference images \(.*ref.npz\) 16x16"):
        fid.main(["--samples", str(tmp_path / "small.npz"), "--ref-stats", stats, "--extractor", clf, "--device", "cpu"])


def test_fid_from_checkpoint_records_generation(folder_and_classifier, tmp_path):
    root, images, clf = folder_and_classifier
    train.main(tiny_args(images, tmp_path / "run", "--steps", "2"))
    ckpt = str(tmp_path / "run" / "checkpoints" / "step_0000002.pt")
    stats = str(tmp_path / "ref.npz")
    res = fid.main(["--ckpt", ckpt, "--num-samples", "6", "--steps", "2", "--solver", "heun", "--cfg-scale", "1.5",
                    "--ref-data", "folder", "--ref-data-path", images, "--extractor", clf, "--save-ref-stats", stats,
                    "--device", "cpu", "--out", str(tmp_path / "r.json")])
    g = json.load(open(tmp_path / "r.json"))["generation"]
    assert g["solver"] == "heun" and g["steps"] == 2 and g["cfg_scale"] == 1.5 and g["ema"] is True and g["step"] == 2
    assert g["batch_size"] == 256
    # without --ref-data the reference is the data the checkpoint's model was trained on
    own = fid.main(["--ckpt", ckpt, "--num-samples", "6", "--steps", "2", "--solver", "heun", "--cfg-scale", "1.5",
                    "--extractor", clf, "--device", "cpu", "--out", str(tmp_path / "own.json")])
    assert own["value"] == pytest.approx(res["value"], rel=1e-9)
    assert own["reference"]["data"] == "folder" and own["reference"]["data_path"] == os.path.abspath(images)
    # the noise of ab.py's evaluation (fid.generate_n's batches of 256): the same images for the seed,
    # over more than one batch
    more = fid.main(["--ckpt", ckpt, "--num-samples", "300", "--steps", "2", "--extractor", clf, "--device", "cpu",
                     "--out", str(tmp_path / "more.json")])
    _, model, _, _ = sample.load_model(ckpt, "ema", "cpu")
    fn, _ = fid.load_extractor(clf)
    ref = fid.statistics(fid.features(fn, data.load_dataset("folder", images).images))
    imgs = fid.generate_n(model, 300, sample.euler, 2)
    assert more["value"] == pytest.approx(fid.frechet_distance(*fid.statistics(fid.features(fn, imgs)), *ref), rel=1e-9)
    # precomputed statistics give the very same number
    again = fid.main(["--ckpt", ckpt, "--num-samples", "6", "--steps", "2", "--solver", "heun", "--cfg-scale", "1.5",
                      "--ref-stats", stats, "--extractor", clf, "--device", "cpu", "--out", str(tmp_path / "r2.json")])
    assert again["value"] == pytest.approx(res["value"], rel=1e-9)
    assert again["reference"]["stats_file"] == os.path.abspath(stats)


def test_scoring_shows_its_sampling_and_large_feature_sets(folder_and_classifier, tmp_path, capsys):
    """fid.py --ckpt samples 50K images by default (and ab.py 10K per run): minutes, each with a
    bar; so do the features of a set of 5,000 images or more (a reference set), not of fewer."""
    root, images, clf = folder_and_classifier
    train.main(tiny_args(images, tmp_path / "run", "--steps", "2"))
    capsys.readouterr()
    fid.main(["--ckpt", str(tmp_path / "run"), "--num-samples", "6", "--steps", "2", "--ref-data", "folder",
              "--ref-data-path", images, "--extractor", clf, "--device", "cpu"])
    assert "sampling" in capsys.readouterr().err
    def fn(x):          # any extractor: the bar is the point
        return x.float().flatten(1)[:, :3]
    for n, shown in ((4999, False), (5000, True)):
        feats = fid.features(fn, torch.zeros(n, 1, 2, 2, dtype=torch.uint8), progress=True)
        assert feats.shape == (n, 3) and ("features of 5000 images" in capsys.readouterr().err) == shown


def test_sample_npz_carries_protocol_to_fid(folder_and_classifier, tmp_path):
    root, images, clf = folder_and_classifier
    train.main(tiny_args(images, tmp_path / "run", "--steps", "2"))
    r = run_script("sample.py", "--ckpt", str(tmp_path / "run" / "checkpoints" / "step_0000002.pt"), "--steps", "3",
                   "--num-samples", "5", "--out", str(tmp_path / "s.npz"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    res = fid.main(["--samples", str(tmp_path / "s.npz"), "--ref-data", "folder", "--ref-data-path", images,
                    "--extractor", clf, "--device", "cpu"])
    assert res["generation"]["steps"] == 3 and res["generation"]["solver"] == "euler" and res["num_samples"] == 5


def test_periodic_fid_is_logged(folder_and_classifier, tmp_path):
    root, images, clf = folder_and_classifier
    train.main(tiny_args(images, tmp_path / "run", "--steps", "4", "--fid-every", "2", "--fid-samples", "6",
                         "--fid-extractor", clf, "--sample-steps", "2"))
    recs = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "fid"]
    assert [r["step"] for r in recs] == [2, 4]
    assert all(r["metric"] == "FD-classifier-6" and np.isfinite(r["value"]) and r["num_samples"] == 6 for r in recs)


def test_resuming_with_another_fid_measure_says_the_curve_is_two_series(folder_and_classifier, tmp_path, capsys):
    """The solver, its steps and the FID's sample count are plumbing (no 'changed flags' warning),
    but changed on --resume they make the periodic FID's later values another measure."""
    root, images, clf = folder_and_classifier
    flags = ["--ckpt-every", "2", "--fid-every", "2", "--fid-samples", "6", "--fid-extractor", clf]
    train.main(tiny_args(images, tmp_path / "run", "--steps", "2", *flags, "--sample-steps", "2"))
    capsys.readouterr()
    train.main(tiny_args(images, tmp_path / "run", "--steps", "4", *flags, "--sample-steps", "3", "--resume"))
    err = capsys.readouterr().err
    assert "warning: the periodic FID measures from step 2 with --sample-steps 3 (was 2): its values" in err
    assert "resuming with changed" not in err
    recs = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "fid"]
    assert [(r["step"], r["steps"]) for r in recs] == [(2, 2), (4, 3)]      # each line names its own measure
    train.main(tiny_args(images, tmp_path / "run", "--steps", "6", *flags, "--sample-steps", "3", "--resume"))
    assert "periodic FID measures" not in capsys.readouterr().err           # the same measure: no warning


def test_periodic_fid_with_the_papers_dopri5_sampler(folder_and_classifier, tmp_path):
    """--sample-solver dopri5: the grids and the periodic FID both come from the paper's sampler;
    the FID line says so, and its value is fid.py's for the same checkpoint and solver."""
    pytest.importorskip("torchdiffeq")
    root, images, clf = folder_and_classifier
    out = tmp_path / "run"
    train.main(tiny_args(images, out, "--steps", "2", "--lr", "1e-2", "--ckpt-every", "2", "--fid-every", "2",
                         "--fid-samples", "6", "--fid-extractor", clf, "--sample-every", "2",
                         "--sample-solver", "dopri5"))
    [rec] = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "fid"]
    assert rec["solver"] == "dopri5" and rec["steps"] is None
    again = fid.main(["--ckpt", str(out / "checkpoints" / "step_0000002.pt"), "--num-samples", "6",
                      "--solver", "dopri5", "--ref-data", "folder", "--ref-data-path", images, "--extractor", clf,
                      "--device", "cpu", "--out", str(tmp_path / "again.json")])
    assert rec["value"] == pytest.approx(again["value"], rel=1e-9)
    euler = fid.main(["--ckpt", str(out / "checkpoints" / "step_0000002.pt"), "--num-samples", "6",
                      "--ref-data", "folder", "--ref-data-path", images, "--extractor", clf,
                      "--device", "cpu", "--out", str(tmp_path / "euler.json")])
    assert euler["value"] != pytest.approx(rec["value"], rel=1e-6)          # another sampler, another number
    assert os.path.isfile(out / "samples" / "step_0000002.png")
    for flags, message in ((["--sample-solver", "dopri5", "--sample-steps", "5"], "--sample-steps: dopri5 chooses"),
                           (["--sample-solver", "meanflow"], "--sample-solver meanflow: flow models are sampled")):
        with pytest.raises(UserError, match=message):
            train.main(tiny_args(images, tmp_path / "bad", "--steps", "2", "--sample-every", "2", *flags))
    assert not os.path.exists(tmp_path / "bad")


def test_dopri5_without_torchdiffeq_is_refused_before_the_work(folder_and_classifier, tmp_path, monkeypatch):
    """torchdiffeq is optional: without it, dopri5 is refused at once, under the caller's flag name,
    not at the first grid after hours of training, nor after fid.py computed its reference."""
    root, images, clf = folder_and_classifier
    train.main(tiny_args(images, tmp_path / "run", "--steps", "2", "--ckpt-every", "2"))
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)       # `import torchdiffeq` now raises ImportError
    with pytest.raises(UserError, match="^--sample-solver dopri5 needs torchdiffeq: pip install torchdiffeq"):
        train.main(tiny_args(images, tmp_path / "new", "--steps", "2", "--sample-every", "2", "--sample-solver", "dopri5"))
    assert not os.path.exists(tmp_path / "new")
    monkeypatch.setattr(fid, "reference_stats", lambda *a, **k: pytest.fail("computed the reference first"))
    with pytest.raises(UserError, match="^--solver dopri5 needs torchdiffeq"):
        fid.main(["--ckpt", str(tmp_path / "run"), "--solver", "dopri5", "--ref-data", "folder",
                  "--ref-data-path", images, "--extractor", clf, "--device", "cpu"])


def test_ab_keeps_periodic_fids_of_other_samplers_apart(folder_and_classifier, tmp_path):
    """ab.py tabulates each run's last periodic FID. One made with a sampler other than the
    objective's default (here 3 Euler steps instead of 50) is another number: it gets a column of
    its own, named by its sampler, instead of a paired difference with the default's."""
    import ab
    root, images, clf = folder_and_classifier
    flags = ["--steps", "2", "--fid-every", "2", "--fid-samples", "6", "--fid-extractor", clf]
    train.main(tiny_args(images, tmp_path / "baseline_s0", *flags, "--disp-weight", "0"))
    train.main(tiny_args(images, tmp_path / "dispersive_s0", *flags, "--disp-weight", "0.5", "--sample-steps", "3"))
    rows = ab.main(["--compare", str(tmp_path / "baseline_s0"), str(tmp_path / "dispersive_s0"),
                    "--root", str(tmp_path / "ab")])
    columns = {r["arm"]: {k for k in r if k.startswith("periodic_")} for r in rows}
    assert columns == {"baseline": {"periodic_FD-classifier-6"}, "dispersive": {"periodic_FD-classifier-6 euler 3"}}


@pytest.mark.slow
def test_periodic_fid_under_torchrun_is_that_of_one_process(folder_and_classifier, tmp_path):
    """Under torchrun each of 2 ranks samples every other batch (600 samples: batches of 256, 256
    and 88) and the feature statistics are pooled (fid.pooled_statistics): the FD logged must be
    the one a single process computes for the same EMA weights."""
    from data import load_dataset
    from sample import load_model
    root, images, clf = folder_and_classifier
    out = tmp_path / "run"
    r = torchrun(2, "train.py", *tiny_args(images, out, "--steps", "2", "--lr", "1e-2", "--ckpt-every", "2",
                                           "--fid-every", "2", "--fid-samples", "600", "--fid-extractor", clf,
                                           "--sample-steps", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    logged = [rec for rec in read_jsonl(out / "metrics.jsonl") if rec["type"] == "fid"]
    assert len(logged) == 1 and logged[0]["num_samples"] == 600
    _, ema, _, _ = load_model(str(out / "checkpoints" / "step_0000002.pt"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # as each rank: the same arithmetic, hence the same uint8 images
    try:
        one = fid.TrainingFID(clf, None, None, load_dataset("folder", images).images, "cpu", 2, 600, 2)(ema, "flow", 0)
    finally:
        torch.set_num_threads(threads)
    # pooled sums against np.cov differ by about 1e-11 here; each rank sampling every batch (the
    # 1,200 samples of a duplicated set) moves the FD by 2e-7, and a rank's batch that starts from
    # another batch's noise by 1e-3
    assert logged[0]["value"] == pytest.approx(one["value"], rel=1e-9) and one["value"] > 0


def test_a_signal_skips_the_periodic_fid_for_the_checkpoint(folder_and_classifier, tmp_path, monkeypatch):
    """SIGTERM during step 2, whose FID is due: no minutes of sampling first; the checkpoint at
    once (a scheduler's grace period is short), and no FID line. The resumed run measures it."""
    import os
    import signal
    root, images, clf = folder_and_classifier
    real_step = train.train_step

    def step_with_a_signal(*args, **kwargs):
        out = real_step(*args, **kwargs)
        if calls["steps"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)        # the handler only raises train.py's flag
        calls["steps"] += 1
        return out
    calls = {"steps": 0}
    monkeypatch.setattr(train, "train_step", step_with_a_signal)
    train.main(tiny_args(images, tmp_path / "run", "--steps", "4", "--fid-every", "2", "--fid-samples", "6",
                         "--fid-extractor", clf, "--sample-steps", "2"))
    recs = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert not [r for r in recs if r["type"] == "fid"] and recs[-1]["step"] == 2
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["step_0000002.pt"]
    # resumed, the run first measures the FID of step 2 that the signal cut short: the curve has no gap
    monkeypatch.setattr(train, "train_step", real_step)
    train.main(tiny_args(images, tmp_path / "run", "--steps", "4", "--fid-every", "2", "--fid-samples", "6",
                         "--fid-extractor", clf, "--sample-steps", "2", "--resume"))
    recs = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] in ("fid", "train")]
    assert [(r["type"], r["step"]) for r in recs] == [("train", 2), ("fid", 2), ("train", 4), ("fid", 4)]


def test_bad_inputs_are_one_line(tmp_path):
    r = run_script("fid.py", "--samples", str(tmp_path / "missing.npz"), "--extractor", str(tmp_path / "no.pt"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--extractor" in r.stderr
    r = run_script("fid.py", "--extractor", str(tmp_path / "no.pt"))
    assert r.returncode == 2 and "exactly one of --samples" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------
# Bad input: one line, and before the long work (sampling, training the classifier)
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(folder_and_classifier):
    root, images, clf = folder_and_classifier
    train.main(tiny_args(images, root / "run", "--steps", "2"))
    return str(root / "run" / "checkpoints" / "step_0000002.pt")


def fail(*args, **kwargs):
    raise AssertionError("the long work started before the input was checked")


def hand_classifier(path, in_channels=3, state_channels=None):
    """A classifier file as --train-classifier writes it, untrained (state_channels: weights of another net)."""
    state = fid.SmallClassifier(state_channels or in_channels, 3).state_dict()
    torch.save({"kind": "fd-classifier", "state": state, "in_channels": in_channels, "num_classes": 3}, path)
    return str(path)


def truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


@pytest.mark.parametrize("case, match", [
    ("missing", "no such file"),
    ("no_sigma", "needs arrays 'mu' and 'sigma'"),
    ("sigma_1d", r"sigma \(128,\) do not fit .* need mu \(128,\) and sigma \(128, 128\)"),
    ("wrong_dim", r"mu \(64,\) and sigma \(64, 64\) do not fit the 128-d features"),
    ("nan", "finite"),
    ("negative", "sigma is not a covariance matrix"),
    ("asymmetric", "sigma is not a covariance matrix"),
    ("truncated", "cannot read"),
    ("ref_data", r"^--ref-data-path '[^']*nowhere' is not a directory"),     # fid.py's flag, not train.py's
])
def test_reference_is_checked_before_sampling(folder_and_classifier, ckpt, tmp_path, monkeypatch, case, match):
    root, images, clf = folder_and_classifier
    mu, sigma, path = np.zeros(128), np.eye(128), str(tmp_path / "ref.npz")
    arrays = {"no_sigma": dict(mu=mu), "sigma_1d": dict(mu=mu, sigma=np.ones(128)), "nan": dict(mu=mu * np.nan, sigma=sigma),
              "wrong_dim": dict(mu=mu[:64], sigma=sigma[:64, :64]), "truncated": dict(mu=mu, sigma=sigma),
              "negative": dict(mu=mu, sigma=-sigma), "asymmetric": dict(mu=mu, sigma=sigma + np.triu(sigma, 1) + 0.1 * np.eye(128, k=1))}.get(case)
    if arrays:
        np.savez(path, **arrays)
    if case == "truncated":
        truncate(path)
    ref = ["--ref-data", "folder", "--ref-data-path", str(tmp_path / "nowhere")] if case == "ref_data" else ["--ref-stats", path]
    monkeypatch.setattr(fid, "generate_n", fail)
    with pytest.raises(UserError, match=match):
        fid.main(["--ckpt", ckpt, "--num-samples", "4", *ref, "--extractor", clf, "--device", "cpu",
                  "--out", str(tmp_path / "r.json")])


def test_a_folder_of_samples_is_read_as_data_py_reads_a_training_folder(tmp_path):
    """Grey images stay 1-channel (a folder of Fashion-MNIST samples against its 1-channel
    reference), colour ones RGB: the same pixels as the training set's loader gives."""
    for mode, channels in (("L", 1), ("RGB", 3)):
        folder = make_image_folder(tmp_path / mode, mode=mode)
        images = fid.load_images(folder)[0]
        assert images.shape == (24, channels, 16, 16)
        assert torch.equal(images, data.load_dataset("folder", folder).images)


def test_frechet_mismatch_names_the_shapes():
    with pytest.raises(UserError, match=r"sigma \(3, 3\) vs the reference's mu \(3,\), sigma \(3,\)"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.ones(3))


def test_training_fid_checks_its_reference_when_built(folder_and_classifier, tmp_path):
    root, images, clf = folder_and_classifier
    train_images = fid.load_images(images)[0]
    np.savez(tmp_path / "d64.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(tmp_path / "nan.npz", mu=np.zeros(128), sigma=np.full((128, 128), np.nan))
    with pytest.raises(UserError, match=r"--fid-ref-stats .*do not fit the 128-d"):
        fid.TrainingFID(clf, None, str(tmp_path / "d64.npz"), train_images, "cpu", 2, 6)
    with pytest.raises(UserError, match=r"--fid-ref-stats .*finite"):
        fid.TrainingFID(clf, None, str(tmp_path / "nan.npz"), train_images, "cpu", 2, 6)
    with pytest.raises(UserError, match="--fid-extractor"):
        fid.TrainingFID(str(tmp_path / "none.pt"), None, None, train_images, "cpu", 2, 6)
    # statistics of another data set's images (they record their shape): a number, not a meaningful one
    np.savez(tmp_path / "big.npz", mu=np.zeros(128), sigma=np.eye(128), image_shape=[3, 32, 32])
    with pytest.raises(UserError, match=r"samples are 16x16 pixels, the reference images \(.*big.npz\) 32x32"):
        fid.TrainingFID(clf, None, str(tmp_path / "big.npz"), train_images, "cpu", 2, 6)


def test_a_checkpoint_is_scored_against_its_own_data_unless_told_otherwise(folder_and_classifier, tmp_path, capsys):
    """Without --ref-data, fid.py --ckpt takes the data set the model was trained on (another one
    of the same image size would give a number, not a meaningful one); another one, asked for,
    draws a warning."""
    root, images, clf = folder_and_classifier
    train.main(tiny_args(images, tmp_path / "run", "--steps", "1"))
    capsys.readouterr()
    score = lambda ckpt, *ref: fid.main(["--ckpt", ckpt, "--num-samples", "4", "--steps", "1", "--extractor", clf,
                                         "--device", "cpu", "--out", str(tmp_path / "r.json"), *ref])
    res = score(str(tmp_path / "run"))
    assert res["reference"]["data"] == "folder" and res["reference"]["data_path"] == os.path.abspath(images)
    out, err = capsys.readouterr()
    assert f"reference: the checkpoint's training data, --ref-data folder --ref-data-path {images}" in out
    assert "warning" not in err
    ck = torch.load(tmp_path / "run" / "checkpoints" / "step_0000001.pt", weights_only=True)
    ck["args"]["data"] = "mnist"        # as if trained on MNIST: this folder is another data set
    torch.save(ck, tmp_path / "mnist.pt")
    score(str(tmp_path / "mnist.pt"), "--ref-data", "folder", "--ref-data-path", images)
    assert "trained on --data mnist, and is scored against --ref-data folder" in capsys.readouterr().err
    # trained at --image-size 16 from 32-pixel images: its reference is those images at 16 pixels
    big = make_image_folder(tmp_path / "big", size=32)
    train.main(tiny_args(big, tmp_path / "resized", "--steps", "1", "--image-size", "16"))
    res = score(str(tmp_path / "resized"))
    assert res["reference"]["image_shape"] == [3, 16, 16] and res["reference"]["image_size"] == 16
    # a run whose data is not where it was trained from: the message says whose path it is
    ck["args"]["data"], ck["args"]["data_path"] = "folder", str(tmp_path / "gone")
    torch.save(ck, tmp_path / "moved.pt")
    with pytest.raises(UserError, match=r"trained from '.*gone', its reference by default: .*--ref-data-path says"):
        score(str(tmp_path / "moved.pt"))


@pytest.mark.parametrize("argv, match", [
    (["--samples", "S", "--out", "FILE/r.json"], "cannot write to --out"),
    (["--samples", "S", "--out", "r.txt"], "--out .* must end in .json"),
    (["--samples", "S", "--save-ref-stats", "FILE/ref.npz"], "cannot write to --save-ref-stats"),
    (["--samples", "S", "--save-ref-stats", "ref"], "--save-ref-stats .* must end in .npz"),
    (["--train-classifier", "FILE/clf.pt"], "cannot write to --train-classifier"),
    (["--train-classifier", "clf.pth"], "--train-classifier .* must end in .pt"),
])
def test_output_paths_are_checked_before_the_work(tmp_path, monkeypatch, argv, match):
    (tmp_path / "FILE").write_text("a file, not a directory")
    monkeypatch.setattr(fid, "load_extractor", fail)
    monkeypatch.setattr(fid, "train_classifier", fail)
    argv = [str(tmp_path / a) if a.startswith(("S", "FILE", "r", "clf")) else a for a in argv]
    with pytest.raises(UserError, match=match):
        fid.main([*argv, "--device", "cpu"])


def test_bad_samples_and_classifiers_are_one_line(tmp_path):
    clf = hand_classifier(tmp_path / "clf.pt")
    good = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    for name, arrays, match in [("nchw", dict(arr_0=good.transpose(0, 3, 1, 2)), r"C = 1 or 3.*\(4, 3, 8, 8\)"),
                                ("tiny", dict(arr_0=good[:, :2, :2]), "at least 4 x 4 pixels, got 4 of 2 x 2"),
                                ("empty", dict(arr_0=good[:0]), "at least 2 images"),
                                ("protocol", dict(arr_0=good, protocol="not json"), "'protocol' entry is not JSON"),
                                ("object", dict(arr_0=np.array([1, None], dtype=object)), "cannot read"),
                                ("truncated", dict(arr_0=good), "cannot read")]:
        path = str(tmp_path / f"{name}.npz")
        np.savez(path, **arrays)
        if name == "truncated":
            truncate(path)
        with pytest.raises(UserError, match=match):
            fid.main(["--samples", path, "--extractor", clf, "--device", "cpu"])
    assert fid.load_extractor(clf)[1]["dim"] == 128
    truncate(clf)
    with pytest.raises(UserError, match="--extractor .*cannot read"):
        fid.load_extractor(clf)
    with pytest.raises(UserError, match="4-channel images"):
        fid.load_extractor(hand_classifier(tmp_path / "c4.pt", in_channels=4))
    with pytest.raises(UserError, match="weights do not fit"):
        fid.load_extractor(hand_classifier(tmp_path / "c13.pt", in_channels=3, state_channels=1))


def test_sampling_flags_need_a_checkpoint_and_epochs_are_not_negative(tmp_path, monkeypatch, capsys):
    with pytest.raises(UserError, match="--steps, --cfg-scale, --raw-weights: sampling flags, for --ckpt only"):
        fid.main(["--samples", str(tmp_path / "s.npz"), "--steps", "3", "--cfg-scale", "2", "--raw-weights"])
    with pytest.raises(SystemExit):
        fid.main(["--train-classifier", str(tmp_path / "c.pt"), "--classifier-epochs", "-1"])
    assert "--classifier-epochs: must be an integer >= 0" in capsys.readouterr().err
    epochs = []
    monkeypatch.setattr(fid, "train_classifier", lambda data, path, out, e, *a: epochs.append(e) or 0.5)
    fid.main(["--train-classifier", str(tmp_path / "c.pt"), "--classifier-epochs", "0", "--device", "cpu"])
    assert epochs == [0]        # 0: one step, the smoke test of docs/gpu_ab.sh
    # flags that would be ignored
    with pytest.raises(UserError, match="--train-classifier trains the classifier only"):
        fid.main(["--train-classifier", str(tmp_path / "c.pt"), "--samples", str(tmp_path / "s.npz")])
    with pytest.raises(UserError, match=r"^--batch-size, --out: not used by --train-classifier"):
        fid.main(["--train-classifier", str(tmp_path / "c.pt"), "--batch-size", "64", "--out", "x.json"])
    with pytest.raises(UserError, match="^--classifier-epochs: a flag of --train-classifier"):
        fid.main(["--samples", str(tmp_path / "s.npz"), "--classifier-epochs", "10"])
    with pytest.raises(UserError, match="--ref-data / --ref-data-path would be ignored"):
        fid.main(["--samples", str(tmp_path / "s.npz"), "--ref-stats", "r.npz", "--ref-data", "folder"])
    with pytest.raises(SystemExit):
        fid.main(["--samples", str(tmp_path / "s.npz"), "--seed", "99999999999999999999"])
    assert "--seed: must be an integer >= 0 and <= 9223372036854775807" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# The torch-fidelity path, with a registered stand-in for the Inception network
# ----------------------------------------------------------------------------------------

STANDIN = "standin-test-extractor"


def register_standin():
    tf_registry = pytest.importorskip("torch_fidelity.registry")
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class StandIn(FeatureExtractorBase):
        """Like the Inception extractor: uint8 RGB in, weights from feature_extractor_weights_path;
        without a path it 'downloads', which fails offline."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if feature_extractor_weights_path is None:
                raise OSError("no internet (the stand-in never downloads)")
            self.register_buffer("proj", torch.load(feature_extractor_weights_path, weights_only=True))

        @staticmethod
        def get_provided_features_list():
            return ("feat",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "feat"

        @staticmethod
        def can_be_compiled():
            return False

        def forward(self, x):
            assert x.dtype == torch.uint8 and x.shape[1] == 3
            pooled = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)   # (B, 48)
            return (torch.tanh(pooled @ self.proj),)

    if STANDIN not in tf_registry.FEATURE_EXTRACTORS_REGISTRY:
        tf_registry.register_feature_extractor(STANDIN, StandIn)


def test_torch_fidelity_path_honours_offline_weights(tmp_path):
    register_standin()
    images = make_image_folder(tmp_path / "images", per_class=10)
    arr = (np.random.default_rng(0).random((30, 16, 16, 3)) * 255).astype(np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=arr)
    values = []
    for k in range(2):      # two weight files: the number must follow the file we pass
        w = tmp_path / f"w{k}.pt"
        torch.save(torch.randn(48, 6, generator=torch.Generator().manual_seed(k)), w)
        res = fid.main(["--samples", str(tmp_path / "s.npz"), "--extractor", STANDIN, "--inception-weights", str(w),
                        "--ref-data", "folder", "--ref-data-path", images, "--device", "cpu"])
        assert res["feature_extractor"]["weights"] == str(w) and res["feature_extractor"]["tool"] == "torch-fidelity"
        # the same number by hand from the same projection
        proj = torch.load(w, weights_only=True)
        feat = lambda a: torch.tanh(torch.nn.functional.adaptive_avg_pool2d(a.float() / 255, 4).flatten(1) @ proj).double().numpy()
        ref = fid.load_images(images)[0]
        expect = fid.frechet_distance(*fid.statistics(feat(torch.from_numpy(arr).permute(0, 3, 1, 2))),
                                      *fid.statistics(feat(ref)))
        assert res["value"] == pytest.approx(expect, rel=1e-5)
        values.append(res["value"])
    assert values[0] != pytest.approx(values[1])
    with pytest.raises(UserError, match="--inception-weights"):     # no file given: the 'download' fails
        fid.main(["--samples", str(tmp_path / "s.npz"), "--extractor", STANDIN, "--ref-data", "folder",
                  "--ref-data-path", images, "--device", "cpu"])
    with pytest.raises(UserError, match="no such file"):
        fid.main(["--samples", str(tmp_path / "s.npz"), "--extractor", STANDIN, "--inception-weights",
                  str(tmp_path / "nope.pth"), "--ref-data", "folder", "--ref-data-path", images])


def test_matches_torch_fidelity_calculate_metrics(tmp_path):
    """Our statistics + Frechet distance give torch-fidelity's own FID for the same features."""
    register_standin()
    import torch_fidelity
    w = tmp_path / "w.pt"
    torch.save(torch.randn(48, 6, generator=torch.Generator().manual_seed(3)), w)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=g)
    b = (torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=g) // 2).to(torch.uint8)

    class Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]
    theirs = torch_fidelity.calculate_metrics(input1=Images(a), input2=Images(b), fid=True, feature_extractor=STANDIN,
                                              feature_extractor_weights_path=str(w), cuda=False, cache=False,
                                              verbose=False, batch_size=16,
                                              save_cpu_ram=True)[torch_fidelity.KEY_METRIC_FID]   # no worker processes
    fn, _ = fid.load_extractor(STANDIN, str(w))
    ours = fid.frechet_distance(*fid.statistics(fid.features(fn, a)), *fid.statistics(fid.features(fn, b)))
    assert ours == pytest.approx(theirs, rel=1e-4)


def test_real_inception_path_with_a_local_weights_file(tmp_path, monkeypatch):
    """The default extractor, end to end and offline: a weights file with the Inception's
    layout (random values: the real file is not downloadable here) passed by --inception-weights."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    torch.manual_seed(0)
    with monkeypatch.context() as m:       # build one randomly initialised network, and save it
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        net = fe.FeatureExtractorInceptionV3(fid.INCEPTION, ["2048"])
    torch.save(net.state_dict(), tmp_path / "inception.pth")

    def no_download(*a, **k):
        raise AssertionError("tried to download despite --inception-weights")
    monkeypatch.setattr(fe, "load_state_dict_from_url", no_download)
    images = make_image_folder(tmp_path / "images", classes=2, per_class=3)
    np.savez(tmp_path / "s.npz", arr_0=(np.random.default_rng(0).random((4, 16, 16, 3)) * 255).astype(np.uint8))
    res = fid.main(["--samples", str(tmp_path / "s.npz"), "--inception-weights", str(tmp_path / "inception.pth"),
                    "--ref-data", "folder", "--ref-data-path", images, "--device", "cpu"])
    assert res["metric"] == "FID-4" and np.isfinite(res["value"]) and res["value"] > 0
    assert res["feature_extractor"]["layer"] == "2048" and res["feature_extractor"]["weights"] == str(tmp_path / "inception.pth")
