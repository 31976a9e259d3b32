"""Turn a checkpoint into images: integrate dx/dt = v(x, t, y) from noise (t = 0) to data (t = 1).

    python sample.py --ckpt runs/cifar/checkpoints/step_0400000.pt              # PNG grid
    python sample.py --ckpt ... --num-samples 50000 --out samples.npz           # for FID
    python sample.py --ckpt runs/<a MeanFlow run>/checkpoints/... --steps 1     # one evaluation

A MeanFlow checkpoint (train.py --objective meanflow) predicts the average velocity u over a
jump from t to r, so x_r = x_t + (r - t) u(x_t, t, r) is exact, not an approximation: one
step (the default for such checkpoints) goes from noise to an image.

The .npz holds arr_0 (N, H, W, C) uint8 and arr_1 (N,) labels, the ADM / DiT convention
that FID tools read. EMA weights are used unless --raw-weights is given.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from utils import UserError, autocast, build_from_checkpoint, load_checkpoint, pick_device, run_main


# ----------------------------------------------------------------------------------------
# ODE solvers. fn(x, t) returns the velocity; t is a python float in [0, 1]. The time grid
# is float64 so that 1000 small steps still add up to exactly t = 1.
# ----------------------------------------------------------------------------------------

def euler(fn, x, steps):
    ts = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).tolist()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        x = x + (t1 - t0) * fn(x, t0)
    return x


def heun(fn, x, steps):
    """Second order: an Euler predictor, then the average of the slopes at both ends."""
    ts = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).tolist()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        v0 = fn(x, t0)
        x_pred = x + (t1 - t0) * v0
        x = x + (t1 - t0) * 0.5 * (v0 + fn(x_pred, t1))
    return x


def meanflow_jumps(fn, x, steps):
    """MeanFlow models: jump along the grid with the average velocity, fn(x, t, r) = u(x, t, r).
    Each jump is exact for a perfect model, so 1 step suffices; more steps may correct errors."""
    ts = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).tolist()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        x = x + (t1 - t0) * fn(x, t0, t1)
    return x


SOLVERS = {"euler": euler, "heun": heun, "meanflow": meanflow_jumps}


def sampler_for(model, solver=None, steps=None):
    """(solver, steps), each defaulting to the model's: one MeanFlow jump, or 50 Euler steps."""
    default = ("meanflow", 1) if getattr(model, "mean_flow", False) else ("euler", 50)
    return (default[0] if solver is None else solver), (default[1] if steps is None else steps)


def velocity_fn(model, y, cfg_scale=1.0):
    """The velocity field to integrate, fn(x, t) or, for MeanFlow models, fn(x, t, r) (the
    average velocity from t to r). With guidance (cfg_scale != 1 and a class-conditional
    model) it is v_null + w * (v_cond - v_null) on every channel, the conditional and null
    halves run as one batch. (MeanFlow models are usually guided in training instead:
    train.py --mf-cfg-omega.)"""
    null = model.num_classes
    guided = cfg_scale != 1.0 and model.num_classes > 0

    def fn(x, t, r=None):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        # r only goes to MeanFlow models: any model(x, t, y) can be sampled with Euler / Heun
        jump = {} if r is None else {"r": torch.full_like(tt, r)}
        if not guided:
            return model(x, tt, y, **jump).float()
        jump = {k: torch.cat([a, a]) for k, a in jump.items()}
        v = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, null)]), **jump).float()
        v_cond, v_null = v.chunk(2)
        return v_null + cfg_scale * (v_cond - v_null)
    return fn


@torch.no_grad()
def generate(model, labels, *, steps=None, solver=None, cfg_scale=1.0, generator=None, decode=None):
    """Images for the given labels (B,), as uint8 (B, C, H, W). Noise comes from generator.
    A latent model's outputs are turned into images in [-1, 1] by decode (its VAE's decoder).
    solver and steps default to the model's (sampler_for)."""
    solver, steps = sampler_for(model, solver, steps)
    if solver == "meanflow" and not getattr(model, "mean_flow", False):
        raise UserError("the meanflow solver needs a MeanFlow model (train.py --objective meanflow); "
                        "use euler or heun")
    device = labels.device
    shape = (labels.shape[0], model.in_channels, model.image_size, model.image_size)
    x = torch.randn(shape, device=device, generator=generator)
    with autocast(device):
        x = SOLVERS[solver](velocity_fn(model, labels, cfg_scale), x, steps)
    if decode is not None:
        x = decode(x.float())
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def generate_many(model, labels, *, batch_size=256, generator=None, progress=False, **kwargs):
    """generate() in batches for any number of labels; kwargs go to generate()."""
    chunks, device = [], next(model.parameters()).device
    for i in tqdm(range(0, len(labels), batch_size), desc="sampling", unit="batch", disable=not progress):
        y = labels[i:i + batch_size].to(device)
        chunks.append(generate(model, y, generator=generator, **kwargs).cpu())
    return torch.cat(chunks)


def load_for_sampling(ckpt_path, weights="ema", device="cpu", vae=None):
    """(checkpoint, model, decode) from a checkpoint file. decode is None for pixel models; for
    latent models it decodes with the VAE recorded in the checkpoint (or the `vae` given)."""
    ckpt = load_checkpoint(ckpt_path)
    model = build_from_checkpoint(ckpt, weights).to(device).eval()
    decode = None
    if ckpt.get("vae"):
        from encode_latents import decode as vae_decode, load_vae
        vae_model = load_vae(vae or ckpt["vae"]["name"], device)
        if vae_model.config.latent_channels != model.in_channels:
            raise UserError(f"the VAE has {vae_model.config.latent_channels} latent channels, the model {model.in_channels}")
        decode = lambda z: vae_decode(vae_model, z, ckpt["vae"]["scale_factor"])
    return ckpt, model, decode


def grid_labels(num_classes, n):
    """Labels 0, 1, ..., K-1, 0, 1, ... (unconditional: all null). With K columns per grid
    row, class k fills column k."""
    if num_classes == 0:
        return torch.zeros(n, dtype=torch.long)
    return torch.arange(n) % num_classes


def save_grid(images_uint8, path, nrow):
    from PIL import Image
    B, C, H, W = images_uint8.shape
    rows = math.ceil(B / nrow)
    canvas = torch.zeros(C, rows * (H + 2) + 2, nrow * (W + 2) + 2, dtype=torch.uint8)
    for i, img in enumerate(images_uint8.cpu()):
        r, c = divmod(i, nrow)
        canvas[:, 2 + r * (H + 2): 2 + r * (H + 2) + H, 2 + c * (W + 2): 2 + c * (W + 2) + W] = img
    arr = canvas.permute(1, 2, 0).numpy()
    Image.fromarray(arr[:, :, 0] if C == 1 else arr[:, :, :3]).save(path)


def parse_labels(text, num_classes):
    try:
        labels = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--class-labels {text!r}: expected comma-separated integers") from None
    bad = [k for k in labels if not 0 <= k < max(num_classes, 1)]
    if bad or not labels:
        raise UserError(f"--class-labels {text!r}: labels must lie in [0, {num_classes - 1}]")
    return torch.tensor(labels)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--solver", default=None, choices=list(SOLVERS),
                   help="ODE solver (default: euler; meanflow for MeanFlow checkpoints, whose instantaneous "
                   "velocity euler and heun can integrate too)")
    p.add_argument("--steps", type=int, default=None,
                   help="solver steps (default: 50; 1 for MeanFlow checkpoints). Heun costs two evaluations per step")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale w (1 = none)")
    p.add_argument("--seed", type=int, default=0, help="seed for the initial noise")
    p.add_argument("--class-labels", default=None, help="comma-separated labels for the grid, e.g. 0,1,2 (default: all classes in turn)")
    p.add_argument("--num-samples", type=int, default=None, help="number of images (default: 8 rows of the grid; 50000 for FID)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: number of classes, at most 16)")
    p.add_argument("--out", default="samples.png", help=".png for a grid, .npz for arr_0 uint8 NHWC + arr_1 labels")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--vae", default=None, help="latent checkpoints: the VAE that decodes them (default: the one recorded "
                   "in the checkpoint); a local directory works offline")
    args = p.parse_args()
    for name in ("steps", "batch_size", "num_samples", "nrow"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if not math.isfinite(args.cfg_scale):
        raise UserError("--cfg-scale must be finite")

    device = pick_device(args.device)
    ckpt, model, decode = load_for_sampling(args.ckpt, "model" if args.raw_weights else "ema", device, args.vae)
    args.solver, args.steps = sampler_for(model, args.solver, args.steps)
    if args.cfg_scale != 1 and ckpt.get("args", {}).get("mf_cfg_omega", 1.0) != 1.0:
        print(f"warning: this MeanFlow model learnt guidance in training (omega {ckpt['args']['mf_cfg_omega']}); "
              f"--cfg-scale {args.cfg_scale} guides it a second time", file=sys.stderr)
    K = model.num_classes
    nrow = args.nrow or (min(K, 16) if K else 8)

    if args.class_labels is not None and K > 0:
        base = parse_labels(args.class_labels, K)
        n = args.num_samples or len(base) * (8 if not args.out.endswith(".npz") else 1)
        labels = base.repeat(math.ceil(n / len(base)))[:n]
        nrow = args.nrow or min(len(base), 16)
    else:
        n = args.num_samples or nrow * 8
        # For an .npz the classes are spread evenly, as FID protocols expect.
        labels = grid_labels(K, n)

    g = torch.Generator(device).manual_seed(args.seed)
    images = generate_many(model, labels, batch_size=args.batch_size, generator=g, progress=True, steps=args.steps,
                           solver=args.solver, cfg_scale=args.cfg_scale, decode=decode)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.out.endswith(".npz"):
        # 'protocol' (a JSON string) lets fid.py record how the samples were made.
        protocol = {"checkpoint": os.path.abspath(args.ckpt), "step": ckpt.get("step"), "solver": args.solver,
                    "steps": args.steps, "cfg_scale": args.cfg_scale, "ema": not args.raw_weights, "seed": args.seed}
        np.savez(args.out, arr_0=images.permute(0, 2, 3, 1).numpy(), arr_1=labels.numpy(),
                 protocol=np.array(json.dumps(protocol)))
    else:
        save_grid(images, args.out, nrow)
    print(f"wrote {n} images to {args.out}")


if __name__ == "__main__":
    run_main(main)
