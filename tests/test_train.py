import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import sample
import train
from conftest import ROOT, SUBPROCESS_TIMEOUT, present, read_jsonl, run_script, tiny_args
from data import BatchStream, Batches, _read_idx, load_dataset
from loss import dispersive_loss
from model import build_model
from objectives import OBJECTIVES
from rundir import load_checkpoint
from utils import UserError


def moving_args(data, out, *extra):
    """tiny_args on DiT-Mi/8 (4 tokens: milliseconds a step) with a learning rate that moves a
    fresh DiT at once. A fresh DiT is adaLN-Zero: it outputs exactly 0, and its blocks pass their
    input through unchanged, until trained, so a comparison of an untrained model checks nothing."""
    return tiny_args(data, out, "--model", "DiT-Mi/8", "--lr", "1e-2", "--warmup-steps", "0", *extra)


def ckpt(run, step):
    return torch.load(run / "checkpoints" / f"step_{step:07d}.pt", weights_only=True)


def train_log(run):
    return [r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "train"]


def initial_model(argv, data_path):
    """The weights a run of these flags starts from (build() seeds them), and the objective."""
    args = train.get_args(argv)
    model, _, _, objective = train.build(args, load_dataset("folder", data_path), torch.device("cpu"))
    return args, model, objective


def replay(argv, data_path, out, step):
    """The loss terms and block outputs of log step `step` (counted from 1), recomputed from the
    checkpoint of step - 1 (the weights that step's forward pass used) and that step's batch."""
    args, model, objective = initial_model(argv, data_path)
    model.load_state_dict(ckpt(out, step - 1)["model"])
    data = load_dataset("folder", data_path)
    batches = Batches(data, args.batch_size, args.seed, objective.draw, torch.device("cpu"),
                      labels=model.num_classes > 0)
    with torch.no_grad():
        return objective(model, *batches(step - 1), tuple(range(1, model.depth + 1)))


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
    assert "git" in log[0]["versions"]      # the commit (test_git_commit), or None outside a checkout
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


def test_img_per_s_counts_training_time_only(image_folder, tmp_path, monkeypatch):
    """img_per_s is the speed of training: the time a grid (or a FID, a checkpoint) takes is left
    out of the next log line's rate. A fake clock ticks 1 s per reading, and a grid takes 1000 s
    of it: 2 steps of 8 images per log line in a few ticks, not in over 1000."""
    clock = [0.0]
    def tick():
        clock[0] += 1.0
        return clock[0]
    monkeypatch.setattr(train, "time", type("FakeTime", (), {"perf_counter": staticmethod(tick)}))
    real_save_grid = train.save_grid
    def slow_save_grid(*a, **k):
        clock[0] += 1000.0
        return real_save_grid(*a, **k)
    monkeypatch.setattr(train, "save_grid", slow_save_grid)
    out = tmp_path / "run"
    train.main(tiny_args(image_folder, out, "--steps", "6", "--sample-every", "2", "--sample-steps", "1"))
    assert sorted(os.listdir(out / "samples")) == ["step_0000002.png", "step_0000004.png", "step_0000006.png"]
    rates = [r["img_per_s"] for r in train_log(out)]
    assert len(rates) == 3 and min(rates) > 16 / 10, rates      # with the grids counted: 16 / 1000 and less


def test_git_commit(tmp_path):
    """The config line's versions["git"]: the checkout's commit, '+dirty' once a tracked file
    changes, None outside a git checkout."""
    from utils import git_commit
    assert git_commit(str(tmp_path)) is None
    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *a],
                                    check=True, capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "--short=12", "HEAD")
    assert git_commit(str(tmp_path)) == head
    (tmp_path / "untracked.txt").write_text("x")            # untracked files (run dirs, data) do not count
    assert git_commit(str(tmp_path)) == head
    (tmp_path / "f.txt").write_text("b")
    assert git_commit(str(tmp_path)) == head + "+dirty"


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_resume_is_exact(image_folder, tmp_path, objective):
    full, part = tmp_path / "full", tmp_path / "part"
    obj = ("--objective", objective, *(("--mf-ratio", "0.5") if objective == "meanflow" else ()))
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


def test_damaged_idx_files_are_named(tmp_path):
    """A truncated download, an empty file, or images and labels of two different sets: one line
    that names the file, never numpy's or gzip's error from inside the reader."""
    import gzip
    header = lambda *shape: bytes([0, 0, 8, len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape)
    good = gzip.compress(header(3, 2, 2) + bytes(12))
    labels = gzip.compress(header(3) + bytes([1, 2, 3]))
    cases = {"truncated": (good[: len(good) // 2], labels, "EOFError"),
             "empty": (b"", labels, "not a whole IDX file"),
             "short": (gzip.compress(header(3, 2, 2) + bytes(11)), labels, "not a whole IDX file"),
             "other set": (gzip.compress(header(2, 2, 2) + bytes(8)), labels, r"\(2 images\) .* \(3 labels\)"),
             "no images": (gzip.compress(header(0, 2, 2)), gzip.compress(header(0)), r"\(0 images\)"),
             "corrupt": (good[:10] + bytes([good[10] ^ 0xFF]) + good[11:], labels, "error: Error -3")}
    for name, (img, lab, message) in cases.items():
        d = tmp_path / name.replace(" ", "_")
        d.mkdir()
        (d / "train-images-idx3-ubyte.gz").write_bytes(img)
        (d / "train-labels-idx1-ubyte.gz").write_bytes(lab)
        with pytest.raises(UserError, match=message):
            load_dataset("fashion-mnist", str(d))
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "train-images-idx3-ubyte.gz").write_bytes(good)
    (tmp_path / "ok" / "train-labels-idx1-ubyte.gz").write_bytes(labels)
    assert load_dataset("fashion-mnist", str(tmp_path / "ok")).labels.tolist() == [1, 2, 3]


def test_mnist_and_fashion_mnist_files_are_told_apart(tmp_path):
    """The two sets' IDX files have the same names; a directory of one read as the other (a
    wrong --data) would train on it without a word. Their first ten training labels differ."""
    import gzip
    labels = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]                                # MNIST's
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 3, 0, 0, 0, 10, 0, 0, 0, 2,
                                                                                0, 0, 0, 2]) + bytes(40)))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 10]) + bytes(labels)))
    assert load_dataset("mnist", str(tmp_path)).labels.tolist() == labels
    with pytest.raises(UserError, match="holds mnist's training set, not fashion-mnist's: pass --data mnist"):
        load_dataset("fashion-mnist", str(tmp_path))


def test_image_folder_reads_16_bit_grey_and_refuses_an_empty_class(tmp_path):
    from PIL import Image
    grey16 = (np.arange(16 * 16).reshape(16, 16) * 256 + 255).astype(np.uint16)    # high bytes 0..255
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.fromarray(grey16).save(tmp_path / c / "0.png")
    assert Image.open(tmp_path / "a" / "0.png").mode.startswith("I;16")
    ds = load_dataset("folder", str(tmp_path))
    assert ds.images.shape == (2, 1, 16, 16) and ds.images[0, 0].flatten().tolist() == list(range(256))
    Image.fromarray(grey16.astype(np.int32)).save(tmp_path / "b" / "0.tif")   # mode I, as Pillow < 10.3 reads 16 bits
    assert Image.open(tmp_path / "b" / "0.tif").mode == "I"
    assert load_dataset("folder", str(tmp_path)).images[2, 0].flatten().tolist() == list(range(256))   # b/0.tif
    Image.fromarray(grey16.astype(np.int32) * 2).save(tmp_path / "b" / "0.tif")          # beyond 16 bits
    with pytest.raises(UserError, match="has 32-bit pixels"):
        load_dataset("folder", str(tmp_path))
    os.remove(tmp_path / "b" / "0.tif")
    (tmp_path / "c").mkdir()
    with pytest.raises(UserError, match="class folder.*'c' hold no images"):
        load_dataset("folder", str(tmp_path))


FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    ds = load_dataset("fashion-mnist", FMNIST)
    assert ds.images.shape == (60000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.bincount().tolist() == [6000] * 10
    # MNIST's files have the same names: --data mnist on this directory would train on the wrong set
    with pytest.raises(UserError, match=re.escape(f"--data-path '{FMNIST}' holds fashion-mnist's training set, "
                                                  f"not mnist's: pass --data fashion-mnist")):
        load_dataset("mnist", FMNIST)


def test_missing_cifar_names_the_flag(tmp_path):
    # Every proxy variable points at a dead local port (9, discard) and nothing bypasses it, so
    # the download fails the same way with or without internet (instead of fetching 170 MB).
    dead = "http://127.0.0.1:9"
    env = dict(os.environ, HTTP_PROXY=dead, HTTPS_PROXY=dead, http_proxy=dead, https_proxy=dead, ALL_PROXY=dead,
               all_proxy=dead, NO_PROXY="", no_proxy="")
    run = lambda data, path: subprocess.run([sys.executable, "train.py", "--data", data, "--data-path", str(path),
                                             "--out", str(tmp_path / "o"), "--steps", "1"], cwd=ROOT,
                                            capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=env)
    r = run("cifar10", tmp_path / "nothing")
    assert r.returncode == 2, r.stderr
    assert "--data-path" in r.stderr and "Traceback" not in r.stderr
    # nothing is left behind: no data directory, no run directory
    assert not (tmp_path / "nothing").exists() and not (tmp_path / "o").exists()
    # torchvision makes <path>/FashionMNIST/raw before it fails: an image folder must not keep it as a class
    (tmp_path / "images" / "cat").mkdir(parents=True)
    r = run("fashion-mnist", tmp_path / "images")
    assert r.returncode == 2 and os.listdir(tmp_path / "images") == ["cat"], r.stderr


# ----------------------------------------------------------------------------------------
# The loop's glue: every rank's share of a step's randomness, EMA, lr, clipping, pruning
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective", present("flow", "meanflow"))
def test_every_random_draw_of_a_step_is_the_ranks_slice_of_the_global_draw(image_folder, objective):
    """Batches for 2 and for 4 ranks, joined, are the 1-process batch: the samples, their flips,
    and every draw of the objective (eps, t, label drops; MeanFlow's r too)."""
    data = load_dataset("folder", image_folder)          # 24 images, flip=True
    mf = ["--mf-ratio", "0.5"] if objective == "meanflow" else []
    args = train.get_args(["--objective", objective, "--p-uncond", "0.5", "--model", "DiT-Mi/8", *mf])
    Objective = OBJECTIVES[objective]
    model = build_model(args.model, 16, 3, data.num_classes, cls=Objective.model_class)
    draw = Objective.from_args(args, model, data.num_classes).draw
    cpu, B, seed = torch.device("cpu"), 8, 3
    one = Batches(data, B, seed, draw, cpu)
    keys = {"eps", "t", "drop", *(["r"] if objective == "meanflow" else [])}
    flipped, kept, dropped, jumps = 0, 0, 0, 0
    for step in (0, 1, 4):                                # 3 steps an epoch: step 4 is in epoch 1
        x, y, noise = one(step)
        assert set(noise) == keys
        unflipped = data.batch(one.stream.indices(step))[0]
        is_flipped = (x != unflipped).flatten(1).any(1)
        assert torch.equal(x[is_flipped], unflipped[is_flipped].flip(3))
        flipped, kept = flipped + is_flipped.sum().item(), kept + (~is_flipped).sum().item()
        dropped += noise["drop"].sum().item()
        jumps += (noise["r"] != noise["t"]).sum().item() if "r" in noise else 1
        for world in (2, 4):
            parts = [Batches(data, B, seed, draw, cpu, rank, world)(step) for rank in range(world)]
            assert all(len(p[0]) == B // world for p in parts)
            assert torch.equal(torch.cat([Batches(data, B, seed, draw, cpu, r, world).stream.indices(step)
                                          for r in range(world)]), one.stream.indices(step)), (world, step)
            assert torch.equal(torch.cat([p[0] for p in parts]), x), ("images and flips", world, step)
            assert torch.equal(torch.cat([p[1] for p in parts]), y), ("labels", world, step)
            for k in keys:
                assert torch.equal(torch.cat([p[2][k] for p in parts]), noise[k]), (k, world, step)
    # the draws had something to compare: some images flipped and some not, some labels dropped ...
    assert flipped and kept and 0 < dropped < 3 * B and jumps


def test_ema_follows_its_ramp_then_its_decay(image_folder, tmp_path):
    """ema_s = d * ema_(s-1) + (1 - d) * w_s with d = min(decay, (1 + k) / (10 + k)), k = s - 1 the
    step's 0-based index, checked from consecutive checkpoints. With --ema-decay 0.2 the ramp
    rules steps 0 and 1 (0.1, 0.18) and the decay steps 2 and 3 (the ramp would give 0.25, 0.31)."""
    out = tmp_path / "run"
    argv = moving_args(image_folder, out, "--steps", "4", "--ckpt-every", "1", "--keep-ckpts", "0", "--ema-decay", "0.2")
    train.main(argv)
    _, model0, _ = initial_model(argv, image_folder)
    ema_prev = model0.state_dict()                       # the EMA starts as a copy of the initial weights
    for s in range(1, 5):
        ck, k = ckpt(out, s), s - 1
        d = min(0.2, (1 + k) / (10 + k))
        moved = max((ck["model"][n] - ema_prev[n]).abs().max().item() for n in ck["model"])
        assert moved > 1e-3                              # a wrong d would show by ~|w - ema| * 0.02
        for name, w in ck["model"].items():
            torch.testing.assert_close(ck["ema"][name], d * ema_prev[name] + (1 - d) * w, rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"step {s} (d = {d:.4f}), {name}: {m}")
        ema_prev = ck["ema"]


def test_lr_warmup_is_logged_and_is_the_lr_adamw_stepped_with(image_folder, tmp_path):
    """The logged lr follows lr * min(1, (k + 1) / warmup), k the step's 0-based index, and each
    checkpoint's weights are the previous ones plus AdamW's step at that lr, rebuilt from the
    moments the checkpoint saved: the optimiser used the lr that was logged."""
    out, lr, warmup = tmp_path / "run", 1e-2, 3
    argv = tiny_args(image_folder, out, "--model", "DiT-Mi/8", "--steps", "5", "--lr", str(lr), "--warmup-steps",
                     str(warmup), "--log-every", "1", "--ckpt-every", "1", "--keep-ckpts", "0")
    train.main(argv)
    expected = [lr * min(1.0, (k + 1) / warmup) for k in range(5)]          # lr/3, 2lr/3, lr, lr, lr
    assert [r["lr"] for r in train_log(out)] == pytest.approx(expected, rel=1e-12)
    args, model0, _ = initial_model(argv, image_folder)
    names = [n for n, _ in model0.named_parameters()]                        # the optimiser's order
    prev = model0.state_dict()
    beta1, beta2, eps = 0.9, args.adam_beta2, 1e-8
    for s in range(1, 6):
        ck = ckpt(out, s)
        assert ck["opt"]["param_groups"][0]["lr"] == pytest.approx(expected[s - 1], rel=1e-12)
        for i, name in enumerate(names):
            st = ck["opt"]["state"][i]
            n = int(st["step"])
            assert n == s
            m_hat = st["exp_avg"].double() / (1 - beta1 ** n)
            v_hat = st["exp_avg_sq"].double() / (1 - beta2 ** n)
            decayed = prev[name].double() * (1 - expected[s - 1] * args.weight_decay)
            want = decayed - expected[s - 1] * m_hat / (v_hat.sqrt() + eps)
            torch.testing.assert_close(ck["model"][name].double(), want, rtol=0, atol=2e-6,
                                       msg=lambda m: f"step {s}, {name}: {m}")
        prev = ck["model"]


def test_grad_clip_bounds_the_gradient_adamw_saw(image_folder, tmp_path):
    """Adam's step barely depends on the gradient's scale (the first is about lr * sign(g)), so the
    weights cannot show clipping; AdamW's first moment can: exp_avg_1 = (1 - beta1) g_1 and
    exp_avg_2 - beta1 exp_avg_1 = (1 - beta1) g_2, with g the gradient after clipping. The log's
    grad_norm is the norm before clipping."""
    clip = 1e-3

    def grads(c):
        out = tmp_path / f"clip{c}"
        train.main(moving_args(image_folder, out, "--steps", "2", "--grad-clip", str(c), "--ckpt-every", "1",
                               "--keep-ckpts", "0", "--log-every", "1"))
        m1, m2 = (torch.cat([st["exp_avg"].flatten() for st in ckpt(out, s)["opt"]["state"].values()]) for s in (1, 2))
        return m1 / 0.1, (m2 - 0.9 * m1) / 0.1, [r["grad_norm"] for r in train_log(out)]

    raw1, raw2, raw_logged = grads(0)
    clipped1, clipped2, clipped_logged = grads(clip)
    assert raw_logged == pytest.approx([raw1.norm().item(), raw2.norm().item()], rel=1e-4)
    assert clipped_logged[0] == pytest.approx(raw1.norm().item(), rel=1e-4)     # step 1: before clipping
    assert raw1.norm() > 10 * clip and raw2.norm() > 10 * clip          # clipping has something to do
    assert clipped1.norm().item() == pytest.approx(clip, rel=1e-3)
    assert clipped2.norm().item() == pytest.approx(clip, rel=1e-3)
    # Step 1 (same weights, same batch): the clipped gradient is the raw one, scaled down.
    torch.testing.assert_close(clipped1, raw1 * (clip / raw1.norm()), rtol=1e-3, atol=1e-10)


def test_keep_ckpts_keeps_exactly_the_newest(image_folder, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(image_folder, out, "--model", "DiT-Mi/8", "--steps", "5", "--ckpt-every", "1", "--keep-ckpts", "2"))
    assert sorted(os.listdir(out / "checkpoints")) == ["step_0000004.pt", "step_0000005.pt"]
    train.main(tiny_args(image_folder, out, "--model", "DiT-Mi/8", "--steps", "7", "--ckpt-every", "1", "--keep-ckpts",
                         "2", "--resume"))
    assert sorted(os.listdir(out / "checkpoints")) == ["step_0000006.pt", "step_0000007.pt"]
    assert load_checkpoint(str(out / "checkpoints" / "step_0000007.pt"))["step"] == 7


# ----------------------------------------------------------------------------------------
# Flags exercised through the command line, each with what it changes
# ----------------------------------------------------------------------------------------

def test_several_disp_blocks_average_their_terms(image_folder, tmp_path):
    out = tmp_path / "run"
    argv = moving_args(image_folder, out, "--steps", "3", "--log-every", "1", "--ckpt-every", "1", "--disp-block", "1,3")
    train.main(argv)
    assert read_jsonl(out / "metrics.jsonl")[0]["disp_blocks"] == [1, 3]
    rec = train_log(out)[-1]                  # step 3: trained twice, so the blocks differ
    dist = rec["block_dist"]
    assert len(dist) == 4 and dist[0] != pytest.approx(dist[2], rel=1e-3)
    assert rec["mean_sq_dist"] == pytest.approx((dist[0] + dist[2]) / 2, rel=1e-6)
    blocks = replay(argv, image_folder, out, 3)["blocks"]
    d1, d3 = (dispersive_loss(blocks[b], group_size=4).item() for b in (1, 3))
    assert abs(d1 - d3) > 1e-3 * abs(d1), (d1, d3)     # block 1 alone would log another number
    assert rec["disp"] == pytest.approx((d1 + d3) / 2, rel=1e-5, abs=1e-7)
    assert rec["total"] == pytest.approx(rec["flow"] + 0.5 * rec["disp"], rel=1e-6)


@pytest.mark.parametrize("variant", ["hinge", "covariance", "infonce_cos"])
def test_disp_variant_reaches_the_loss(image_folder, tmp_path, variant):
    out = tmp_path / "run"
    argv = moving_args(image_folder, out, "--steps", "2", "--log-every", "1", "--ckpt-every", "1",
                       "--disp-variant", variant)
    train.main(argv)
    G, tau = 4, 0.5
    lo, hi = {"hinge": (0, 1), "covariance": (0, np.inf), "infonce_cos": (1 / tau - np.log(G), 1 / tau)}[variant]
    for rec in train_log(out):                     # infonce_l2 would lie in [-log G, 0]
        assert lo <= rec["disp"] <= hi and rec["disp"] != 0, rec
    blocks = replay(argv, image_folder, out, 2)["blocks"]   # DiT-Mi: depth 4, so block 4 // 4 = 1
    assert train_log(out)[-1]["disp"] == pytest.approx(dispersive_loss(blocks[1], variant, tau, group_size=G).item(),
                                                       rel=1e-5, abs=1e-7)


def test_unconditional_trains_a_null_only_table_and_samples(image_folder, tmp_path):
    out = tmp_path / "run"
    train.main(moving_args(image_folder, out, "--steps", "2", "--unconditional"))
    ck = ckpt(out, 2)
    assert ck["model_config"]["num_classes"] == 0 and ck["args"]["unconditional"] is True
    assert ck["model"]["y_embed.table.weight"].shape == (1, 128)      # the null row alone
    npz = tmp_path / "s.npz"                  # sample.py's main, in this process (a subprocess costs seconds)
    flags = ["--ckpt", str(out / "checkpoints" / "step_0000002.pt"), "--steps", "2", "--num-samples", "3",
             "--out", str(npz), "--device", "cpu"]
    sample.main(flags)
    got = np.load(npz)
    assert got["arr_0"].shape == (3, 16, 16, 3) and got["arr_1"].tolist() == [0, 0, 0]
    for extra in (["--class-labels", "1"], ["--cfg-scale", "2"]):   # nothing to condition on: refused, not ignored
        with pytest.raises(UserError, match=f"{extra[0]}: this checkpoint's model is unconditional"):
            sample.main(flags + extra)


def test_sample_checks_its_flags_before_sampling(image_folder, tmp_path):
    out = tmp_path / "run"
    train.main(moving_args(image_folder, out, "--steps", "1"))
    flags = ["--ckpt", str(out / "checkpoints" / "step_0000001.pt"), "--device", "cpu"]
    (tmp_path / "file").write_text("x")
    for extra, message in [(["--out", str(tmp_path / "file" / "s.png")], "cannot write to --out"),
                           (["--out", "s.NPZ"], "--out 's.NPZ': the file name must end in .png or .jpg or .jpeg or .npz"),
                           (["--solver", "dopri5", "--steps", "5"], "--steps: dopri5 chooses its own steps"),
                           (["--vae", str(tmp_path)], "works on pixels, not latents; there is nothing to decode")]:
        with pytest.raises(UserError, match=message):
            sample.main(flags + extra)
    sample.main(["--ckpt", str(out), "--device", "cpu", "--steps", "1", "--out", str(tmp_path / "g.png")])  # a run dir
    assert (tmp_path / "g.png").is_file()


def test_sample_class_labels_and_raw_weights(image_folder, tmp_path):
    """sample.py (its main, in this process) against generate() on the checkpoint's own weights:
    --class-labels reach the model and the .npz, --raw-weights picks the raw weights, which
    differ from the EMA's after a few steps."""
    out = tmp_path / "run"
    train.main(moving_args(image_folder, out, "--steps", "3", "--ema-decay", "0.9"))
    path = str(out / "checkpoints" / "step_0000003.pt")
    ck = load_checkpoint(path)

    def run(name, *extra):
        sample.main(["--ckpt", path, "--steps", "2", "--device", "cpu", "--out", str(tmp_path / name), *extra])
        return np.load(tmp_path / name)

    def expect(weights, labels):
        model = sample.build_from_checkpoint(ck, weights).eval()
        imgs = sample.generate(model, torch.tensor(labels), sample.euler, 2, generator=torch.Generator().manual_seed(0))
        return imgs.permute(0, 2, 3, 1).numpy()

    got = run("labels.npz", "--class-labels", "1,2", "--num-samples", "5")
    assert got["arr_1"].tolist() == [1, 2, 1, 2, 1]
    assert np.array_equal(got["arr_0"], expect("ema", [1, 2, 1, 2, 1]))
    assert not np.array_equal(got["arr_0"], expect("ema", [0, 1, 2, 0, 1]))   # the labels matter to this model
    ema, raw = run("ema.npz", "--num-samples", "6"), run("raw.npz", "--num-samples", "6", "--raw-weights")
    assert np.array_equal(ema["arr_0"], expect("ema", [0, 1, 2, 0, 1, 2]))
    assert np.array_equal(raw["arr_0"], expect("model", [0, 1, 2, 0, 1, 2]))
    assert (ema["arr_0"] != raw["arr_0"]).mean() > 0.01
    assert json.loads(str(raw["protocol"]))["ema"] is False and json.loads(str(ema["protocol"]))["ema"] is True


def test_resume_drops_log_lines_written_after_the_last_checkpoint(image_folder, tmp_path):
    out = tmp_path / "run"
    train.main(tiny_args(image_folder, out, "--model", "DiT-Mi/8", "--steps", "2", "--log-every", "1"))
    with open(out / "metrics.jsonl", "a") as f:          # what a run killed before its next checkpoint logged
        for rec in ({"type": "train", "step": 3, "flow": -1.0}, {"type": "fid", "step": 4, "value": -1.0},
                    {"type": "train", "step": 4, "flow": -1.0}):
            f.write(json.dumps(rec) + "\n")
    train.main(tiny_args(image_folder, out, "--model", "DiT-Mi/8", "--steps", "4", "--log-every", "1", "--resume"))
    log = read_jsonl(out / "metrics.jsonl")
    assert [(r["type"], r["step"]) for r in log] == [("config", 0), ("train", 1), ("train", 2), ("config", 2),
                                                    ("train", 3), ("train", 4)]
    assert all(r.get("flow") != -1.0 and r.get("value") != -1.0 for r in log)
