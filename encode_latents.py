"""Encode an image folder into Stable Diffusion VAE latents, once, for train.py --data latents.

    python encode_latents.py --data-path /data/imagenet/train --out latents/in256     # ImageNet 256
    python encode_latents.py ... --vae /models/sd-vae-ft-ema                          # a local copy (offline)

The paper trains in the latent space of the SD-VAE (4 x 32 x 32 for 256 px images). Running the
VAE encoder in every training step costs more than a DiT-B/2 step itself, so, as fast-DiT does,
every image is encoded once up front. Each image gets ADM's centre crop to --image-size; with
flips (the default) its mirror image is encoded too, because DiT / SiT train with random flips
and the VAE is not flip-equivariant (the flipped latent is not the latent of the flipped image).

What is stored, and why: the posterior's mean and std, not one sample of it. DiT and SiT draw
a fresh sample (mean + std * noise) from the encoder's posterior at every step; a stored sample
would freeze one noise draw for all 80 epochs, and the mean alone is a slightly different
distribution from the one the decoder was trained on. It costs twice the disk of samples.

DIR/ after a run:
    moments.npy  (M, 2, C, h, w) float16, memory-mappable: [:, 0] mean, [:, 1] std, unscaled.
                 M = images x 2 with flips: rows 2i and 2i+1 are image i and its mirror image.
    labels.npy   (M,) int64 class of each row
    files.txt    the source image of each image (one line each, in encoding order)
    meta.json    the VAE, scale factor (latent x 0.18215 has about unit variance), crop size,
                 flips, classes and how many images are done
Re-running the same command after an interruption resumes after the last finished batch.
"""
import argparse
import json
import os

import numpy as np
import torch
from tqdm import tqdm

from data import center_crop, list_image_folder, read_image
from latents import DEFAULT_VAE, encode, load_vae
from utils import HelpFormatter, UserError, atomic_output, number, pick_device, run_main, writable_dir


# ----------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------

class CenterCrops(torch.utils.data.Dataset):
    """Image i as uint8 (3, size, size) after ADM's centre crop, and whether it could be read
    (a worker that raises gives a many-line traceback; the main process reports it in one line)."""

    def __init__(self, files, size, start=0):
        self.files, self.size, self.start = files, size, start

    def __len__(self):
        return len(self.files) - self.start

    def __getitem__(self, i):
        try:
            im = center_crop(read_image(self.files[self.start + i]).convert("RGB"), self.size)
        except (UserError, OSError, ValueError):      # unreadable: skipped, and counted
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), False
        return torch.from_numpy(np.array(im)).permute(2, 0, 1), True


def write_json(obj, path):
    with atomic_output(path, mode="w") as f:      # a crash leaves the old file or the new one
        json.dump(obj, f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--data-path", required=True, help="ImageFolder-layout directory: one sub-directory of images per class")
    a("--out", required=True, help="output directory for moments.npy, labels.npy, files.txt and meta.json")
    a("--image-size", type=number(int, min=8), default=256, help="centre-crop size in pixels (ADM / DiT crop); latents are 8x smaller")
    a("--vae", default=DEFAULT_VAE, help="diffusers AutoencoderKL: a Hugging Face repo id, or a local directory "
      "(as save_pretrained writes it) for machines without internet")
    a("--no-flip", action="store_true", help="do not also encode the mirror image of every image (halves time and disk)")
    a("--batch-size", type=number(int, min=1), default=128, help="images per encoder pass (x2 with flips)")
    a("--num-workers", type=number(int, min=0), default=min(8, os.cpu_count() or 1), help="processes decoding and cropping images")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    args = p.parse_args(argv)
    writable_dir(args.out, "--out")

    files, classes = list_image_folder(args.data_path)
    copies = 1 if args.no_flip else 2
    vae_id = os.path.abspath(args.vae) if os.path.isdir(args.vae) else args.vae
    settings = {"vae": vae_id, "image_size": args.image_size, "flip": copies == 2, "num_images": len(files)}
    paths = {k: os.path.join(args.out, k) for k in ("moments.npy", "labels.npy", "files.txt", "meta.json")}

    done, meta = 0, None
    if os.path.exists(paths["meta.json"]):     # resume: only the very same job may continue
        try:
            with open(paths["meta.json"]) as f:
                meta = json.load(f)
            with open(paths["files.txt"]) as f:
                same_files = f.read().splitlines() == [fn for fn, _ in files]
        except (OSError, ValueError) as e:
            raise UserError(f"cannot resume {args.out!r} ({e}); delete it to start again") from None
        if not isinstance(meta, dict):
            raise UserError(f"cannot resume {args.out!r}: its meta.json is not encode_latents.py's; delete it to start again")
        differ = [k for k, v in settings.items() if meta.get(k) != v] + ([] if same_files else ["files"])
        if differ:
            raise UserError(f"--out {args.out!r} holds another encoding (its {', '.join(differ)} differ); "
                            f"choose another --out or delete it")
        done = meta.get("done")
        if not isinstance(done, int) or not 0 <= done <= len(files):
            raise UserError(f"cannot resume {args.out!r}: its meta.json has no valid 'done' count ({done!r}); "
                            f"delete it to start again")
        if done == len(files):
            print(f"{args.out} is complete ({done} images); nothing to do")
            return
        print(f"resuming {args.out} at image {done} of {len(files)}")

    device = pick_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True      # the encoder runs in float32, TF32 on Ampere and later
    torch.backends.cudnn.allow_tf32 = True
    vae = load_vae(args.vae, device)
    f = 2 ** (len(vae.config.block_out_channels) - 1)   # one 2x downsampling per encoder block but the last
    if args.image_size % f:
        raise UserError(f"--image-size {args.image_size} is not divisible by the VAE's downsampling factor {f}")
    shape = (len(files) * copies, 2, vae.config.latent_channels, args.image_size // f, args.image_size // f)

    os.makedirs(args.out, exist_ok=True)       # only now: a VAE that fails to load leaves no empty --out
    if meta is None:                           # a fresh start: allocate everything, then record it
        moments = np.lib.format.open_memmap(paths["moments.npy"], mode="w+", dtype=np.float16, shape=shape)
        np.save(paths["labels.npy"], np.repeat(np.array([c for _, c in files], dtype=np.int64), copies))
        with open(paths["files.txt"], "w") as fh:
            fh.writelines(fn + "\n" for fn, _ in files)
        meta = {**settings, "vae_class": "AutoencoderKL", "scale_factor": float(vae.config.scaling_factor),
                "latent_shape": list(shape[2:]), "rows": shape[0], "crop": "ADM centre crop",
                "stored": "moments.npy[:, 0] posterior mean, [:, 1] std, unscaled; train on "
                          "(mean + std * noise) * scale_factor",
                "source": os.path.abspath(args.data_path), "classes": classes, "done": 0}
        write_json(meta, paths["meta.json"])
    else:
        try:     # "r" first: "r+" would silently extend a truncated file with zeros
            moments = np.load(paths["moments.npy"], mmap_mode="r")
        except (OSError, ValueError) as e:     # a truncated file: "mmap length is greater than file size"
            raise UserError(f"cannot resume {args.out!r}: moments.npy is unreadable or shorter than its header says "
                            f"({e}); delete it to start again") from None
        if moments.shape != shape or moments.dtype != np.float16 or shape[0] != meta.get("rows"):
            raise UserError(f"{paths['moments.npy']} has shape {moments.shape} ({moments.dtype}), meta.json says "
                            f"{meta.get('rows')} rows and this VAE gives {shape}; choose another --out or delete it")
        moments = np.load(paths["moments.npy"], mmap_mode="r+")

    loader = torch.utils.data.DataLoader(CenterCrops([fn for fn, _ in files], args.image_size, done),
                                         batch_size=args.batch_size, num_workers=args.num_workers)
    pbar = tqdm(total=len(files), initial=done, unit="img", desc="encoding", dynamic_ncols=True)
    for x, ok in loader:
        if not ok.all():
            bad = files[done + int((~ok).nonzero()[0])][0]
            raise UserError(f"cannot read image {bad!r}; remove it from --data-path and re-run (finished batches are kept)")
        x = x.to(device).float() / 127.5 - 1
        if copies == 2:
            x = torch.stack([x, x.flip(3)], 1).flatten(0, 1)    # image i, its mirror image, image i+1, ...
        mean, std = encode(vae, x)
        m = torch.stack([mean, std], 1).float()
        if not torch.isfinite(m).all() or m.abs().max() > 6e4:
            raise UserError(f"the VAE gave non-finite or float16-overflowing latents at image {done}; check --vae")
        n = len(ok)
        moments[done * copies:(done + n) * copies] = m.cpu().numpy().astype(np.float16)
        moments.flush()
        done += n
        write_json({**meta, "done": done}, paths["meta.json"])   # after the flush: never claims unwritten rows
        pbar.update(n)
    pbar.close()
    print(f"wrote {shape[0]} latents of shape {shape[2:]} to {args.out}")


if __name__ == "__main__":
    run_main(main)
