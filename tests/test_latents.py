"""The latent path (issue 5): encode an image folder with a VAE once, train on the latents,
decode samples. No weights can be downloaded here, so a tiny, randomly initialised
AutoencoderKL is built from a config and saved to a local directory, as a user's offline
copy of the SD-VAE would be."""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import encode_latents
import sample
import train
from conftest import make_image_folder, run_script, tiny_args
from data import center_crop, load_dataset
from latents import LatentSet, decode, encode, load_vae
from utils import UserError

SIZE = 16          # image size; the tiny VAE downsamples 4x, so latents are 4 x 4 x 4


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=4, sample_size=SIZE)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), classes=3, per_class=8, size=SIZE)


def encode_args(images, out, vae_dir, *extra):
    return ["--data-path", images, "--out", str(out), "--vae", vae_dir, "--image-size", str(SIZE),
            "--batch-size", "5", "--num-workers", "0", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def latents(tmp_path_factory, images, vae_dir):
    out = tmp_path_factory.mktemp("latents")
    encode_latents.main(encode_args(images, out, vae_dir))
    return str(out)


def test_encoding_shapes_metadata_and_values(latents, images, vae_dir):
    meta = json.load(open(os.path.join(latents, "meta.json")))
    assert meta["vae"] == vae_dir and meta["scale_factor"] == pytest.approx(0.18215)
    assert meta["image_size"] == SIZE and meta["flip"] is True and meta["latent_shape"] == [4, 4, 4]
    assert meta["done"] == meta["num_images"] == 24 and meta["classes"] == ["class0", "class1", "class2"]
    moments = np.load(os.path.join(latents, "moments.npy"), mmap_mode="r")
    assert moments.shape == (48, 2, 4, 4, 4) and moments.dtype == np.float16
    assert np.load(os.path.join(latents, "labels.npy")).tolist() == [c for c in range(3) for _ in range(16)]
    files = open(os.path.join(latents, "files.txt")).read().splitlines()
    assert len(files) == 24 and files[0].endswith(os.path.join("class0", "000.png"))

    # Rows 2i and 2i+1 are the posterior of image i and of its mirror image.
    from PIL import Image
    vae = load_vae(vae_dir)
    x = torch.from_numpy(np.array(center_crop(Image.open(files[5]).convert("RGB"), SIZE))).permute(2, 0, 1)
    x = x[None].float() / 127.5 - 1
    with torch.no_grad():                          # diffusers' own posterior, not latents.encode
        posterior = vae.encode(torch.cat([x, x.flip(3)])).latent_dist
    mean, std = posterior.mean, posterior.std
    assert torch.allclose(torch.from_numpy(moments[10:12, 0].astype(np.float32)), mean, atol=2e-3, rtol=2e-3)
    assert torch.allclose(torch.from_numpy(moments[10:12, 1].astype(np.float32)), std, atol=2e-3, rtol=2e-3)
    assert not torch.allclose(posterior.var, std, atol=2e-3, rtol=2e-3)      # storing the variance would fail
    assert (moments[:, 1] > 0).all()

    imgs = decode(vae, mean * 0.18215, 0.18215)
    assert imgs.shape == (2, 3, SIZE, SIZE) and imgs.min() >= -1 and imgs.max() <= 1


def test_encode_and_decode_are_diffusers_own(vae_dir):
    """latents.encode / decode against diffusers' AutoencoderKL called directly: the posterior's
    mean and std (not its variance or log-variance), and decoding z / scale_factor, in chunks."""
    vae = load_vae(vae_dir)
    x = torch.rand(5, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        mean, std = encode(vae, x)
        torch.testing.assert_close(mean, posterior.mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(std, posterior.std, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(posterior.var, posterior.std, rtol=1e-2, atol=1e-3)
        assert not torch.allclose(posterior.logvar, posterior.std, rtol=1e-2, atol=1e-3)
        z = (mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))) * 0.18215
        theirs = vae.decode(z / 0.18215).sample.clamp(-1, 1)
        ours = decode(vae, z, 0.18215, chunk=2)           # chunks of 2, 2 and 1, joined in order
        assert ours.shape == (5, 3, SIZE, SIZE)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
        assert (theirs.abs() < 1).float().mean() > 0.5     # mostly inside the clamp: a real comparison
        assert not torch.allclose(vae.decode(z).sample.clamp(-1, 1), theirs, atol=1e-3)   # the scale matters


def test_latent_set_samples_the_posterior(latents):
    ds = load_dataset("latents", latents)
    assert len(ds) == 48 and ds.shape == (4, 4, 4) and ds.num_classes == 3 and not ds.flip
    assert ds.vae["scale_factor"] == pytest.approx(0.18215) and ds.vae["image_size"] == SIZE
    idx = torch.tensor([7, 0, 31])
    x, y = ds.batch(idx, generator=torch.Generator().manual_seed(3))
    m = torch.from_numpy(ds.moments[idx.numpy()]).float()
    noise = torch.randn((3, 4, 4, 4), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(x, (m[:, 0] + m[:, 1] * noise) * 0.18215) and y.tolist() == [0, 0, 1]
    x2, _ = ds.batch(idx, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(x, x2)                  # a fresh sample each time


class Crash(Exception):
    """Stands in for a killed process (pytest keeps KeyboardInterrupt for itself)."""


def test_encoding_resumes_after_an_interruption(latents, images, vae_dir, tmp_path, monkeypatch):
    out = tmp_path / "part"
    real, calls, crash_at = encode_latents.encode, [], [3]

    def dies_in_third_batch(vae, x):
        calls.append(len(x))
        if len(calls) == crash_at[0]:
            raise Crash
        return real(vae, x)
    monkeypatch.setattr(encode_latents, "encode", dies_in_third_batch)
    with pytest.raises(Crash):
        encode_latents.main(encode_args(images, out, vae_dir))
    assert json.load(open(out / "meta.json"))["done"] == 10
    with pytest.raises(UserError, match="incomplete"):
        load_dataset("latents", str(out))

    calls.clear()
    crash_at[0] = None
    encode_latents.main(encode_args(images, out, vae_dir))
    assert calls == [10, 10, 8]                     # images 10..23 only, two copies each
    full = np.load(os.path.join(latents, "moments.npy"))
    assert np.array_equal(np.load(out / "moments.npy"), full)
    calls.clear()
    encode_latents.main(encode_args(images, out, vae_dir))   # complete: nothing to do
    assert calls == []
    with pytest.raises(UserError, match="another encoding"):
        encode_latents.main(encode_args(images, out, vae_dir, "--no-flip"))


def test_train_checkpoint_sample_and_decode(latents, images, vae_dir, tmp_path, monkeypatch):
    def args(out, *extra):
        a = tiny_args(latents, out, "--model", "DiT-Mi/2", "--batch-size", "6", "--disp-group-size", "3", *extra)
        a[a.index("folder")] = "latents"
        return a
    train.main(args(tmp_path / "run", "--steps", "2", "--sample-every", "2", "--sample-steps", "2"))
    from PIL import Image
    grid = Image.open(tmp_path / "run" / "samples" / "step_0000002.png")           # decoded by the VAE:
    assert grid.mode == "RGB" and grid.size == (3 * (SIZE + 2) + 2, 8 * (SIZE + 2) + 2)   # 16 px RGB images
    ckpt_path = str(tmp_path / "run" / "checkpoints" / "step_0000002.pt")
    ck = torch.load(ckpt_path, weights_only=True)
    assert ck["model_config"] == {"name": "DiT-Mi/2", "image_size": 4, "in_channels": 4, "num_classes": 3,
                                  "objective": "flow"}
    assert ck["vae"] == {"name": vae_dir, "scale_factor": pytest.approx(0.18215), "image_size": SIZE}

    # Resume is exact here too: the posterior noise comes from the per-step generator.
    train.main(args(tmp_path / "part", "--steps", "1"))
    train.main(args(tmp_path / "part", "--steps", "2", "--resume"))
    resumed = torch.load(tmp_path / "part" / "checkpoints" / "step_0000002.pt", weights_only=True)
    assert all(torch.equal(ck["model"][k], resumed["model"][k]) for k in ck["model"])

    # sample.py as a user runs it, but in this process (importing diffusers again costs seconds)
    run_sample = lambda *argv: monkeypatch.setattr("sys.argv", ["sample.py", "--ckpt", ckpt_path, "--device", "cpu", *argv]) \
        or sample.main()
    run_sample("--steps", "2", "--num-samples", "5", "--batch-size", "3", "--cfg-scale", "2", "--out", str(tmp_path / "s.npz"))
    npz = np.load(tmp_path / "s.npz")
    assert npz["arr_0"].shape == (5, SIZE, SIZE, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["arr_1"].tolist() == [0, 1, 2, 0, 1]
    with pytest.raises(UserError, match="--vae DIR"):
        run_sample("--vae", str(tmp_path / "run"), "--out", str(tmp_path / "g.png"))    # a directory, not a VAE

    # the linear probe splits images, not rows: image i is rows 2i and 2i+1 (its mirror), whose
    # pooled features are nearly the same, so the two always sit on one side, and it reads row 2i
    import probe
    read = []
    with monkeypatch.context() as m:
        m.setattr(LatentSet, "batch", lambda self, idx, generator=None: read.append(idx) or
                  (torch.from_numpy(self.moments[idx.numpy(), 0]).float(), self.labels[idx]))
        res = probe.probe(ckpt_path, blocks=(1,), ts=(0.5,), train_samples=16, test_samples=8, out=False)
    assert res["train_samples"] == 16 and len(read) == 1
    assert sorted(read[0].tolist()) == list(range(0, 48, 2))      # all 24 images, each once, unflipped
    with pytest.raises(UserError, match="exceed the 24 images"):
        probe.split_indices(48, 20, 5, rows_per_image=2)

    # fid.py: a latent model's reference is images, not its latents, and their size (the VAE's
    # decoding of a latent) is checked before any sampling
    import fid
    clf = str(tmp_path / "clf.pt")
    fid.main(["--train-classifier", clf, "--ref-data", "folder", "--ref-data-path", images, "--classifier-epochs", "0",
              "--device", "cpu"])
    with monkeypatch.context() as m:
        m.setattr(fid, "generate_n", lambda *a, **k: pytest.fail("sampled before checking the reference"))
        score = lambda *ref: fid.main(["--ckpt", ckpt_path, "--extractor", clf, "--device", "cpu",
                                       "--out", str(tmp_path / "f.json"), *ref])
        with pytest.raises(UserError, match="works on latents: its reference is images, so give --ref-stats"):
            score()
        big = make_image_folder(tmp_path / "big", size=2 * SIZE)
        with pytest.raises(UserError, match=f"samples are {SIZE}x{SIZE} pixels, the reference images .* 32x32"):
            score("--ref-data", "folder", "--ref-data-path", big)
    # the VAE moved: sampling says so; the probe and ab.py, which never decode, do not need it
    ck["vae"]["name"] = str(tmp_path / "moved_vae")
    ckpt_path = str(tmp_path / "moved.pt")
    torch.save(ck, ckpt_path)
    with pytest.raises(UserError, match="the checkpoint's VAE .*moved_vae' is not there any more; pass --vae DIR"):
        run_sample("--steps", "1", "--out", str(tmp_path / "g.png"))
    assert sample.load_model(ckpt_path, need_decoder=False)[3] is None


def test_clear_errors(latents, images, vae_dir, tmp_path):
    with pytest.raises(UserError, match="meta.json.*encode_latents.py"):
        LatentSet(str(tmp_path))
    with pytest.raises(UserError, match="encoded from 16 px"):
        LatentSet(latents, image_size=32)
    # 4 x 4 latents cannot be cut into 8 x 8 patches
    a = tiny_args(latents, tmp_path / "run", "--model", "DiT-Mi/8", "--steps", "1")
    a[a.index("folder")] = "latents"
    with pytest.raises(UserError, match="not divisible.*encode the latents at another size"):
        train.main(a)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(UserError, match="--vae DIR"):
        load_vae(str(tmp_path / "empty"))
    r = run_script("encode_latents.py", *encode_args(images, tmp_path / "o", str(tmp_path / "missing")))
    assert r.returncode == 2 and "--vae" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()          # a VAE that fails to load leaves no empty --out


def test_resume_refuses_damaged_output(latents, images, vae_dir, tmp_path, monkeypatch):
    import shutil

    def copy(name, done=10):
        out = tmp_path / name
        shutil.copytree(latents, out)
        meta = {**json.load(open(out / "meta.json")), "done": done}
        if done is None:
            del meta["done"]
        json.dump(meta, open(out / "meta.json", "w"))
        return out
    out = copy("truncated")
    size = os.path.getsize(out / "moments.npy")
    with open(out / "moments.npy", "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(UserError, match="moments.npy is unreadable or shorter than its header says"):
        encode_latents.main(encode_args(images, out, vae_dir))
    assert os.path.getsize(out / "moments.npy") == size - 1000       # not extended with zeros
    with pytest.raises(UserError, match="no valid 'done' count"):
        encode_latents.main(encode_args(images, copy("no_done", done=None), vae_dir))
    with pytest.raises(UserError, match="lacks done"):
        LatentSet(str(tmp_path / "no_done"))

    (tmp_path / "file").write_text("a file, not a directory")
    monkeypatch.setattr(encode_latents, "load_vae", lambda *a: pytest.fail("loaded the VAE before checking --out"))
    with pytest.raises(UserError, match="cannot write to --out"):
        encode_latents.main(encode_args(images, tmp_path / "file" / "out", vae_dir))


def test_pixel_path_does_not_import_diffusers():
    r = run_script("-c", "import sys, data, sample, train; assert 'diffusers' not in sys.modules, 'imported'")
    assert r.returncode == 0, r.stderr


def test_labels_and_meta_that_do_not_fit_are_one_line(tmp_path):
    """A hand-made or damaged latent set: labels outside meta.json's classes ended in the label
    table's IndexError at the first step (a run directory left behind); a bad meta.json in
    float()'s ValueError."""
    def latent_set(labels, **meta):
        d = tmp_path / f"set{len(os.listdir(tmp_path))}"
        d.mkdir()
        np.save(d / "moments.npy", np.zeros((len(labels), 2, 4, 2, 2), np.float16))
        np.save(d / "labels.npy", np.asarray(labels))
        meta = {"vae": "v", "scale_factor": 0.18215, "image_size": 16, "classes": ["a", "b"],
                "num_images": len(labels), "done": len(labels), **meta}
        (d / "meta.json").write_text(json.dumps(meta))
        return str(d)
    assert LatentSet(latent_set([0, 1, 1])).num_classes == 2                  # the control
    for labels, match in [([0, 7, 1], r"labels.npy must hold integers in 0..1 .*int64 in 0..7"),
                          ([0, -1], r"int64 in -1..0"), ([0.0, 1.5], r"float64"),
                          ([[0], [1]], r"labels.npy \(2, 1\) do not match")]:
        with pytest.raises(UserError, match=match):
            LatentSet(latent_set(labels))
    with pytest.raises(UserError, match="4 rows for 4 images with mirror images"):    # mirrors: 2 rows each
        LatentSet(latent_set([0, 1, 1, 0], flip=True))
    assert LatentSet(latent_set([0, 1, 1, 0], flip=True, num_images=2, done=2)).rows_per_image == 2
    for meta in ({"scale_factor": "x"}, {"image_size": "big"}, {"classes": []}):
        with pytest.raises(UserError, match="classes must be a non-empty list, scale_factor and image_size positive"):
            LatentSet(latent_set([0, 1], **meta))
