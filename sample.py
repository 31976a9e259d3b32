"""Turn a checkpoint into images: integrate dx/dt = v(x, t, y) from noise (t = 0) to data (t = 1).

    python sample.py --ckpt runs/cifar10_DiT-S-2_w0.5_s0/checkpoints/step_0400000.pt   # PNG grid
    python sample.py --ckpt ... --num-samples 50000 --out samples.npz                  # for FID
    python sample.py --ckpt ... --solver dopri5                                         # the paper's ODE sampler

The .npz holds arr_0 (N, H, W, C) uint8 and arr_1 (N,) labels, the ADM / DiT convention
that FID tools read, and `protocol` (how they were sampled, as JSON). EMA weights are used unless --raw-weights is given. Checkpoints of the
other objectives bring their own sampler (MeanFlow: 1 jump; DiT's diffusion: DDIM steps).
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

import latents
from model import build_model
from objectives import OBJECTIVES
from rundir import agree_to_stop, load_checkpoint, resolve_checkpoint
from utils import (HelpFormatter, UserError, atomic_output, autocast, first_line, number, output_file, pick_device,
                   run_main)


# ----------------------------------------------------------------------------------------
# ODE solvers. fn(x, t) returns the velocity; t is a python float in [0, 1] (the grids are
# built in float64, so the steps t1 - t0 add up to 1 to double precision; the network is then
# given t in float32).
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


def dopri5(fn, x, steps=None, atol=1e-6, rtol=1e-3):
    """The sampler of the paper's tables (SiT's ODE sampler): adaptive Dormand-Prince 4(5) from
    torchdiffeq, with SiT's default tolerances; `steps` is unused (the solver picks its own).
    step_t makes the last step end exactly at t = 1 instead of stepping past it and
    interpolating back, so the model is never asked about a t outside [0, 1]. The network runs
    in float32 here, as in SiT's sampler, even under generate()'s bf16 autocast: bf16 outputs
    (about 3 significant digits) would leave the error control at rtol 1e-3 chasing rounding."""
    from torchdiffeq import odeint      # optional, like torch-fidelity; sampler() says so if it is missing
    # torchdiffeq's adaptive solvers keep time in float64; we pass that dtype explicitly, and
    # float32 on MPS, which has no float64
    span = torch.tensor([0.0, 1.0], dtype=torch.float32 if x.device.type == "mps" else torch.float64,
                        device=x.device)
    with torch.autocast(x.device.type, enabled=False):
        return odeint(lambda t, x: fn(x, t.item()), x, span, method="dopri5", atol=atol, rtol=rtol,
                      options={"step_t": span[1:], "dtype": span.dtype})[-1]


ODE_SOLVERS = {"euler": euler, "heun": heun, "dopri5": dopri5}
SOLVERS = sorted({*ODE_SOLVERS, *(s for Obj in OBJECTIVES.values() for s in Obj.solvers)})


def sampler(objective, solver=None, steps=None, flags=("--solver", "--steps")):
    """(solver function, name, steps) for a model of the named objective; solver and steps
    default to the objective's own (flow matching: 50 Euler steps; MeanFlow: 1 jump). flags:
    the caller's names for the two, for its error messages."""
    Obj = OBJECTIVES[objective]
    name = solver or Obj.solvers[0]
    if name not in Obj.solvers:
        raise UserError(f"{flags[0]} {name}: {objective} models are sampled with {', '.join(Obj.solvers)}")
    fn = Obj.solver_fns.get(name) or ODE_SOLVERS[name]
    if name == "dopri5":                # adaptive: it chooses its own steps
        if steps is not None:
            raise UserError(f"{flags[1]}: dopri5 chooses its own steps (its tolerances are SiT's)")
        try:                            # now, not at the first grid after hours of training
            import torchdiffeq  # noqa: F401
        except ImportError:
            raise UserError(f"{flags[0]} dopri5 needs torchdiffeq: pip install torchdiffeq") from None
        return fn, name, None
    return fn, name, steps or Obj.sample_steps


class Stopped(Exception):
    """generate() was cut short by a signal (train.py's grids: the checkpoint comes first)."""


def guided(model, y, cfg_scale=1.0, counter=None, stop=None):
    """The model as fn(x, t, **cond) for the solvers (cond: MeanFlow's r), with classifier-free
    guidance: out_null + w * (out_cond - out_null) on every channel (DiT's code guided 3 of 4
    latent channels), the conditional and null halves run as one batch. counter: a dict whose
    "nfe" counts the model's evaluations; stop: train.py's signal flag, checked before each."""
    null, guide = model.num_classes, cfg_scale != 1.0 and model.num_classes > 0

    def fn(x, t, **cond):
        if stop is not None and stop["signal"]:
            raise Stopped
        if counter is not None:
            counter["nfe"] = counter.get("nfe", 0) + 1
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        cond = {k: torch.full_like(tt, v) for k, v in cond.items()}
        if not guide:
            return model(x, tt, y, **cond).float()
        both = lambda a: torch.cat([a, a])
        out = model(both(x), both(tt), torch.cat([y, torch.full_like(y, null)]),
                    **{k: both(v) for k, v in cond.items()}).float()
        out_cond, out_null = out.chunk(2)
        return out_null + cfg_scale * (out_cond - out_null)
    return fn


def noise(model, n, device, generator=None):
    """The starting points x_0 ~ N(0, I) of n samples."""
    return torch.randn((n, model.in_channels, model.image_size, model.image_size), device=device, generator=generator)


@torch.no_grad()
def generate(model, labels, solver, steps, *, cfg_scale=1.0, generator=None, decode=None, counter=None, stop=None):
    """Images for the given labels (B,), as uint8 (B, C, H, W), from noise drawn with generator.
    solver: a function of sampler(). The network runs under bf16 autocast on CUDA (as in
    training; dopri5 opts out, above). A latent model's outputs are turned into images in
    [-1, 1] by decode (its VAE's decoder). stop: raises Stopped once stop["signal"] is set
    (checked before each model evaluation)."""
    x = noise(model, labels.shape[0], labels.device, generator)
    with autocast(labels.device):
        x = solver(guided(model, labels, cfg_scale, counter, stop), x, steps)
    if decode is not None:
        x = decode(x.float())
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def generate_many(model, labels, solver, steps, *, batch_size=256, generator=None, progress=False, stop=None,
                  rank=0, world=1, **kwargs):
    """generate() in batches for any number of labels; kwargs go to generate(). stop: train.py's
    signal flag ({"signal": ...}); once it is raised (on any rank), None is returned before the
    next batch.

    rank, world: this process's share of the batches, every world-th from the rank-th (the
    periodic FID under torchrun). The noise of the other ranks' batches is drawn and dropped, so
    each batch starts from the noise it would have in one process: the shares together are one
    process's images, whatever the number of GPUs. A rank without a batch gets an empty tensor."""
    chunks, device = [], next(model.parameters()).device
    for k, i in enumerate(tqdm(range(0, len(labels), batch_size), desc="sampling", unit="batch", disable=not progress)):
        if stop is not None and agree_to_stop(stop, device):      # every rank at every batch, in step
            return None
        y = labels[i:i + batch_size].to(device)
        if k % world != rank:
            noise(model, len(y), device, generator)               # another rank's batch: its noise, dropped
            continue
        chunks.append(generate(model, y, solver, steps, generator=generator, **kwargs).cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)


def grid_labels(num_classes, n):
    """Labels 0, 1, ..., K-1, 0, 1, ... (unconditional: all null). With K columns per grid
    row, class k fills column k."""
    if num_classes == 0:
        return torch.zeros(n, dtype=torch.long)
    return torch.arange(n) % num_classes


def save_grid(images_uint8, path, nrow):
    """A PNG (or JPEG) grid with 2-pixel borders (torchvision's make_grid), written atomically."""
    # imported here, not at the top: torchvision takes seconds to import, and the scripts that
    # import this file for its sampler (fid.py, ab.py, probe.py, bench.py) save no grids
    from torchvision.utils import save_image
    fmt = "jpeg" if str(path).lower().endswith((".jpg", ".jpeg")) else "png"    # the temporary file's name tells none
    with atomic_output(path) as f:
        save_image(images_uint8.float() / 255, f, nrow=nrow, padding=2, format=fmt)


# ----------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------

def build_from_checkpoint(ckpt, weights="ema"):
    """The model a checkpoint describes, with its EMA (default) or raw weights."""
    cfg = {"objective": "flow", **ckpt["model_config"]}
    if cfg["objective"] not in OBJECTIVES:
        raise UserError(f"the checkpoint's objective {cfg['objective']!r} is not one of this code's: {', '.join(OBJECTIVES)}")
    try:
        model = build_model(cfg["name"], cfg["image_size"], cfg["in_channels"], cfg["num_classes"],
                            cls=OBJECTIVES[cfg["objective"]].model_class)
    except (KeyError, ValueError, TypeError) as e:      # a hand-edited or foreign model_config
        raise UserError(f"the checkpoint's model_config {ckpt['model_config']} describes no model of this code "
                        f"({type(e).__name__}: {first_line(e)})") from None
    if weights not in ckpt:
        raise UserError(f"the checkpoint has no {weights!r} weights")
    try:
        model.load_state_dict(ckpt[weights])
    except RuntimeError as e:       # its second line names the first difference: a missing key, a shape
        detail = [l.strip() for l in str(e).splitlines() if l.strip()][1:2] or [first_line(e)]
        raise UserError(f"checkpoint weights do not fit {cfg['name']}: {detail[0][:300]}") from None
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise UserError(f"the checkpoint's {weights!r} weights are not all finite (train.py never saves such weights)")
    return model


def load_model(ckpt_path, weights="ema", device="cpu", vae=None, need_decoder=True):
    """(checkpoint, model, objective name, decode) from a checkpoint file. decode is None for
    pixel models (and when need_decoder is False); latent models decode with the VAE recorded in
    the checkpoint (or `vae`)."""
    ckpt = load_checkpoint(ckpt_path)
    model = build_from_checkpoint(ckpt, weights).to(device).eval()
    decode = None
    if vae and not ckpt.get("vae"):
        raise UserError(f"--vae {vae!r}: this checkpoint's model works on pixels, not latents; there is nothing to decode")
    if ckpt.get("vae") and need_decoder:
        name = vae or ckpt["vae"]["name"]
        if vae is None and os.path.isabs(name) and not os.path.isdir(name):
            raise UserError(f"the checkpoint's VAE {name!r} is not there any more; pass --vae DIR (where it moved)")
        decode = latents.decoder(name, ckpt["vae"]["scale_factor"], model.in_channels, device)
    return ckpt, model, ckpt["model_config"].get("objective", "flow"), decode


def parse_labels(text, num_classes):
    try:
        labels = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--class-labels {text!r}: expected comma-separated integers") from None
    bad = [k for k in labels if not 0 <= k < num_classes]
    if bad or not labels:
        raise UserError(f"--class-labels {text!r}: labels must lie in [0, {num_classes - 1}]")
    return torch.tensor(labels)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--ckpt", required=True, help="checkpoint written by train.py, or a run directory (its newest checkpoint)")
    a("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    a("--solver", default=None, choices=SOLVERS, help="default: the checkpoint's objective's (flow matching: "
      "euler; dopri5 is SiT's adaptive solver, the paper's; meanflow and ddim for those objectives)")
    a("--steps", type=number(int, min=1), default=None, help="solver steps (default: 50; MeanFlow: 1). Heun costs "
      "two evaluations per step; dopri5 chooses its own")
    a("--cfg-scale", type=number(float), default=1.0, help="classifier-free guidance scale w (1 = none)")
    a("--seed", type=number(int, min=0, max=2**63 - 1), default=0, help="seed for the initial noise")
    a("--class-labels", default=None, help="comma-separated labels for the grid, e.g. 0,1,2 (default: all classes in turn)")
    a("--num-samples", type=number(int, min=1), default=None, help="number of images (default: 8 rows of the grid; "
      "with --class-labels, 8 of each label for a grid, one of each for an .npz)")
    a("--batch-size", type=number(int, min=1), default=256, help="images per forward pass")
    a("--nrow", type=number(int, min=1), default=None, help="images per grid row (default: the classes, or the --class-labels given, at most 16; 8 unconditional)")
    a("--out", default="samples.png", help=".png, .jpg or .jpeg for a grid, .npz for arr_0 uint8 NHWC + arr_1 labels")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    a("--vae", default=None, help="latent checkpoints: the VAE that decodes them (default: the one recorded in the "
      "checkpoint); a local directory works offline")
    args = p.parse_args(argv)

    output_file(args.out, "--out", (".png", ".jpg", ".jpeg", ".npz"))
    args.ckpt = resolve_checkpoint(args.ckpt)
    device = pick_device(args.device)
    ckpt, model, objective, decode = load_model(args.ckpt, "model" if args.raw_weights else "ema", device, args.vae)
    solver, args.solver, args.steps = sampler(objective, args.solver, args.steps)
    note = OBJECTIVES[objective].sampling_note(ckpt.get("args", {}), args.cfg_scale)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    K = model.num_classes
    if not K and (args.class_labels is not None or args.cfg_scale != 1):
        raise UserError(f"{'--class-labels' if args.class_labels is not None else '--cfg-scale'}: this checkpoint's "
                        f"model is unconditional (trained with --unconditional): it takes no labels, so no guidance")
    nrow = args.nrow or (min(K, 16) if K else 8)
    if args.class_labels is not None:
        base = parse_labels(args.class_labels, K)
        n = args.num_samples or len(base) * (8 if not args.out.endswith(".npz") else 1)
        labels = base.repeat(math.ceil(n / len(base)))[:n]
        nrow = args.nrow or min(len(base), 16)
    else:
        n = args.num_samples or nrow * 8
        labels = grid_labels(K, n)          # for an .npz the classes are spread evenly, as FID protocols expect

    g = torch.Generator(device).manual_seed(args.seed)
    counter = {}
    images = generate_many(model, labels, solver, args.steps, batch_size=args.batch_size, generator=g, progress=True,
                           cfg_scale=args.cfg_scale, decode=decode, counter=counter)
    batches = math.ceil(n / args.batch_size)
    print(f"{args.solver}: {counter['nfe'] / batches:.0f} network evaluations per batch"
          + (" (with guidance, each runs the conditional and the null half as one batch of twice the size)"
             if args.cfg_scale != 1 and K else ""))

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.out.endswith(".npz"):
        # 'protocol' (a JSON string) lets fid.py record how the samples were made.
        protocol = {"checkpoint": os.path.abspath(args.ckpt), "step": ckpt.get("step"), "solver": args.solver,
                    "steps": args.steps, "cfg_scale": args.cfg_scale, "ema": not args.raw_weights, "seed": args.seed,
                    "nfe_per_batch": counter["nfe"] / batches}
        with atomic_output(args.out, f"--out {args.out!r}") as f:
            np.savez(f, arr_0=images.permute(0, 2, 3, 1).numpy(), arr_1=labels.numpy(),
                     protocol=np.array(json.dumps(protocol)))
    else:
        save_grid(images, args.out, nrow)
    print(f"wrote {n} images to {args.out}")


if __name__ == "__main__":
    run_main(main)
