"""FID with the standard protocol: torch-fidelity's Inception (TF-compatible resize, the
converted TF weights), statistics of the training set as the reference (for --ckpt, the data
its model was trained on; for --samples, CIFAR-10's unless --ref-data or --ref-stats says).

    python fid.py --samples samples.npz                        # FID of an .npz (sample.py) or image folder
    python fid.py --ckpt runs/x/checkpoints/step_0400000.pt    # sample 50K, then FID-50K
    python fid.py ... --inception-weights weights-inception-2015-12-05-6726825d.pth   # offline

FID = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) between Gaussians fitted to the
2048-d pool features of the samples and of the reference (Heusel et al. 2017). The number
depends on every detail of the protocol (feature network, resize, sample count, reference
set), so fid.py writes the protocol next to the number in a small JSON file.

--extractor FILE.pt instead uses a small classifier trained here (--train-classifier); its
"FD-classifier" works offline on any data set, but it is *not* FID and is not comparable with
published numbers: use it to compare runs with each other only.
"""
import argparse
import hashlib
import json
import os
import platform
import sys
import time
import zipfile
import zlib

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import IMAGE_EXTS, common_mode, load_dataset, read_image
from rundir import resolve_checkpoint
from sample import SOLVERS, generate_many, grid_labels, load_model, sampler
from utils import (HelpFormatter, UserError, all_reduce, atomic_output, first_line, number, output_file, pick_device,
                   run_main)

INCEPTION = "inception-v3-compat"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)   # what np.load raises on a bad .npz


def open_npz(path, flag):
    """np.load of an .npz archive; np.save's single array (.npy) under an .npz name is refused."""
    z = np.load(path)
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise UserError(f"{flag}: one array in np.save's .npy format, not an .npz archive of named arrays")
    return z


# ----------------------------------------------------------------------------------------
# Statistics and the Frechet distance
# ----------------------------------------------------------------------------------------

def statistics(feats):
    """Mean and covariance (ddof = 1, as TTUR and torch-fidelity) of (N, D) features, float64."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.shape[0] < 2:
        raise UserError(f"need at least 2 images for a covariance, got {feats.shape[0]}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def pooled_statistics(feats, device):
    """statistics() of the features of every process together, each holding those of its share
    of the samples (train.py's periodic FID under torchrun): the count, the sum and the sum of
    outer products are summed over the processes in one all_reduce, in float64 (so the mean and
    covariance need no second pass). In one process: statistics(feats)."""
    if not dist.is_initialized():
        return statistics(feats)
    f = torch.from_numpy(np.asarray(feats, dtype=np.float64))
    D = f.shape[1]
    sums = torch.cat([torch.tensor([float(len(f))], dtype=torch.float64), f.sum(0), (f.T @ f).flatten()])
    sums = all_reduce(sums.to(device), "sum").cpu().numpy()
    n, mu = sums[0], sums[1:D + 1] / sums[0]
    return mu, (sums[D + 1:].reshape(D, D) - n * np.outer(mu, mu)) / (n - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2, which are
    those of the symmetric PSD matrix S1^(1/2) S2 S1^(1/2): so a symmetric eigensolver does,
    and round-off negatives (rank-deficient covariances, N < D) clamp to 0 instead of
    turning complex."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UserError(f"statistics do not match: mu {mu1.shape}, sigma {sigma1.shape} vs the reference's mu "
                        f"{mu2.shape}, sigma {sigma2.shape} (different feature extractors?)")
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    m = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(min=0)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# ----------------------------------------------------------------------------------------
# Feature extractors: callables from uint8 (N, C, H, W) to float (N, D)
# ----------------------------------------------------------------------------------------

class SmallClassifier(nn.Module):
    """A 3-conv CNN for the offline FD-classifier; features are its 128-d pooled output."""

    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())   # (B, 128)
        self.head = nn.Linear(128, num_classes)

    def forward(self, x_uint8):
        return self.head(self.features(x_uint8))

    def features(self, x_uint8):
        return self.body(x_uint8.float() / 127.5 - 1)


def load_extractor(spec=INCEPTION, weights=None, device="cpu", prefix=""):
    """-> (fn, info); info["dim"] is the feature dimension D. spec: a torch-fidelity feature
    extractor name (default: the Inception of the FID protocol), or a classifier .pt written by
    --train-classifier. prefix: of the flag names in messages (train.py's are --fid-extractor ...)."""
    device = torch.device(device)
    flag = f"--{prefix}extractor {spec!r}"
    if spec.endswith(".pt"):
        if not os.path.isfile(spec):
            raise UserError(f"{flag}: no such classifier file (make one with fid.py --train-classifier)")
        try:
            ck = torch.load(spec, map_location="cpu", weights_only=True)
        except Exception as e:   # a truncated or foreign file: torch.load raises many kinds
            raise UserError(f"{flag}: cannot read it ({type(e).__name__}: {first_line(e, 150)})") from None
        if not isinstance(ck, dict) or ck.get("kind") != "fd-classifier":
            raise UserError(f"{flag} is not a classifier written by fid.py --train-classifier")
        C = ck.get("in_channels")
        if C not in (1, 3):
            raise UserError(f"{flag} is a classifier of {C}-channel images; fid.py scores grey (1) or RGB (3) images")
        try:
            net = SmallClassifier(C, ck["num_classes"])
            net.load_state_dict(ck["state"])
        except (KeyError, RuntimeError, TypeError) as e:
            raise UserError(f"{flag}: its weights do not fit fid.py's classifier ({type(e).__name__}: "
                            f"{first_line(e, 150)})") from None
        net = net.to(device).eval()

        def fn(x):
            if x.shape[1] != C:        # grey <-> RGB, so samples and reference always fit
                x = x.expand(-1, C, -1, -1) if x.shape[1] == 1 else x.float().mean(1, keepdim=True).round().to(torch.uint8)
            return net.features(x)
        # every classifier is "fd-classifier" by name: its file's digest tells two apart, so that a stats
        # file made with one is not scored against another's features (a meaningless distance)
        with open(spec, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        return fn, {"name": "fd-classifier", "file": os.path.abspath(spec), "sha256": digest, "data": ck.get("data"),
                    "held_out_accuracy": ck.get("held_out_accuracy"), "dim": feature_dim(fn, device)}

    try:
        import torch_fidelity
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
        from torch_fidelity.utils import create_feature_extractor
    except ImportError:
        raise UserError("FID needs torch-fidelity: pip install --no-deps torch-fidelity==0.4.0 (see docs/evaluation.md)") from None
    if spec not in FEATURE_EXTRACTORS_REGISTRY:
        raise UserError(f"{flag}: not a torch-fidelity feature extractor "
                        f"({', '.join(sorted(FEATURE_EXTRACTORS_REGISTRY))}) nor a classifier .pt")
    if weights is not None and not os.path.isfile(weights):
        raise UserError(f"--inception-weights {weights!r}: no such file")
    layer = FEATURE_EXTRACTORS_REGISTRY[spec].get_default_feature_layer_for_metric("fid")
    try:
        net = create_feature_extractor(spec, [layer], cuda=False, feature_extractor_weights_path=weights, verbose=False)
    except Exception as e:   # no internet, a wrong file: torch hub raises URLError, torch.load many kinds
        hint = (f"; offline, download {INCEPTION_URL} elsewhere and pass --inception-weights FILE"
                if weights is None else "")
        raise UserError(f"could not load the {spec} weights ({type(e).__name__}: {first_line(e, 150)}){hint}") from None
    net = net.to(device)

    def fn(x):
        return net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)[0]    # Inception wants RGB
    return fn, {"name": spec, "layer": layer, "weights": os.path.abspath(weights) if weights else "torch hub cache / download",
                "tool": "torch-fidelity", "tool_version": torch_fidelity.__version__, "dim": feature_dim(fn, device)}


@torch.no_grad()
def feature_dim(fn, device):
    """D of an extractor's (N, D) features, from one black image: reference statistics are checked
    against it before any sampling."""
    return int(fn(torch.zeros(1, 3, 32, 32, dtype=torch.uint8, device=device)).shape[1])


@torch.no_grad()
def features(fn, images, batch_size=200, device="cpu", progress=False):
    """(N, D) float64 numpy features of uint8 images (N, C, H, W), a batch at a time; progress:
    a bar, for sets of 5,000 images and more (Inception on a CPU: minutes for 50K)."""
    batches = tqdm(range(0, len(images), batch_size), desc=f"features of {len(images)} images", unit="batch",
                   disable=not progress or len(images) < 5000)
    out = [fn(images[i:i + batch_size].to(device)).cpu().double() for i in batches]
    return torch.cat(out).numpy()


# ----------------------------------------------------------------------------------------
# Inputs: samples (.npz, image folder, or a checkpoint to sample from) and the reference
# ----------------------------------------------------------------------------------------

def load_images(path):
    """An .npz with arr_0 (N, H, W, C) uint8, or a directory of images (any depth) -> uint8
    (N, C, H, W), and the generation settings sample.py stored, if any."""
    protocol = None
    if os.path.isfile(path) and path.endswith(".npz"):
        try:
            with open_npz(path, f"--samples {path!r}") as z:
                arr = z["arr_0"] if "arr_0" in z else None
                protocol = str(z["protocol"]) if "protocol" in z else None
        except NPZ_ERRORS as e:
            raise UserError(f"--samples {path!r}: cannot read it ({type(e).__name__}: {e})") from None
        if arr is None:
            raise UserError(f"--samples {path!r} has no arr_0 (images); expected sample.py's .npz")
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] not in (1, 3):
            raise UserError(f"--samples {path!r}: arr_0 must be uint8 (N, H, W, C) with C = 1 or 3, as sample.py "
                            f"writes it, got {arr.dtype} {arr.shape}")
        try:
            protocol = json.loads(protocol) if protocol else None
        except ValueError:
            raise UserError(f"--samples {path!r}: its 'protocol' entry is not JSON (sample.py writes a JSON string)") from None
        images = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    elif os.path.isdir(path):
        files = sorted(os.path.join(r, n) for r, _, ns in os.walk(path) for n in ns if n.lower().endswith(IMAGE_EXTS))
        if not files:
            raise UserError(f"no images in {path!r}")
        pics = [read_image(f, " (--samples)") for f in files]
        mode = common_mode(pics)            # grey stays grey, as in a training folder
        pics = [np.asarray(im.convert(mode), dtype=np.uint8).reshape(im.size[1], im.size[0], -1) for im in pics]
        if len({p.shape for p in pics}) > 1:
            raise UserError(f"images in {path!r} differ in size")
        images = torch.from_numpy(np.stack(pics)).permute(0, 3, 1, 2).contiguous()
    else:
        raise UserError(f"--samples {path!r}: expected an .npz file or a directory of images")
    if len(images) < 2 or min(images.shape[2:]) < 4:
        raise UserError(f"--samples {path!r}: need at least 2 images of at least 4 x 4 pixels, got {len(images)} "
                        f"of {images.shape[2]} x {images.shape[3]}")
    return images, protocol


def generate_n(model, n, solver, steps, *, cfg_scale=1.0, seed=0, batch_size=256, device="cpu", decode=None,
               stop=None, rank=0, world=1, counter=None, progress=False):
    """n images, classes in turn (the same labels and noise for every model, so A/B arms match);
    None if `stop` (generate_many's) was raised on the way. rank, world: this process's share
    (generate_many's); counter: generate()'s, the model evaluations over all batches; progress:
    a bar of the batches (not inside train.py's own)."""
    g = torch.Generator(device).manual_seed(seed)
    return generate_many(model, grid_labels(model.num_classes, n), solver, steps, batch_size=batch_size, generator=g,
                         cfg_scale=cfg_scale, decode=decode, stop=stop, rank=rank, world=world, counter=counter,
                         progress=progress)


def reference_stats(fn, info, *, stats_path=None, data="cifar10", data_path="data", image_size=None, batch_size=200,
                    device="cpu", prefix=""):
    """(mu, sigma, description): from a stats .npz (mu, sigma), checked against the extractor's
    feature dimension, or from a data set data.py loads (at image_size, train.py's --image-size,
    if given). prefix: as load_extractor's."""
    if stats_path:
        flag = f"--{prefix}ref-stats {stats_path!r}"
        if not os.path.isfile(stats_path):
            raise UserError(f"{flag}: no such file")
        try:
            with open_npz(stats_path, flag) as z:
                if "mu" not in z or "sigma" not in z:
                    raise UserError(f"{flag} needs arrays 'mu' and 'sigma'")
                mu, sigma = z["mu"], z["sigma"]
                made_with = str(z["extractor"]) if "extractor" in z else None
                digest = str(z["extractor_sha256"]) if "extractor_sha256" in z else None
                shape = [int(v) for v in z["image_shape"]] if "image_shape" in z else None
        except NPZ_ERRORS as e:
            raise UserError(f"{flag}: cannot read it ({type(e).__name__}: {e})") from None
        if made_with and made_with != info["name"]:
            raise UserError(f"{flag} was made with {made_with}, not {info['name']}")
        if digest and info.get("sha256") and digest != info["sha256"]:
            raise UserError(f"{flag} was made with another classifier (sha256 {digest}...), not with "
                            f"{info['file']!r} (sha256 {info['sha256']}...): its features are another space")
        dim = info["dim"]
        if mu.shape != (dim,) or sigma.shape != (dim, dim):
            raise UserError(f"{flag}: mu {mu.shape} and sigma {sigma.shape} do not fit the {dim}-d features of "
                            f"{info['name']}, which need mu ({dim},) and sigma ({dim}, {dim}) (another extractor's?)")
        if mu.dtype.kind not in "fiu" or sigma.dtype.kind not in "fiu" or not np.isfinite(mu).all() \
                or not np.isfinite(sigma).all():
            raise UserError(f"{flag}: mu and sigma must be finite numbers, not NaN, inf or {mu.dtype} / {sigma.dtype}")
        if (np.diag(sigma) < 0).any() or not np.allclose(sigma, sigma.T, rtol=1e-5, atol=1e-8):
            raise UserError(f"{flag}: sigma is not a covariance matrix (it is not symmetric, or has negative variances)")
        ref = {"stats_file": os.path.abspath(stats_path), "extractor": made_with}
        return mu, sigma, ref if shape is None else {**ref, "image_shape": shape}
    ds = load_dataset(data, data_path, image_size, flags=("--ref-data", "--ref-data-path"))
    if ds.images is None or ds.images.dtype != torch.uint8:
        raise UserError(f"--ref-data {data}: the reference must be images, not latents (use --ref-stats or an image folder)")
    mu, sigma = statistics(features(fn, ds.images, batch_size, device, progress=True))
    return mu, sigma, {"data": data, "data_path": os.path.abspath(data_path), "num_images": len(ds),
                       "image_shape": list(ds.images.shape[1:]), **({"image_size": image_size} if image_size else {})}


def check_size(shape, ref):
    """Samples of another shape (channels, height, width) than the reference images are another
    data set's: refuse to score them. (The extractors turn grey into RGB and back, so a grey
    model's samples against colour images would give a number, not a meaningful one.) A stats
    file written before fid.py recorded the shape has none to check."""
    if "image_shape" not in ref or list(shape) == ref["image_shape"]:
        return
    where = f"{ref['data']} at {ref['data_path']}" if "data" in ref else ref["stats_file"]
    (c, h, w), (rc, rh, rw) = shape, ref["image_shape"]
    if (h, w) != (rh, rw):
        raise UserError(f"the samples are {h}x{w} pixels, the reference images ({where}) {rh}x{rw}: not the same data set")
    raise UserError(f"the samples have {c} channel(s), the reference images ({where}) {rc}: not the same data set")


def save_stats(path, mu, sigma, info, ref):
    """mu and sigma, with what reference_stats checks when they are read back: the extractor
    (and the classifier file's digest) and the shape of the reference images."""
    extra = {"extractor_sha256": info["sha256"]} if "sha256" in info else {}
    if "image_shape" in ref:
        extra["image_shape"] = np.array(ref["image_shape"])
    with atomic_output(path, f"--save-ref-stats {path!r}") as f:
        np.savez(f, mu=mu, sigma=sigma, extractor=info["name"], **extra)


def fid_name(info, n):
    base = {INCEPTION: "FID", "fd-classifier": "FD-classifier"}.get(info["name"], f"FD-{info['name']}")
    return f"{base}-{n // 1000}K" if n % 1000 == 0 else f"{base}-{n}"


def add_args(parser):
    """train.py's flags for a periodic FID of the EMA model."""
    g = parser.add_argument_group("FID during training (fid.py; needs torch-fidelity and the Inception weights)")
    g.add_argument("--fid-every", type=number(int, min=0), default=0, help="steps between FID evaluations, logged "
                   "as type=fid (0: never)")
    g.add_argument("--fid-samples", type=number(int, min=2), default=10_000, help="samples per periodic FID (FID-10K; "
                   "the final number wants fid.py's 50K)")
    g.add_argument("--fid-ref-stats", default=None, help="reference statistics .npz (mu, sigma) (default: the "
                   "training set's)")
    g.add_argument("--fid-extractor", default=INCEPTION, help="feature extractor: torch-fidelity's Inception, or a "
                   "classifier .pt from fid.py --train-classifier (offline; not FID)")
    g.add_argument("--inception-weights", default=None, help="local Inception weights file (offline clusters)")


class TrainingFID:
    """Periodic FID during training (train.py --fid-every): the extractor and the reference
    statistics (the training set, or --fid-ref-stats) are loaded once, when training starts, so
    that a missing file stops the run at once, not hours in.

    Under torchrun every rank samples its share of the images and extracts their features; the
    statistics are pooled over the ranks (pooled_statistics) and rank 0, which alone holds the
    reference, computes the distance. The images are those of one process (generate_many), so
    the number does not depend on the number of GPUs."""

    @classmethod
    def from_args(cls, args, data, device, rank=0, world=1):
        if not args.fid_every:
            return None
        if data.images is None:
            raise UserError("--fid-every needs the training images as its reference; for latents, run fid.py on "
                            "sample.py's .npz with --ref-stats (see docs/imagenet.md)")
        return cls(args.fid_extractor, args.inception_weights, args.fid_ref_stats, data.images, device,
                   args.fid_every, args.fid_samples, args.sample_steps, args.sample_solver, args.sample_cfg,
                   rank=rank, world=world)

    # its messages name train.py's flags: --fid-extractor, --fid-ref-stats, --sample-solver, --sample-steps
    def __init__(self, extractor, weights, ref_stats, train_images, device, every, n, steps=None, solver=None,
                 cfg_scale=1.0, prefix="fid-", rank=0, world=1):
        self.fn, self.info = load_extractor(extractor, weights, device, prefix)
        self.device, self.every, self.n, self.cfg_scale = device, every, n, cfg_scale
        self.steps, self.solver = steps, solver
        self.rank, self.world = rank, world
        if rank != 0:                   # the reference is rank 0's alone
            return
        if ref_stats:
            self.mu, self.sigma, ref = reference_stats(self.fn, self.info, stats_path=ref_stats, prefix=prefix)
            check_size(train_images.shape[1:], ref)     # the samples will have the training images' shape
        else:
            self.mu, self.sigma = statistics(features(self.fn, train_images, device=device, progress=True))

    def due(self, step):
        return step % self.every == 0

    def __call__(self, model, objective, seed, stop=None):
        """The log line's fields (on rank 0; {} on the others); None if a signal (`stop`, on any
        rank) arrived meanwhile: the run's checkpoint comes first, within a scheduler's grace
        period, not after minutes of sampling."""
        fn, solver, steps = sampler(objective, self.solver, self.steps, ("--sample-solver", "--sample-steps"))
        images = generate_n(model, self.n, fn, steps, cfg_scale=self.cfg_scale, seed=seed, device=self.device,
                            stop=stop, rank=self.rank, world=self.world)
        if images is None:
            return None
        feats = features(self.fn, images, device=self.device) if len(images) else np.zeros((0, self.info["dim"]))
        mu, sigma = pooled_statistics(feats, self.device)
        if self.rank != 0:
            return {}
        return {"metric": fid_name(self.info, self.n), "value": frechet_distance(mu, sigma, self.mu, self.sigma),
                "num_samples": self.n, "solver": solver, "steps": steps, "cfg_scale": self.cfg_scale, "ema": True,
                "extractor": self.info["name"]}


# ----------------------------------------------------------------------------------------
# The small classifier of the offline FD-classifier
# ----------------------------------------------------------------------------------------

def train_classifier(data, data_path, out, epochs=2, seed=0, device="cpu"):
    """Train SmallClassifier on a data set, holding out 10% to report its accuracy."""
    ds = load_dataset(data, data_path, flags=("--ref-data", "--ref-data-path"))
    if ds.images is None or ds.images.dtype != torch.uint8:
        raise UserError(f"--ref-data {data}: the classifier learns from images, not latents")
    if len(ds) < 10:
        raise UserError(f"--ref-data {data}: {len(ds)} images are too few to train the classifier (10% are held out)")
    torch.manual_seed(seed)
    perm = torch.randperm(len(ds))
    n_val = len(ds) // 10
    val, tr = perm[:n_val], perm[n_val:]
    net = SmallClassifier(ds.shape[0], ds.num_classes).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    steps = max(1, epochs * len(tr) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    with tqdm(total=steps, desc="training the classifier", unit="step", dynamic_ncols=True) as bar:
        for s in range(steps):
            idx = tr[torch.randint(len(tr), (128,))]
            x, y = ds.images[idx].to(device), ds.labels[idx].to(device)
            if ds.flip:
                x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(3), x)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if s % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")     # one read-back every 50 steps
            bar.update()
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(ds.images[val[i:i + 500]].to(device)).argmax(1).cpu() for i in range(0, n_val, 500)])
    acc = (pred == ds.labels[val]).float().mean().item()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    state = {"kind": "fd-classifier", "state": {k: v.cpu() for k, v in net.state_dict().items()},
             "in_channels": ds.shape[0], "num_classes": ds.num_classes, "data": data,
             "held_out_accuracy": acc, "epochs": epochs, "seed": seed}
    with atomic_output(out, f"--train-classifier {out!r}") as f:
        torch.save(state, f)
    return acc


# ----------------------------------------------------------------------------------------

def reference_of_checkpoint(args, trained, latent):
    """Fill in --ref-data / --ref-data-path for a --ckpt: by default the data set its model was
    trained on, from where it was read (another data set of the same image size would give a
    number, not a meaningful one). A latent model's reference is images, not its latents: it needs
    --ref-stats or --ref-data. Another data set than its own draws a warning. Returns the image
    size to load the reference at (the training's --image-size, for its own data) and the path
    taken from the checkpoint, if it was (for the messages: the user did not type it)."""
    if args.ref_stats:
        return None, None
    if latent:
        if args.ref_data is None:
            raise UserError("this checkpoint's model works on latents: its reference is images, so give --ref-stats "
                            "(ImageNet 256: ADM's reference batch, docs/imagenet.md) or --ref-data and --ref-data-path")
        return None, None
    if args.ref_data not in (None, trained["data"]):
        print(f"warning: the checkpoint's model was trained on --data {trained['data']}, and is scored against "
              f"--ref-data {args.ref_data}", file=sys.stderr)
        return None, None
    args.ref_data, from_ckpt = trained["data"], None
    if args.ref_data_path is None:
        args.ref_data_path = from_ckpt = trained.get("data_path", "data")
        print(f"reference: the checkpoint's training data, --ref-data {args.ref_data} --ref-data-path {from_ckpt}")
    return trained.get("image_size"), from_ckpt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--samples", default=None, help="images to score: sample.py's .npz (arr_0 uint8 NHWC) or a directory of images")
    a("--ckpt", default=None, help="or a checkpoint (or a run directory: its newest): fid.py draws --num-samples images from it first")
    a("--num-samples", type=int, default=None, help="images to score (default: all of --samples; 50000 with --ckpt)")
    a("--solver", default=None, choices=SOLVERS, help="solver with --ckpt (default: the checkpoint's objective's)")
    a("--steps", type=number(int, min=1), default=None, help="solver steps with --ckpt (default: the objective's)")
    a("--cfg-scale", type=number(float), default=1.0, help="guidance scale with --ckpt (1 = none)")
    a("--raw-weights", action="store_true", help="with --ckpt, sample the raw weights instead of the EMA weights")
    a("--seed", type=number(int, min=0, max=2**63 - 1), default=0, help="seed for the initial noise with --ckpt; "
      "with --train-classifier, of its initial weights and data order")
    a("--vae", default=None, help="with a latent --ckpt: the VAE that decodes it (default: the one the checkpoint "
      "records); a local directory works offline")
    a("--ref-stats", default=None, help="reference statistics .npz (mu, sigma) instead of computing them from --ref-data")
    a("--ref-data", default=None, help="reference data set, any image set that data.py loads (default: with --ckpt, "
      "the data its model was trained on, but a latent model needs this or --ref-stats; with --samples, cifar10, "
      "the CIFAR-10 training set)")
    a("--ref-data-path", default=None, help="where --ref-data is, as train.py's --data-path (default: where the "
      "checkpoint's own data was read from; else data)")
    a("--save-ref-stats", default=None, help="write the reference statistics to this .npz for --ref-stats next time")
    a("--extractor", default=INCEPTION, help=f"torch-fidelity feature extractor (default {INCEPTION}, the FID protocol), "
      "or a classifier .pt from --train-classifier (FD-classifier: offline, not FID)")
    a("--inception-weights", default=None, help="local Inception weights file (offline use); default: torch hub cache or download")
    a("--train-classifier", default=None, metavar="OUT.pt",
      help="instead: train the small FD-classifier on --ref-data and save it here, then exit")
    a("--classifier-epochs", type=number(int, min=0), default=2, help="epochs for --train-classifier (0: a single "
      "step, a smoke test)")
    a("--batch-size", type=number(int, min=1), default=256, help="images per forward pass. With --ckpt the noise is "
      "drawn batch by batch: ab.py and train.py --fid-every sample in batches of 256, and at 256 a --seed gives "
      "their images (on the same kind of device)")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    a("--out", default=None, help="JSON result file (default: next to --samples / --ckpt, <name>.fid.json)")
    args = p.parse_args(argv)
    device = pick_device(args.device)

    own = {"train_classifier", "ref_data", "ref_data_path", "classifier_epochs", "seed", "device"}   # what it reads
    if args.train_classifier:
        if args.samples or args.ckpt:
            raise UserError("--train-classifier trains the classifier only; score --samples / --ckpt in a second call")
        ignored = [a.option_strings[0] for a in p._actions
                   if a.dest not in own | {"help"} and getattr(args, a.dest) != a.default]
        if ignored:
            raise UserError(f"{', '.join(ignored)}: not used by --train-classifier (it reads --ref-data, "
                            f"--ref-data-path, --classifier-epochs, --seed and --device)")
        output_file(args.train_classifier, "--train-classifier", [".pt"])
        args.ref_data, args.ref_data_path = args.ref_data or "cifar10", args.ref_data_path or "data"
        acc = train_classifier(args.ref_data, args.ref_data_path, args.train_classifier, args.classifier_epochs,
                               args.seed, device)
        print(f"wrote {args.train_classifier} (held-out accuracy {acc:.3f})")
        return
    if args.classifier_epochs != p.get_default("classifier_epochs"):
        raise UserError("--classifier-epochs: a flag of --train-classifier")
    if (args.samples is None) == (args.ckpt is None):
        raise UserError("give exactly one of --samples (an .npz or image folder) and --ckpt")
    if args.ckpt:
        args.ckpt = resolve_checkpoint(args.ckpt)       # a run directory: its newest checkpoint
    if args.ref_stats and (args.ref_data is not None or args.ref_data_path is not None):
        raise UserError("--ref-stats is the reference; --ref-data / --ref-data-path would be ignored")
    if args.num_samples is not None and args.num_samples < 2:
        raise UserError(f"--num-samples must be at least 2, got {args.num_samples}")
    if args.samples:
        unused = [flag for flag, given in (("--steps", args.steps), ("--solver", args.solver), ("--vae", args.vae),
                                           ("--cfg-scale", args.cfg_scale != 1), ("--raw-weights", args.raw_weights)) if given]
        if unused:
            raise UserError(f"{', '.join(unused)}: sampling flags, for --ckpt only; --samples are already made")
    out = args.out or os.path.splitext(args.samples or args.ckpt)[0].rstrip("/") + ".fid.json"
    output_file(out, "--out", [".json"])
    if args.save_ref_stats:
        output_file(args.save_ref_stats, "--save-ref-stats", [".npz"])

    # Everything that can fail fast (extractor, samples or checkpoint, reference) before the long part, sampling
    fn, info = load_extractor(args.extractor, args.inception_weights, device)
    t0 = time.time()
    if args.ckpt:
        ckpt, model, objective, decode = load_model(args.ckpt, "model" if args.raw_weights else "ema", device, args.vae)
        if args.cfg_scale != 1 and not model.num_classes:
            raise UserError("--cfg-scale: this checkpoint's model is unconditional (trained with --unconditional): "
                            "it takes no labels, so no guidance")
        solve, solver, steps = sampler(objective, args.solver, args.steps)
        ref_size, ref_path_from_ckpt = reference_of_checkpoint(args, ckpt["args"], decode is not None)
    else:
        images, generation = load_images(args.samples)
        if args.num_samples:
            if args.num_samples > len(images):
                raise UserError(f"--num-samples {args.num_samples} but {args.samples!r} holds only {len(images)} images")
            images = images[:args.num_samples]
        generation = generation or "unknown (an .npz from an older sample.py, or an image folder)"
        ref_size = ref_path_from_ckpt = None
    args.ref_data, args.ref_data_path = args.ref_data or "cifar10", args.ref_data_path or "data"   # what is left
    try:
        ref_mu, ref_sigma, ref = reference_stats(fn, info, stats_path=args.ref_stats, data=args.ref_data,
                                                 data_path=args.ref_data_path, image_size=ref_size,
                                                 batch_size=args.batch_size, device=device)
    except UserError as e:
        if ref_path_from_ckpt is None:
            raise
        raise UserError(f"the checkpoint's model was trained from {ref_path_from_ckpt!r}, its reference by default: "
                        f"{e}; --ref-data-path says where that data is on this machine") from None
    if args.save_ref_stats:
        save_stats(args.save_ref_stats, ref_mu, ref_sigma, info, ref)
    if args.ckpt:       # the size first: a latent model's images are its VAE's decoding of one latent
        shape = (model.in_channels, model.image_size, model.image_size)
        with torch.no_grad():
            check_size(shape if decode is None else decode(torch.zeros(1, *shape, device=device)).shape[1:], ref)
        images = generate_n(model, args.num_samples or 50_000, solve, steps, cfg_scale=args.cfg_scale, seed=args.seed,
                            batch_size=args.batch_size, device=device, decode=decode, progress=True)
        generation = {"checkpoint": os.path.abspath(args.ckpt), "step": ckpt.get("step"), "solver": solver,
                      "steps": steps, "cfg_scale": args.cfg_scale, "ema": not args.raw_weights, "seed": args.seed,
                      "batch_size": args.batch_size}    # the noise is drawn batch by batch: part of the samples
    check_size(images.shape[1:], ref)
    mu, sigma = statistics(features(fn, images, args.batch_size, device, progress=True))
    value = frechet_distance(mu, sigma, ref_mu, ref_sigma)
    result = {"metric": fid_name(info, len(images)), "value": value, "num_samples": len(images),
              "samples": os.path.abspath(args.samples) if args.samples else None, "reference": ref,
              "feature_extractor": info, "generation": generation, "frechet_distance": "fid.py (eigvalsh)",
              "seconds": round(time.time() - t0, 1),
              "versions": {"torch": str(torch.__version__), "python": platform.python_version()}}
    with atomic_output(out, f"--out {out!r}", mode="w") as f:
        json.dump(result, f, indent=1)
    print(f"{result['metric']}: {value:.3f}  ({out})")
    return result


if __name__ == "__main__":
    run_main(main)
