import os

import numpy as np
import pytest
import torch

import train
from conftest import read_jsonl, run_script, tiny_args
from data import BatchStream, _read_idx, load_dataset


def test_smoke_train_checkpoint_resume_sample(image_folder, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(image_folder, out, "--steps", "4", "--sample-every", "4", "--sample-steps", "2"))
    ckpts = sorted(os.listdir(out / "checkpoints"))
    assert ckpts == ["step_0000004.pt"]
    assert os.path.exists(out / "samples" / "step_0000004.png")
    ck = torch.load(out / "checkpoints" / ckpts[0], weights_only=True)
    assert ck["step"] == 4 and set(ck) >= {"model", "ema", "opt", "args", "rng", "model_config"}
    assert not any("_orig_mod" in k for k in ck["model"])
    assert ck["model_config"] == {"name": "DiT-Mi/4", "image_size": 16, "in_channels": 3, "num_classes": 3,
                                  "objective": "flow"}

    train.main(tiny_args(image_folder, out, "--steps", "6", "--resume"))
    assert os.path.exists(out / "checkpoints" / "step_0000006.pt")
    log = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in log if r["type"] == "train"] == [2, 4, 6]
    assert log[0]["type"] == "config" and "torch" in log[0]["versions"] and log[0]["device"]
    for r in log:
        if r["type"] == "train":
            assert np.isfinite([r["flow"], r["disp"], r["img_per_s"], r["mean_sq_dist"]]).all()

    ck6 = str(out / "checkpoints" / "step_0000006.pt")
    r = run_script("sample.py", "--ckpt", ck6, "--steps", "2", "--out", str(tmp_path / "grid.png"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    r = run_script("sample.py", "--ckpt", ck6, "--steps", "2", "--num-samples", "7", "--batch-size", "3",
                   "--cfg-scale", "1.5", "--solver", "heun", "--out", str(tmp_path / "s.npz"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    npz = np.load(tmp_path / "s.npz")
    assert npz["arr_0"].shape == (7, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["arr_1"].tolist() == [0, 1, 2, 0, 1, 2, 0]


@pytest.mark.parametrize("objective", ["flow", "meanflow"])
def test_resume_is_exact(image_folder, tmp_path, objective):
    full, part = tmp_path / "full", tmp_path / "part"
    obj = ("--objective", objective, "--mf-ratio", "0.5") if objective == "meanflow" else ()
    train.main(tiny_args(image_folder, full, "--steps", "8", "--keep-ckpts", "0", *obj))
    train.main(tiny_args(image_folder, part, "--steps", "3", *obj))
    train.main(tiny_args(image_folder, part, "--steps", "8", "--resume", *obj))
    a = torch.load(full / "checkpoints" / "step_0000008.pt", weights_only=True)
    b = torch.load(part / "checkpoints" / "step_0000008.pt", weights_only=True)
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for pa, pb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        for k in pa:
            assert torch.equal(pa[k], pb[k]), k
    losses = lambda run: {r["step"]: (r["flow"], r["disp"]) for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "train"}
    # The stopped run also logged its last step (3); every step both logged agrees exactly.
    a_log, b_log = losses(full), losses(part)
    assert set(a_log) == {2, 4, 6, 8} and set(b_log) == {2, 3, 4, 6, 8}
    assert all(a_log[s] == b_log[s] for s in a_log)


def test_baseline_logs_dispersive_diagnostics(image_folder, tmp_path):
    train.main(tiny_args(image_folder, tmp_path / "base", "--steps", "2", "--disp-weight", "0"))
    rec = [r for r in read_jsonl(tmp_path / "base" / "metrics.jsonl") if r["type"] == "train"][-1]
    assert rec["disp"] == 0.0 and rec["total"] == rec["flow"]
    assert -np.log(8) <= rec["disp_diag"] < 0 and rec["mean_sq_dist"] > 0


def test_batch_stream_is_a_function_of_step():
    s = BatchStream(10, 4, seed=1)
    epoch0 = [s.indices(i) for i in range(2)]
    assert len(set(torch.cat(epoch0).tolist())) == 8                    # no repeats in an epoch
    assert torch.equal(BatchStream(10, 4, seed=1).indices(1), epoch0[1])  # resumable
    assert not torch.equal(s.indices(2), s.indices(0))                   # a new permutation each epoch
    halves = [BatchStream(10, 4, seed=1, rank=r, world=2).indices(5) for r in range(2)]
    assert torch.equal(torch.cat(halves), s.indices(5))                  # ranks split the global batch


def test_idx_reader(tmp_path):
    import gzip
    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + b"".join(int(n).to_bytes(4, "big") for n in imgs.shape) + imgs.tobytes())
    with open(tmp_path / "train-labels-idx1-ubyte", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big") + bytes([7, 9]))
    assert np.array_equal(_read_idx(str(tmp_path / "train-images-idx3-ubyte.gz")), imgs)
    with open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:   # both files of one kind
        pass
    os.remove(tmp_path / "train-labels-idx1-ubyte.gz")
    os.rename(tmp_path / "train-labels-idx1-ubyte", tmp_path / "x")
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(open(tmp_path / "x", "rb").read())
    ds = load_dataset("fashion-mnist", str(tmp_path))
    assert ds.images.shape == (2, 1, 3, 4) and ds.labels.tolist() == [7, 9] and ds.flip


FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    ds = load_dataset("fashion-mnist", FMNIST)
    assert ds.images.shape == (60000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.bincount().tolist() == [6000] * 10


def test_missing_cifar_names_the_flag(tmp_path):
    r = run_script("train.py", "--data", "cifar10", "--data-path", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"),
                   "--steps", "1")
    assert r.returncode == 2
    assert "--data-path" in r.stderr and "Traceback" not in r.stderr
