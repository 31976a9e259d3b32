"""fid.py: the Frechet distance against closed forms, and the FID plumbing end to end with
stand-in feature extractors (the Inception weights are not downloadable in CI)."""
import json
import os

import numpy as np
import pytest
import torch

import fid
import train
from conftest import make_image_folder, read_jsonl, run_script, tiny_args
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
    # precomputed statistics give the very same number
    again = fid.main(["--ckpt", ckpt, "--num-samples", "6", "--steps", "2", "--solver", "heun", "--cfg-scale", "1.5",
                      "--ref-stats", stats, "--extractor", clf, "--device", "cpu", "--out", str(tmp_path / "r2.json")])
    assert again["value"] == pytest.approx(res["value"], rel=1e-9)
    assert again["reference"]["stats_file"] == os.path.abspath(stats)


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


def test_bad_inputs_are_one_line(tmp_path):
    r = run_script("fid.py", "--samples", str(tmp_path / "missing.npz"), "--extractor", str(tmp_path / "no.pt"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--extractor" in r.stderr
    r = run_script("fid.py", "--extractor", str(tmp_path / "no.pt"))
    assert r.returncode == 2 and "exactly one of --samples" in r.stderr and "Traceback" not in r.stderr


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
