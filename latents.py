"""The latent path: the Stable Diffusion VAE (diffusers, optional) and the data set of latents
that encode_latents.py writes, for train.py --data latents.

The paper trains in the SD-VAE's latent space (4 x 32 x 32 for 256 px images). Running the
encoder in every step costs more than a DiT-B/2 step, so every image is encoded once, up front
(encode_latents.py), and training reads the stored posterior mean and std.
"""
import json
import os

import numpy as np
import torch

from utils import UserError, first_line

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"


# ----------------------------------------------------------------------------------------
# The VAE
# ----------------------------------------------------------------------------------------

def load_vae(name, device="cpu"):
    """diffusers' AutoencoderKL from a Hugging Face repo id or a local save_pretrained directory."""
    if (os.path.isabs(name) or name.startswith(".") or os.path.exists(name)) and not os.path.isdir(name):
        raise UserError(f"--vae {name!r} is not a directory; a local VAE is a directory with config.json and weights")
    try:
        from diffusers import AutoencoderKL      # optional: only the latent path needs it
    except ImportError:
        raise UserError("the latent path needs diffusers: pip install diffusers") from None
    try:
        vae = AutoencoderKL.from_pretrained(name, low_cpu_mem_usage=False)
    except Exception as e:   # no internet, no such repo, a directory without config.json, corrupt weights ...
        raise UserError(f"cannot load the VAE {name!r} ({type(e).__name__}: {first_line(e)}). "
                        f"Without internet, download it where you can ('hf download {DEFAULT_VAE} --local-dir DIR'), "
                        f"copy DIR here and pass --vae DIR") from None
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode(vae, x):
    """Images in [-1, 1] (B, 3, H, W) -> the posterior's mean and std, each (B, C, H/f, W/f), unscaled."""
    posterior = vae.encode(x).latent_dist
    return posterior.mean, posterior.std


@torch.no_grad()
def decode(vae, z, scale_factor, chunk=32):
    """Scaled latents -> images in [-1, 1]. In chunks: at 256 px the decoder's activations take
    a few hundred MB per image."""
    dtype = next(vae.parameters()).dtype
    out = [vae.decode((c / scale_factor).to(dtype)).sample.float() for c in z.split(chunk)]
    return torch.cat(out).clamp(-1, 1)


def decoder(name, scale_factor, channels, device):
    """latents -> images in [-1, 1] with the named VAE, for sample grids and sample.py."""
    vae = load_vae(name, device)
    if vae.config.latent_channels != channels:
        raise UserError(f"the VAE has {vae.config.latent_channels} latent channels, the model {channels}")
    return lambda z: decode(vae, z, scale_factor)


# ----------------------------------------------------------------------------------------
# The stored latents as a data set (data.py's interface: len, shape, batch, to)
# ----------------------------------------------------------------------------------------

class LatentSet:
    """VAE latents written by encode_latents.py: the posterior mean and std of every image,
    memory-mapped. ImageNet's are 21 GB (42 GB with mirror images), too much for GPU memory,
    so each batch reads only its rows, on the CPU, and moves them to the training device."""

    flip = False    # mirror images are rows of their own: flipping a latent is not encoding a flipped image
    images = None   # no pixels: FID during training needs image data
    index_device = torch.device("cpu")        # rows are read from the memory map on the CPU

    def __init__(self, path, image_size=None):
        meta_path = os.path.join(path or "", "meta.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"--data-path {path!r} has no meta.json: --data latents needs a directory written by "
                            f"encode_latents.py")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            self.moments = np.load(os.path.join(path, "moments.npy"), mmap_mode="r")   # (N, 2, C, h, w) float16
            labels = np.load(os.path.join(path, "labels.npy"))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read the latents in --data-path {path!r} ({e}); re-run encode_latents.py") from None
        missing = [k for k in ("vae", "scale_factor", "image_size", "classes", "num_images", "done")
                   if not isinstance(meta, dict) or k not in meta]
        if missing:
            raise UserError(f"{meta_path!r} lacks {', '.join(missing)}: not a meta.json of encode_latents.py; "
                            f"re-run encode_latents.py")
        if meta.get("done") != meta.get("num_images"):
            raise UserError(f"the latents in {path!r} are incomplete ({meta.get('done')} of {meta.get('num_images')} "
                            f"images encoded); re-run the same encode_latents.py command to finish them")
        if image_size and image_size != meta["image_size"]:
            raise UserError(f"the latents in {path!r} were encoded from {meta['image_size']} px images; --image-size "
                            f"{image_size} cannot change that (encode again with encode_latents.py --image-size {image_size})")
        if self.moments.ndim != 5 or self.moments.shape[1] != 2 or labels.ndim != 1 or len(labels) != len(self.moments):
            raise UserError(f"{path!r}: moments.npy {self.moments.shape} and labels.npy {labels.shape} do not match")
        classes, scale, size = meta["classes"], meta["scale_factor"], meta["image_size"]
        if not isinstance(classes, list) or not classes or not isinstance(scale, (int, float)) \
                or not isinstance(size, int) or scale <= 0 or size <= 0:
            raise UserError(f"{meta_path!r}: classes must be a non-empty list, scale_factor and image_size positive "
                            f"numbers; got {classes!r:.60}, {scale!r}, {size!r}: re-run encode_latents.py")
        if len(labels) and (labels.dtype.kind not in "iu" or not 0 <= labels.min() <= labels.max() < len(classes)):
            raise UserError(f"{path!r}: labels.npy must hold integers in 0..{len(classes) - 1} (meta.json's "
                            f"{len(classes)} classes), got {labels.dtype} in {labels.min()}..{labels.max()}")
        # with mirror images (the default) image i is rows 2i and 2i+1; the probe keeps them together
        self.rows_per_image = 2 if meta.get("flip") else 1
        if len(labels) != meta["num_images"] * self.rows_per_image:
            raise UserError(f"{path!r}: {len(labels)} rows for {meta['num_images']} images "
                            f"{'with' if self.rows_per_image == 2 else 'without'} mirror images: re-run encode_latents.py")
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.scale_factor = float(scale)
        # What sample.py needs to turn this model's outputs into images; saved in checkpoints.
        self.vae = {"name": meta["vae"], "scale_factor": self.scale_factor, "image_size": int(meta["image_size"])}
        self.device = torch.device("cpu")

    def __len__(self):
        return len(self.labels)

    @property
    def shape(self):          # (C, h, w) of one latent
        return tuple(self.moments.shape[2:])

    def to(self, device):
        self.device = torch.device(device)    # where batches go; the set itself stays on the CPU
        return self

    def batch(self, idx, generator=None):
        """A fresh posterior sample (mean + std * noise) * scale_factor for samples idx, as DiT and
        SiT draw one from an image encoded at every step. train.py passes its per-step generator
        (after its own draws), so the noise too is a function of (seed, step) and resume is exact.
        It is drawn for the local batch: with several GPUs the ranks apply the same noise to
        different latents, so a latent run is not bit-identical across GPU counts."""
        m = torch.from_numpy(self.moments[idx.numpy()]).to(self.device).float()     # (B, 2, C, h, w)
        mean, std = m.unbind(1)
        noise = torch.randn(mean.shape, device=self.device, generator=generator)
        return (mean + std * noise) * self.scale_factor, self.labels[idx].to(self.device)

    def decoder(self, device):
        """latents -> images in [-1, 1] with this set's VAE, for sample grids during training."""
        return decoder(self.vae["name"], self.scale_factor, self.shape[0], device)
