"""Train a DiT with flow matching, plus the dispersive loss on one block's hidden states.

    python train.py --disp-weight 0.5                  # CIFAR-10, DiT-S/2, dispersive
    python train.py --disp-weight 0                    # the baseline
    python train.py --objective meanflow               # one-step generation (MeanFlow)
    torchrun --nproc_per_node 8 train.py ...           # several GPUs (DDP)

Everything a run writes goes to --out: metrics.jsonl (the configuration, versions and
device first, then one line per log step), samples/ (grids of EMA samples) and
checkpoints/ (plain-dict checkpoints, written atomically). Re-run the same command with
--resume to continue a run exactly where it stopped.
"""
import argparse
import copy
import glob
import math
import os
import platform
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import DATASETS, BatchStream, load_dataset
from loss import VARIANTS, meanflow_losses, meanflow_target, meanflow_times, representation_diagnostics, training_losses
from model import MODELS, build_model
from sample import generate, grid_labels, save_grid
from utils import (Logger, UserError, autocast, find_resume_checkpoint, list_checkpoints, pick_device, run_main,
                   save_atomic, stop_on_signals)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    # the method (paper defaults: lambda = 0.5, tau = 0.5, block depth // 4, InfoNCE-L2)
    a("--disp-weight", type=float, default=0.5, help="lambda, weight of the dispersive loss; 0 trains the baseline")
    a("--disp-tau", type=float, default=0.5, help="temperature tau of the dispersive loss")
    a("--disp-block", default=None, help="block(s) to regularise, counted from 1: N, N,M,..., 'last' or 'all' "
      "(default: depth // 4, the paper's choice; the released PyTorch code used 'last')")
    a("--disp-variant", default="infonce_l2", choices=VARIANTS, help="form of the dispersive loss")
    # the generative objective
    a("--objective", default="flow", choices=("flow", "meanflow"),
      help="flow matching (sampled in ~50 steps) or MeanFlow (average velocities, sampled in 1 step; loss.py)")
    a("--mf-ratio", type=float, default=0.25, help="MeanFlow: share of samples with r != t (the others train plain "
      "flow matching); the paper's 25%%")
    a("--mf-logit-mean", type=float, default=0.4, help="MeanFlow: mean of the logit-normal time draws, in this "
      "project's convention; the paper's lognorm(-0.4, 1.0) uses t = 1 for noise, hence +0.4 here")
    a("--mf-logit-std", type=float, default=1.0, help="MeanFlow: std of the logit-normal time draws")
    a("--mf-adaptive-p", type=float, default=1.0, help="MeanFlow: power p of the adaptive loss weight "
      "1 / (||u - u_tgt||^2 + c)^p; 0 is the plain squared error")
    a("--mf-adaptive-c", type=float, default=0.01, help="MeanFlow: c of the adaptive loss weight")
    a("--mf-cfg-omega", type=float, default=1.0, help="MeanFlow: guidance scale omega learnt in training (1: none; "
      "the paper's ablation liked 3 with kappa 0); 1-step samples then come guided at no extra cost")
    a("--mf-cfg-kappa", type=float, default=0.0, help="MeanFlow: kappa, the share of the conditional prediction "
      "mixed into the guided velocity (the effective scale is omega / (1 - kappa))")
    a("--mf-jvp-precision", default="fp32", choices=("fp32", "autocast"), help="MeanFlow: run the target's "
      "Jacobian-vector product in float32 (as the released code does) or in the bf16 autocast of the step")
    # model and data
    a("--model", default="DiT-S/2", choices=list(MODELS), metavar="MODEL", help=f"model size: {', '.join(MODELS)}")
    a("--data", default="cifar10", choices=DATASETS, help="data set; 'folder' reads any ImageFolder-layout directory")
    a("--data-path", default="data", help="where the data set is (or is downloaded to)")
    a("--image-size", type=int, default=None, help="resize and centre-crop folder images to this size (default: keep)")
    a("--unconditional", action="store_true", help="ignore the labels (no guidance possible)")
    a("--p-uncond", type=float, default=0.1, help="share of labels dropped to the null class, for guidance")
    # optimisation
    a("--batch-size", type=int, default=128, help="global batch size, split across GPUs")
    a("--steps", type=int, default=400_000, help="total training steps")
    a("--lr", type=float, default=1e-4, help="AdamW learning rate (constant after the warmup)")
    a("--warmup-steps", type=int, default=1000, help="linear learning-rate warmup")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    a("--ema-decay", type=float, default=0.9999, help="EMA decay (ramped up from 0.1 as (1+s)/(10+s) early on)")
    a("--seed", type=int, default=0, help="seed for the weights, data order and noise")
    # run
    a("--out", default=None, help="run directory (default: runs/<data>_<model>[_meanflow]_w<disp-weight>_s<seed>)")
    a("--resume", nargs="?", const="", default=None, metavar="PATH",
      help="continue a run: a checkpoint file, a run directory, or nothing for --out's newest checkpoint")
    a("--compile", action="store_true", help="torch.compile the model (GPU: faster after a minute of compiling)")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    a("--log-every", type=int, default=50, help="steps between log lines (the only host-device syncs)")
    a("--sample-every", type=int, default=5000, help="steps between grids of EMA samples (0: never)")
    a("--sample-steps", type=int, default=None, help="sampling steps for those grids (default: 50 Euler steps; MeanFlow: 1 jump)")
    a("--sample-cfg", type=float, default=1.0, help="guidance scale for those grids")
    a("--ckpt-every", type=int, default=10_000, help="steps between checkpoints (one is always written at the end)")
    a("--keep-ckpts", type=int, default=3, help="how many recent checkpoints to keep (0: all)")
    # periodic FID of the EMA model (fid.py; needs torch-fidelity and the Inception weights)
    a("--fid-every", type=int, default=0, help="steps between FID evaluations, logged as type=fid (0: never)")
    a("--fid-samples", type=int, default=10_000, help="samples per periodic FID (FID-10K; the final number wants fid.py's 50K)")
    a("--fid-ref-stats", default=None, help="reference statistics .npz (mu, sigma) for it (default: the training set's)")
    a("--fid-extractor", default="inception-v3-compat", help="feature extractor: torch-fidelity's Inception, or a "
      "classifier .pt from fid.py --train-classifier (offline; not FID)")
    a("--inception-weights", default=None, help="local Inception weights file for the periodic FID (offline clusters)")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    for name in ("disp_weight", "lr", "weight_decay", "grad_clip", "p_uncond"):
        v = getattr(args, name)
        if not math.isfinite(v) or v < 0:
            raise UserError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    if not math.isfinite(args.disp_tau) or args.disp_tau <= 0:
        raise UserError(f"--disp-tau must be a finite number > 0, got {args.disp_tau}")
    if not 0 <= args.ema_decay < 1:
        raise UserError(f"--ema-decay must lie in [0, 1), got {args.ema_decay}")
    if args.fid_every < 0 or (args.fid_every and args.fid_samples < 2):
        raise UserError("--fid-every must be >= 0 and --fid-samples at least 2")
    for name in ("batch_size", "steps", "log_every", "sample_steps", "ckpt_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("warmup_steps", "sample_every", "keep_ckpts"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.p_uncond > 1 or not math.isfinite(args.sample_cfg):
        raise UserError("--p-uncond must lie in [0, 1] and --sample-cfg must be finite")
    if not 0 <= args.mf_ratio <= 1 or not args.mf_logit_std > 0 or not math.isfinite(args.mf_logit_mean):
        raise UserError("--mf-ratio must lie in [0, 1], --mf-logit-std must be > 0 and --mf-logit-mean finite")
    if not (math.isfinite(args.mf_adaptive_p) and args.mf_adaptive_p >= 0 and args.mf_adaptive_c > 0):
        raise UserError("--mf-adaptive-p must be a finite number >= 0 and --mf-adaptive-c a number > 0")
    if not (math.isfinite(args.mf_cfg_omega) and math.isfinite(args.mf_cfg_kappa) and 0 <= args.mf_cfg_kappa < 1):
        raise UserError("--mf-cfg-omega must be finite and --mf-cfg-kappa lie in [0, 1)")
    if (args.mf_cfg_omega != 1 or args.mf_cfg_kappa != 0) and (args.objective != "meanflow" or args.unconditional
                                                               or args.p_uncond == 0):
        raise UserError("--mf-cfg-omega / --mf-cfg-kappa need --objective meanflow, class labels and --p-uncond > 0 "
                        "(the null class must be trained; flow matching takes its guidance at sampling time: "
                        "--sample-cfg)")
    if args.image_size is not None and (args.image_size < 1 or args.data not in ("folder", "latents")):
        raise UserError(f"--image-size {args.image_size}: only --data folder (and latents) take it, and it must be >= 1")
    if args.out is None and args.resume:      # --resume RUN_DIR (or RUN_DIR/checkpoints/x.pt) continues that run
        path = os.path.normpath(args.resume)
        if not os.path.isfile(path):
            args.out = path
        elif os.path.basename(os.path.dirname(path)) == "checkpoints":
            args.out = os.path.dirname(os.path.dirname(path))
        else:
            raise UserError(f"--resume {args.resume!r} is a checkpoint outside a run directory; say where the run "
                            f"continues with --out")
    if args.out is None:
        kind = "_meanflow" if args.objective == "meanflow" else ""
        args.out = os.path.join("runs", f"{args.data}_{args.model.replace('/', '-')}{kind}_w{args.disp_weight:g}_s{args.seed}")


def parse_blocks(spec, depth):
    """--disp-block -> a tuple of block numbers in [1, depth]."""
    if spec is None:
        return (max(1, depth // 4),)
    if spec == "last":
        return (depth,)
    if spec == "all":
        return tuple(range(1, depth + 1))
    try:
        blocks = tuple(sorted({int(s) for s in spec.split(",")}))
    except ValueError:
        raise UserError(f"--disp-block {spec!r}: expected N, N,M,..., 'last' or 'all'") from None
    if not all(1 <= b <= depth for b in blocks):
        raise UserError(f"--disp-block {spec!r} is out of range: this model has blocks 1..{depth}")
    return blocks


def step_randomness(gen, seed, step, shape, p_uncond, mine=slice(None)):
    """Flip mask, noise, times and label-drop mask of one step. All randomness of a step comes
    from (seed, step) and is drawn for the whole global batch (shape[0] samples), each rank
    taking its slice `mine`: 1 or 8 GPUs see the same samples and noise (the dispersive term,
    computed per GPU, is the only difference), and resume is exact. The odd multiplier keeps
    the seeds of (seed, step) and (seed + 1, step') apart."""
    gen.manual_seed(seed * 1_000_003 + step)
    B, device = shape[0], gen.device
    flip = (torch.rand(B, device=device, generator=gen) < 0.5)[mine]
    eps = torch.randn(shape, device=device, generator=gen)[mine]
    t = torch.rand(B, device=device, generator=gen)[mine]
    drop = (torch.rand(B, device=device, generator=gen) < p_uncond)[mine]
    return flip, eps, t, drop


def update(model, ema, opt, loss, grad_clip, ema_decay):
    """Backward, gradient clipping, the AdamW step, then the EMA of the weights."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    with torch.no_grad():   # ema = decay * ema + (1 - decay) * w, all tensors in one kernel
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - ema_decay)


NEVER = 2 ** 62


def check_finite(first_bad):
    """first_bad: the first step at which (flow, dispersive) was non-finite, NEVER if never."""
    steps = first_bad.tolist()
    if min(steps) < NEVER:
        names = [f"{name} (step {s})" for name, s in zip(("flow", "dispersive"), steps) if s < NEVER]
        raise UserError(f"the loss became non-finite: {', '.join(names)}; stopping without saving "
                        f"(the checkpoints on disk are from before)")


def main(argv=None):
    args = get_args(argv)

    # --- processes and device ------------------------------------------------------------
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if ddp:
        rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
        if ":" in args.device:
            raise UserError(f"--device {args.device}: under torchrun each process takes the GPU of its LOCAL_RANK")
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() and args.device in ("auto", "cuda") else pick_device(args.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    else:
        rank, world, device = 0, 1, pick_device(args.device)
    main_proc = rank == 0
    if args.disp_weight > 0 and args.batch_size // world == 1 and main_proc:
        print("warning: with 1 sample per process the dispersive loss is constant (0) and does nothing", file=sys.stderr)
    torch.backends.cuda.matmul.allow_tf32 = True   # fp32 matmuls outside autocast use TF32
    torch.backends.cudnn.allow_tf32 = True

    # --- run directory -------------------------------------------------------------------
    resume_path, ckpt = None, None
    if args.resume is not None:
        resume_path, ckpt = find_resume_checkpoint(args.resume or args.out)
    elif list_checkpoints(args.out):
        raise UserError(f"run directory {args.out!r} already has checkpoints; add --resume to continue it, "
                        f"or choose another --out")
    if main_proc:
        try:
            os.makedirs(os.path.join(args.out, "checkpoints"), exist_ok=True)
            os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
            probe = os.path.join(args.out, ".write_test")
            open(probe, "w").close()
            os.remove(probe)
        except OSError as e:
            raise UserError(f"cannot write to --out {args.out!r}: {e.strerror}") from None
        for tmp in glob.glob(os.path.join(args.out, "checkpoints", "*.tmp*")):
            os.remove(tmp)                          # half-written by a process that was killed
        log_path = os.path.join(args.out, "metrics.jsonl")
        if ckpt is None and os.path.exists(log_path):   # a fresh start never appends to an old log
            os.replace(log_path, os.path.join(args.out, f"metrics.{int(time.time())}.jsonl"))

    # --- data: small sets live whole on the training device -----------------------------
    if ddp and not main_proc:
        dist.barrier()                              # let rank 0 download first
    data = load_dataset(args.data, args.data_path, args.image_size).to(device)
    if ddp and main_proc:
        dist.barrier()
    N, (C, H, W) = len(data), data.shape
    if H != W:
        raise UserError(f"images are {H}x{W}; the model needs square images (use --image-size)")
    num_classes = 0 if args.unconditional else data.num_classes
    mf = args.objective == "meanflow"
    if num_classes == 0 and (args.mf_cfg_omega != 1 or args.mf_cfg_kappa != 0):
        raise UserError("--mf-cfg-omega / --mf-cfg-kappa need class labels; this data set has none")
    # Grids of a latent model are decoded by the set's VAE, loaded now: a VAE that cannot be
    # loaded stops the run here, not at the first grid hours later.
    decode = data.decoder(device) if main_proc and args.sample_every and hasattr(data, "decoder") else None
    if args.fid_every and not hasattr(data, "images"):
        raise UserError("--fid-every needs the training images as its reference; for latents, run fid.py on "
                        "sample.py's .npz with --ref-stats (see the README's ImageNet section)")

    fid_eval = None
    if main_proc and args.fid_every:   # extractor and reference statistics now: a missing file fails here, not hours in
        import fid                     # (torch-fidelity is only needed when asked for)
        fid_eval = fid.TrainingFID(args.fid_extractor, args.inception_weights, args.fid_ref_stats, data.images, device)

    # --- model, EMA, optimiser -----------------------------------------------------------
    torch.manual_seed(args.seed)
    try:
        model = build_model(args.model, H, C, num_classes, mean_flow=mf).to(device)
    except ValueError as e:
        fix = "encode the latents at another size" if args.data == "latents" else "use --image-size"
        raise UserError(f"{e} (model {args.model}, data {C}x{H}x{W}); {fix} or choose another --model") from None
    disp_blocks = parse_blocks(args.disp_block, model.depth)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    model_config = {"name": args.model, "image_size": H, "in_channels": C, "num_classes": num_classes,
                    "objective": args.objective}
    start_step = 0
    if ckpt is not None:
        ckpt_config = {"objective": "flow", **ckpt["model_config"]}   # checkpoints from before MeanFlow
        for k, v in model_config.items():
            if ckpt_config.get(k) != v:
                raise UserError(f"checkpoint {resume_path!r} does not match this run: its {k} is "
                                f"{ckpt_config.get(k)!r}, this run's is {v!r}")
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])       # after the optimiser exists (the released code did it before)
        start_step = ckpt["step"]
        newer = [p for p in list_checkpoints(args.out) if int(os.path.basename(p)[5:-3]) > start_step]
        if newer and os.path.isfile(args.resume):
            # Continuing from an older file would interleave two histories in one directory
            # (and the newest-first pruning could delete what this run writes).
            raise UserError(f"{args.out!r} has checkpoints newer than {resume_path!r} ({newer[0]}); move them "
                            f"away to restart from the older one, or choose another --out")
        torch.set_rng_state(ckpt["rng"]["torch"])
        if main_proc:
            print(f"resumed from {resume_path} at step {start_step}")
            changed = [k for k in ("seed", "batch_size", "lr", "disp_weight", "disp_tau", "disp_block", "disp_variant",
                                   "p_uncond", "ema_decay", "data", "mf_ratio", "mf_logit_mean", "mf_logit_std",
                                   "mf_adaptive_p", "mf_adaptive_c", "mf_cfg_omega", "mf_cfg_kappa", "mf_jvp_precision")
                       if k in ckpt["args"] and ckpt["args"][k] != getattr(args, k)]   # older checkpoints lack mf_*
            if changed:
                print(f"warning: resuming with changed {', '.join('--' + k.replace('_', '-') for k in changed)}: "
                      f"the run will not match an uninterrupted one", file=sys.stderr)
            if start_step >= args.steps:
                print(f"nothing to do: the checkpoint is at step {start_step} and --steps is {args.steps}")
    n_params = sum(p.numel() for p in model.parameters())
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model
    if args.compile:
        net = torch.compile(net)
    # MeanFlow's target (a JVP, no gradient) goes through the bare model: torch.func.jvp cannot
    # go through DDP, and the target needs no gradient sync. Compiled as a whole function.
    target_fn = torch.compile(meanflow_target) if args.compile and mf else meanflow_target

    log = Logger(os.path.join(args.out, "metrics.jsonl"), main_proc, keep_until_step=start_step if ckpt else None)
    log(type="config", step=start_step, args=vars(args), model_config=model_config, params=n_params,
        disp_blocks=list(disp_blocks), world_size=world, resumed_from=resume_path, vae=getattr(data, "vae", None),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} ({platform.processor() or platform.machine()})",
        versions={"torch": str(torch.__version__), "python": platform.python_version(), "cuda": torch.version.cuda})

    def save_checkpoint(step):
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise UserError(f"weights are not finite at step {step}; not saving (earlier checkpoints are intact)")
        if main_proc:
            state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                     "args": vars(args), "model_config": model_config, "classes": data.classes,
                     "vae": getattr(data, "vae", None),      # latent sets: the VAE that decodes samples
                     "rng": {"torch": torch.get_rng_state()}, "versions": {"torch": str(torch.__version__)}}
            path = os.path.join(args.out, "checkpoints", f"step_{step:07d}.pt")
            save_atomic(state, path)
            for old in list_checkpoints(args.out)[args.keep_ckpts:] if args.keep_ckpts else []:
                os.remove(old)
            return path

    # --- the loop ------------------------------------------------------------------------
    with stop_on_signals() as stop, \
            tqdm(total=args.steps, initial=start_step, disable=not main_proc, dynamic_ncols=True) as pbar:
        stream = BatchStream(N, args.batch_size, args.seed, rank, world, data.index_device)
        local = args.batch_size // world
        mine = slice(rank * local, (rank + 1) * local)
        gen = torch.Generator(device)
        first_bad = torch.full((2,), NEVER, device=device)   # first step each term was non-finite
        t_last, step_last = time.perf_counter(), start_step
        net.train()
        for step in range(start_step, args.steps):
            lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps))
            for group in opt.param_groups:
                group["lr"] = lr
            idx = stream.indices(step)               # already where the data set is: no copy, no sync
            flip, eps, t, drop = step_randomness(gen, args.seed, step, (args.batch_size, C, H, W), args.p_uncond, mine)
            if mf:   # MeanFlow draws its own (t, r), also for the whole global batch
                t, r = (z[mine] for z in meanflow_times(args.batch_size, gen, device, args.mf_logit_mean,
                                                        args.mf_logit_std, args.mf_ratio))
            # Latent sets draw their posterior noise from gen too, after the draws above (image
            # sets draw nothing, so their numbers do not depend on this order).
            x, y = data.batch(idx, generator=gen)
            if num_classes == 0:
                y = torch.zeros_like(y)
            if data.flip:
                x = torch.where(flip[:, None, None, None], x.flip(3), x)

            log_now = (step + 1) % args.log_every == 0 or step + 1 == args.steps
            common = dict(disp_weight=args.disp_weight, disp_tau=args.disp_tau, disp_blocks=disp_blocks,
                          disp_variant=args.disp_variant, null_label=num_classes if num_classes else None,
                          p_uncond=args.p_uncond, eps=eps, t=t, drop=drop, return_feats=log_now)
            with autocast(device):
                if mf:
                    losses = meanflow_losses(net, x, y, r=r, adaptive_p=args.mf_adaptive_p,
                                             adaptive_c=args.mf_adaptive_c, cfg_omega=args.mf_cfg_omega,
                                             cfg_kappa=args.mf_cfg_kappa, target_model=model, target_fn=target_fn,
                                             jvp_fp32=args.mf_jvp_precision == "fp32", **common)
                else:
                    losses = training_losses(net, x, y, **common)
            update(model, ema, opt, losses["total"], args.grad_clip, min(args.ema_decay, (1 + step) / (10 + step)))
            bad = ~torch.isfinite(torch.stack([losses["flow"].detach(), losses["disp"].detach()]))
            first_bad = torch.where(bad, torch.clamp(first_bad, max=step + 1), first_bad)   # no sync
            done = step + 1

            if log_now:
                diag = representation_diagnostics(losses["feats"], args.disp_variant, args.disp_tau)
                vals = torch.cat([torch.stack([losses["flow"], losses["disp"], losses["total"]]).detach().float(), diag])
                if ddp:
                    dist.all_reduce(vals)
                    vals /= world
                    dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
                flow, disp, total, disp_diag, dist_diag = vals.tolist()
                check_finite(first_bad)
                now = time.perf_counter()
                ips = (done - step_last) * args.batch_size / (now - t_last)
                t_last, step_last = now, done
                log(type="train", step=done, flow=flow, disp=disp, total=total, lr=lr, img_per_s=ips,
                    disp_diag=disp_diag, mean_sq_dist=dist_diag)
                pbar.set_postfix(flow=f"{flow:.4f}", disp=f"{disp:.4f}", img_s=f"{ips:.0f}")
            pbar.update(1)

            if main_proc and args.sample_every and done % args.sample_every == 0:
                ema.eval()
                g = torch.Generator(device).manual_seed(args.seed)
                n = (min(num_classes, 16) if num_classes else 8) * 8
                imgs = generate(ema, grid_labels(num_classes, n).to(device), steps=args.sample_steps,
                                cfg_scale=args.sample_cfg, generator=g, decode=decode)
                save_grid(imgs, os.path.join(args.out, "samples", f"step_{done:07d}.png"), n // 8)
            if fid_eval is not None and done % args.fid_every == 0:
                ema.eval()
                log(type="fid", step=done, **fid_eval(ema, args.fid_samples, args.sample_steps, args.sample_cfg, args.seed))
            if ddp and done % args.log_every == 0:   # agree on a stop signal at log steps
                flag = torch.tensor([stop["signal"] is not None], device=device, dtype=torch.int)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                if flag.item() and stop["signal"] is None:
                    stop["signal"] = "a signal on another rank"
            stopping = stop["signal"] is not None and (not ddp or done % args.log_every == 0)
            if done % args.ckpt_every == 0 or done == args.steps or stopping:
                if ddp:                    # every rank must agree before saving
                    dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
                check_finite(first_bad)
                path = save_checkpoint(done)
                if stopping:
                    if main_proc:
                        pbar.close()
                        print(f"stopped by {stop['signal']} at step {done}; saved {path}; continue with --resume")
                    break
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
