"""Data: load a whole image set into one uint8 tensor, then serve batches by step number.

Small image sets (CIFAR-10 is 150 MB as uint8) fit in memory, even in GPU memory, so the
training loop never waits for a loader. Batches are a pure function of (seed, step): the
permutation of epoch e is drawn from a seed made of (seed, e), and step s takes the s-th slice
of it. That makes resume exact (the data order continues where it stopped), gives the baseline and the
dispersive run of an A/B the very same batches, and lets a run resume on another number of
GPUs (each rank takes its share of the same global batch).
"""
import contextlib
import gzip
import os
import sys
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from latents import LatentSet
from utils import UserError, first_line

DATASETS = ("cifar10", "fashion-mnist", "mnist", "folder", "latents")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class ImageSet:
    images: torch.Tensor      # (N, C, H, W) uint8
    labels: torch.Tensor      # (N,) long
    num_classes: int
    classes: list
    flip: bool                # random horizontal flips suit this data
    vae = None                # pixels: there is nothing to decode (latents.LatentSet has its VAE here)

    def __len__(self):
        return len(self.labels)

    @property
    def shape(self):          # (C, H, W) of one sample
        return tuple(self.images.shape[1:])

    def to(self, device):
        """Move the whole set to the training device (GPU-resident: no loader, no stalls)."""
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self

    @property
    def index_device(self):   # batches are gathered where the images are
        return self.images.device

    def batch(self, idx, generator=None):
        """Samples idx as model inputs in [-1, 1], and their labels."""
        return to_model_range(self.images[idx]), self.labels[idx]


def load_dataset(name, path, image_size=None, flags=("--data", "--data-path"), warn=True):
    """The whole set: an ImageSet, or for --data latents a LatentSet (latents.py). flags: the
    caller's names for --data and --data-path in its messages (fid.py: --ref-data ...); warn:
    print the notes (under torchrun, rank 0 alone does)."""
    def own_flags(text):
        return text.replace("--data-path", flags[1]).replace("--data ", flags[0] + " ")
    notes = []
    try:
        ds = _load_dataset(name, path, image_size, notes)
    except UserError as e:
        raise UserError(own_flags(str(e))) from None
    if warn:
        for text in notes:
            print(f"warning: {own_flags(text)}", file=sys.stderr)
    return ds


def _load_dataset(name, path, image_size, notes):
    if name == "cifar10":
        return _torchvision_set("CIFAR10", path, flip=True)
    if name in ("fashion-mnist", "mnist"):
        return _mnist_like(name, path)
    if name == "folder":
        return _image_folder(path, image_size, notes)
    if name == "latents":
        return LatentSet(path, image_size)
    raise UserError(f"unknown --data {name!r}; choose one of: {', '.join(DATASETS)}")


def _torchvision_set(cls_name, path, flip):
    import torchvision
    existed = os.path.isdir(path)
    try:
        ds = getattr(torchvision.datasets, cls_name)(path, train=True, download=True)
    except Exception as e:  # no internet, a corrupt archive, a read-only directory ...
        # torchvision made <path> (and for MNIST-style sets <path>/<cls_name>/raw) before it
        # failed: remove what it left empty, so that a mistyped path leaves nothing behind and an
        # image folder does not gain a class
        for d in (os.path.join(path, cls_name, "raw"), os.path.join(path, cls_name)) + (() if existed else (path,)):
            with contextlib.suppress(OSError):
                os.rmdir(d)             # only ever removes an empty directory
        raise UserError(f"could not find or download {cls_name} under --data-path {path!r} ({type(e).__name__}: {first_line(e)}). "
                        f"Point --data-path at a directory that holds it, or use --data folder for an image folder.") from None
    images = torch.as_tensor(np.asarray(ds.data))
    images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)   # (N, C, H, W)
    return ImageSet(images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long), len(ds.classes), list(ds.classes), flip)


def _read_idx(path):
    """The IDX format of (Fashion-)MNIST: a 4-byte magic (0, 0, 8 for uint8 data, the rank),
    one big-endian int32 per dimension, then the uint8 data."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:        # a truncated or damaged .gz
        raise UserError(f"cannot read {path!r} ({type(e).__name__}: {e}); download it again") from None
    ndim = raw[3] if len(raw) >= 4 and raw[:3] == b"\0\0\x08" else 0
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if not ndim or len(raw) != 4 + 4 * ndim + int(np.prod(shape)):
        raise UserError(f"{path!r} is not a whole IDX file of uint8 data ({len(raw)} bytes); download it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


# The first ten labels of each training set (MNIST's first image is a 5, Fashion-MNIST's an ankle boot)
FIRST_LABELS = {"mnist": [5, 0, 4, 1, 9, 2, 1, 3, 1, 4], "fashion-mnist": [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]}


def _mnist_like(name, path):
    # A directory that holds the IDX files themselves (as Debian's dataset-fashion-mnist
    # package installs them) is read directly; anything else goes through torchvision.
    for ext in ("", ".gz"):
        img, lab = (os.path.join(path, f"train-{k}-idx{n}-ubyte{ext}") for k, n in (("images", 3), ("labels", 1)))
        if os.path.isfile(img) and os.path.isfile(lab):
            images = torch.from_numpy(_read_idx(img).copy()).unsqueeze(1)
            labels = torch.from_numpy(_read_idx(lab).astype(np.int64))
            if images.dim() != 4 or labels.dim() != 1 or len(images) != len(labels) or not len(labels) \
                    or labels.max() > 9:
                raise UserError(f"{img!r} ({len(images)} images) and {lab!r} ({len(labels)} labels) are not "
                                f"one set's images and labels")
            # The two sets' files have the same names; their first training labels tell them apart
            other = "mnist" if name == "fashion-mnist" else "fashion-mnist"
            if labels[:10].tolist() == FIRST_LABELS[other]:
                raise UserError(f"--data-path {path!r} holds {other}'s training set, not {name}'s: pass --data {other}")
            classes = [str(i) for i in range(10)]
            return ImageSet(images, labels, 10, classes, flip=(name == "fashion-mnist"))
    ds = _torchvision_set("FashionMNIST" if name == "fashion-mnist" else "MNIST", path, flip=(name == "fashion-mnist"))
    return ds


def read_image(f, hint=""):
    """One image file, decoded, with 8 bits per channel in the mode it was stored in (1, L, RGB,
    P, ...): 16-bit grey keeps its high byte, where convert("L") or convert("RGB") would clip
    everything above 255 to white. Anything unreadable is a UserError, hint added to it."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(f) as im:
            im.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {f!r} ({e}){hint}") from None
    if im.mode.startswith("I"):         # 16-bit grey (mode I before Pillow 10.3)
        a = np.asarray(im)
        if a.min() < 0 or a.max() > 65535:
            raise UserError(f"{f!r} has 32-bit pixels (mode {im.mode}); convert it to 8 or 16 bits per channel{hint}")
        im = Image.fromarray((a >> 8).astype(np.uint8))
    elif im.mode == "F":
        raise UserError(f"{f!r} has floating-point pixels; convert it to 8 or 16 bits per channel{hint}")
    return im


def common_mode(pics):
    """The mode a set of PIL images is read in: 'L' if every one is grey, else 'RGB'."""
    return "L" if all(im.mode in ("1", "L") for im in pics) else "RGB"


def _image_folder(path, image_size, notes):
    """ImageFolder layout: one sub-directory per class, images inside. Everything is decoded
    once, up front. Grayscale-only sets stay 1-channel; a set mixing modes becomes RGB."""
    from tqdm import tqdm

    files, classes = list_image_folder(path)
    if len(classes) == 1:
        notes.append(f"--data-path {path!r} has one class folder, {classes[0]!r}: one class for every image "
                        f"(if the class folders are inside it, point --data-path there)")
    pics = [read_image(f, "; remove it from --data-path")
            for f, _ in tqdm(files, desc=f"decoding {len(files)} images", disable=len(files) < 5000)]
    mode = common_mode(pics)
    arrays = []
    for (f, _), im in zip(files, pics):
        im = im.convert(mode)
        if image_size:
            im = center_crop(im, image_size)
        elif im.size != pics[0].size:
            raise UserError(f"images differ in size ({files[0][0]!r} is {pics[0].size}, {f!r} is {im.size}); "
                            f"pass --image-size to resize and centre-crop them all")
        arrays.append(np.asarray(im, dtype=np.uint8).reshape(im.size[1], im.size[0], -1))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([c for _, c in files], dtype=torch.long)
    return ImageSet(images, labels, len(classes), classes, flip=True)


def list_image_folder(path):
    """[(file, class index)] in a fixed (sorted) order, and the class names."""
    if not path or not os.path.isdir(path):
        raise UserError(f"--data-path {path!r} is not a directory; it needs one sub-directory of images per class")
    classes = sorted(d.name for d in os.scandir(path) if d.is_dir() and not d.name.startswith("."))
    files = []
    for ci, c in enumerate(classes):
        for root, _, names in sorted(os.walk(os.path.join(path, c))):
            files += [(os.path.join(root, n), ci) for n in sorted(names) if n.lower().endswith(IMAGE_EXTS)]
    if not files:
        raise UserError(f"no images found in --data-path {path!r}: expected one sub-directory per class with image files "
                        f"({', '.join(IMAGE_EXTS)})")
    found = {ci for _, ci in files}
    empty = [c for ci, c in enumerate(classes) if ci not in found]
    if empty:       # it would still be a class the model is conditioned on, never trained
        raise UserError(f"--data-path {path!r}: class folder(s) {', '.join(map(repr, empty[:5]))} hold no images "
                        f"({', '.join(IMAGE_EXTS)}); remove them or add images")
    return files, classes


def center_crop(im, size):
    """ADM's centre crop: resize the short side to `size` (box filter while far too large,
    then bicubic), then cut the centre square."""
    from PIL import Image
    while min(im.size) >= 2 * size:
        im = im.resize(tuple(x // 2 for x in im.size), resample=Image.BOX)
    scale = size / min(im.size)
    im = im.resize(tuple(round(x * scale) for x in im.size), resample=Image.BICUBIC)
    left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
    return im.crop((left, top, left + size, top + size))


class BatchStream:
    """Which samples each rank trains on at each step; a pure function of (seed, step)."""

    def __init__(self, n, global_batch, seed, rank=0, world=1, device="cpu"):
        if global_batch > n:
            raise UserError(f"--batch-size {global_batch} is larger than the data set ({n} samples)")
        if global_batch % world:
            raise UserError(f"--batch-size {global_batch} is not divisible by the number of processes ({world})")
        self.n, self.global_batch, self.seed, self.rank, self.world = n, global_batch, seed, rank, world
        self.device = device      # where the indices are needed (the data set's device)
        self.steps_per_epoch = n // global_batch      # the last partial batch of an epoch is dropped
        self._perm_epoch, self._perm = None, None

    def indices(self, step):
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)   # distinct per (seed, epoch)
            # Drawn on the CPU (the same order on any device), then moved once per epoch:
            # a host-to-device copy every step would make the host wait for the GPU.
            self._perm_epoch, self._perm = epoch, torch.randperm(self.n, generator=g).to(self.device)
        local = self.global_batch // self.world
        start = i * self.global_batch + self.rank * local
        return self._perm[start:start + local]


class Batches:
    """batches(s) -> (x, y, draws): step s's images and labels for this process, and the
    objective's random draws for them (a dict: noise, times, label drops; objective.draw).

    All randomness of a step (samples, flips and the draws) comes from (seed, s) and is drawn
    for the whole global batch of `global_batch` images, each rank taking its slice: 1 or 8
    GPUs train on the same numbers, and resume is exact. The multiplier keeps the seeds of
    (seed, s) and (seed + 1, s') apart for any run shorter than 1,000,003 steps."""

    def __init__(self, data, global_batch, seed, draw, device, rank=0, world=1, labels=True):
        self.data, self.seed, self.draw, self.labels = data, seed, draw, labels
        self.stream = BatchStream(len(data), global_batch, seed, rank, world, data.index_device)
        self.shape = (global_batch, *data.shape)
        local = global_batch // world
        self.mine = slice(rank * local, (rank + 1) * local)
        self.gen = torch.Generator(device)

    def __call__(self, step):
        gen = self.gen.manual_seed(self.seed * 1_000_003 + step)
        flip = (torch.rand(self.shape[0], device=gen.device, generator=gen) < 0.5)[self.mine]
        draws = {k: v[self.mine] for k, v in self.draw(gen, self.shape).items()}
        # Latent sets draw their posterior noise from gen too, after the draws above.
        x, y = self.data.batch(self.stream.indices(step), generator=gen)
        if self.data.flip:
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x, (y if self.labels else torch.zeros_like(y)), draws


def to_model_range(x_uint8):
    """uint8 [0, 255] -> float [-1, 1]."""
    return x_uint8.float().div_(127.5).sub_(1.0)
