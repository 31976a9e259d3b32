"""Train a DiT with flow matching plus the dispersive loss on one block's hidden states.

    python train.py --disp-weight 0.5                  # CIFAR-10, DiT-S/2, the paper's lambda, tau, block
    python train.py --disp-weight 0                    # the baseline
    torchrun --nproc_per_node 8 train.py ...           # several GPUs (DDP)

Everything a run writes goes to --out (rundir.py): metrics.jsonl (the configuration, versions
and device first, then one line per log step), samples/ (grids of EMA samples) and
checkpoints/. The same command plus --resume continues a run exactly where it stopped.
"""
import argparse
import contextlib
import copy
import os
import platform
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import fid
import rundir
from data import DATASETS, Batches, load_dataset
from loss import USES_TAU, VARIANTS, block_stats, dispersive_loss
from model import MODELS, build_model
from objectives import OBJECTIVES
from sample import SOLVERS, Stopped, generate, grid_labels, sampler, save_grid
from utils import (HelpFormatter, UserError, all_reduce, autocast, describe_device, git_commit, init_distributed,
                   mean_over_gpus, number, rank0_first, run_main)


def get_args(argv=None):
    # allow_abbrev off: a mistyped flag (--disp-weigh) is an error, not a prefix of another one
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    g = p.add_argument_group("the method: dispersive loss (the paper's settings; loss.py). The optimisation "
                             "defaults are not all the paper's: README.md's table says which differ")
    g.add_argument("--disp-weight", type=number(float, min=0), default=0.5, help="lambda; 0 trains the baseline")
    g.add_argument("--disp-tau", type=number(float, above=0), default=0.5,
                   help="temperature tau of the InfoNCE forms (hinge and covariance have none: refused there)")
    g.add_argument("--disp-block", default=None, help="block(s) to regularise, counted from 1: N, N,M,..., 'last' or "
                   "'all' (default: depth // 4, the paper's; the released PyTorch code used 'last')")
    g.add_argument("--disp-variant", default="infonce_l2", choices=VARIANTS, help="form of the loss (covariance's "
                   "term is far larger at the same lambda: docs/cpu_studies.md swept it down to 0.0005)")
    g.add_argument("--disp-group-size", type=number(int, min=0), default=16, help="the loss is computed within "
                   "groups of this many consecutive samples of each GPU's batch and averaged: the paper's runs had 16 "
                   "per device (the released PyTorch code 32); 0: the whole per-GPU batch (micro-batch, with --accum-steps) as "
                   "one group")
    g = p.add_argument_group("the generative objective")
    g.add_argument("--objective", default="flow", choices=list(OBJECTIVES), help="flow matching (the paper's SiT), "
                   "or another objective of objectives.py; each has its own flags below")
    g.add_argument("--p-uncond", type=number(float, min=0, max=1), default=0.1,
                   help="share of labels dropped to the null class, for classifier-free guidance")
    own_flags = {name: Obj.add_args(p) for name, Obj in OBJECTIVES.items()}
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="DiT-S/2", choices=list(MODELS), metavar="MODEL", help=", ".join(MODELS))
    g.add_argument("--data", default="cifar10", choices=DATASETS, help="'folder': any ImageFolder directory; "
                   "'latents': a directory written by encode_latents.py")
    g.add_argument("--data-path", default="data", help="where the data set is (or is downloaded to)")
    g.add_argument("--image-size", type=number(int, min=1), default=None,
                   help="resize and centre-crop folder images to this size (default: keep); with --data latents, "
                   "checked against the image size the latents were encoded from")
    g.add_argument("--unconditional", action="store_true", help="ignore the labels (no guidance possible)")
    g = p.add_argument_group("optimisation (AdamW)")
    g.add_argument("--batch-size", type=number(int, min=1), default=128,
                   help="global batch, split across GPUs (the paper's: 256)")
    g.add_argument("--accum-steps", type=number(int, min=1), default=1,
                   help="run each GPU's batch as this many equal micro-batches, their gradients summed before the one "
                   "optimiser step: the same step in about 1/N of the activation memory, and the same loss unless "
                   "--disp-group-size is 0; a log line's block diagnostics are the last micro-batch's")
    g.add_argument("--steps", type=number(int, min=1), default=400_000, help="total training steps")
    g.add_argument("--lr", type=number(float, min=0), default=1e-4, help="learning rate, constant after the warm-up")
    g.add_argument("--adam-beta2", type=number(float, min=0, below=1), default=0.999,
                   help="AdamW beta2: 0.999 as SiT / DiT and the released code; the paper states 0.95")
    g.add_argument("--warmup-steps", type=number(int, min=0), default=1000,
                   help="linear learning-rate warm-up (the paper: none)")
    g.add_argument("--weight-decay", type=number(float, min=0), default=0.0, help="AdamW weight decay (the paper's: 0)")
    g.add_argument("--grad-clip", type=number(float, min=0), default=1.0,
                   help="clip the gradient norm (0: off, as in the paper)")
    g.add_argument("--ema-decay", type=number(float, min=0, below=1), default=0.9999,
                   help="EMA decay, ramped up as min(decay, (1+s)/(10+s)) so that early samples are not noise (SiT's code: "
                   "0.9999, not ramped)")
    g.add_argument("--seed", type=number(int, min=0, max=2**32 - 1), default=0,
                   help="seed for the weights, data order and noise")
    g = p.add_argument_group("the run")
    g.add_argument("--out", default=None, help="run directory (default: runs/<data>_<model>[_<objective>]_w<disp-weight>_s<seed>)")
    g.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue a run: a checkpoint file, a run directory, or nothing for --out's newest checkpoint")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (GPU: faster after a minute)")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    g.add_argument("--log-every", type=number(int, min=1), default=50, help="steps between log lines (the only per-step syncs)")
    g.add_argument("--sample-every", type=number(int, min=0), default=5000, help="steps between grids of EMA samples (0: never)")
    g.add_argument("--sample-solver", choices=SOLVERS, default=None, help="solver of the sample grids and the periodic FID "
                   "(default: the objective's; the paper's tables: dopri5)")
    g.add_argument("--sample-steps", type=number(int, min=1), default=None, help="solver steps of the grids and the periodic FID "
                   "(default: the objective's)")
    g.add_argument("--sample-cfg", type=number(float), default=1.0, help="guidance scale of the grids and the periodic FID")
    g.add_argument("--ckpt-every", type=number(int, min=1), default=10_000, help="steps between checkpoints (and at the end)")
    g.add_argument("--keep-ckpts", type=number(int, min=0), default=3, help="how many recent checkpoints to keep (0: all)")
    fid.add_args(p)
    args = p.parse_args(argv)

    refuse_ignored_flags(args, p, own_flags)
    if args.out is None and args.resume:
        args.out = rundir.out_from_resume(args.resume)
    if args.out is None:
        kind = "" if args.objective == "flow" else f"_{args.objective}"
        args.out = os.path.join("runs", f"{args.data}_{args.model.replace('/', '-')}{kind}_w{args.disp_weight:g}_s{args.seed}")
    return args


def refuse_ignored_flags(args, p, own_flags):
    """A flag that the other flags make pointless is an error, not silently ignored: a user who
    set it expects it to matter. own_flags: {objective: its argparse actions}."""
    for name, actions in own_flags.items():   # another objective's flags would be silently ignored
        changed = [a.option_strings[0] for a in actions if name != args.objective and getattr(args, a.dest) != a.default]
        if changed:
            raise UserError(f"{', '.join(changed)}: flags of --objective {name}, not of {args.objective}")
    if args.disp_variant not in USES_TAU and args.disp_tau != p.get_default("disp_tau"):
        raise UserError(f"--disp-tau: the {args.disp_variant} variant has no temperature")
    if args.image_size is not None and args.data not in ("folder", "latents"):
        raise UserError("--image-size: only --data folder (and latents) take it")
    if args.unconditional and args.sample_cfg != 1:
        raise UserError("--sample-cfg: an --unconditional model takes no labels, so no guidance")
    if args.unconditional and args.p_uncond != p.get_default("p_uncond"):
        raise UserError("--p-uncond: an --unconditional model has no labels to drop")
    fid_flags = [f"--{k.replace('_', '-')}" for k in ("fid_samples", "fid_ref_stats", "fid_extractor", "inception_weights")
                 if getattr(args, k) != p.get_default(k)]
    if fid_flags and not args.fid_every:
        raise UserError(f"{', '.join(fid_flags)}: flags of the periodic FID, which only --fid-every N turns on")
    sample_flags = [f for f, k in (("--sample-solver", "sample_solver"), ("--sample-steps", "sample_steps"),
                                   ("--sample-cfg", "sample_cfg")) if getattr(args, k) != p.get_default(k)]
    if sample_flags and not args.sample_every and not args.fid_every:
        raise UserError(f"{', '.join(sample_flags)}: flags of the grids and the periodic FID, and --sample-every 0 "
                        f"without --fid-every draws neither")


def build(args, data, device, world=1):
    """The model, its EMA copy, the optimiser and the objective (shared with bench.py)."""
    Objective = OBJECTIVES[args.objective]
    C, H, W = data.shape
    num_classes = 0 if args.unconditional else data.num_classes
    if H != W:
        raise UserError(f"images are {H}x{W}; the model needs square images (use --image-size)")
    torch.manual_seed(args.seed)
    try:
        model = build_model(args.model, H, C, num_classes, cls=Objective.model_class).to(device)
    except ValueError as e:
        fix = "encode the latents at another size" if args.data == "latents" else "use --image-size"
        raise UserError(f"{e} (model {args.model}, data {C}x{H}x{W}); {fix} or choose another --model") from None
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, args.adam_beta2),
                            weight_decay=args.weight_decay, fused=device.type == "cuda")
    objective = Objective.from_args(args, model, num_classes if num_classes else None)
    reg, accum = objective.reg, args.accum_steps
    if args.batch_size % (world * accum * objective.views):
        raise UserError(f"--batch-size {args.batch_size} does not split into {world} process(es) x "
                        + (f"{accum} micro-batches (--accum-steps) x " if accum > 1 else "") + f"{objective.views} view(s)")
    local = args.batch_size // (world * accum)        # what one forward pass holds
    if reg.group_size and local % reg.group_size:     # the baseline too: it logs the term, in the same groups
        where = "micro-batch" if accum > 1 else "batch"
        raise UserError(f"--disp-group-size {reg.group_size} does not divide the {where} of {local} per process; "
                        f"choose a divisor of it, or 0 for the whole {where}")
    group = reg.group_size or local
    if reg.weight > 0 and group < objective.min_group:     # e.g. --disp-group-size 0 with a small micro-batch
        raise UserError(f"--objective {args.objective} needs groups of at least {objective.min_group} forward passes; "
                        f"these hold {group}: a larger --disp-group-size, batch, or fewer --accum-steps")
    if reg.weight > 0 and group == 1:
        print("warning: the dispersive loss of 1 sample is constant (0) and does nothing", file=sys.stderr)
    return model, ema, opt, objective


def micro_batches(batch, n):
    """batch = (x, y, draws) as n equal slices of consecutive samples (--accum-steps); every draw
    has the batch as its first dimension."""
    x, y, draws = batch
    assert len(x) % n == 0, (len(x), n)      # build() refuses such a --batch-size
    m = len(x) // n
    return [(x[i:i + m], y[i:i + m], {k: v[i:i + m] for k, v in draws.items()}) for i in range(0, len(x), m)]


def train_step(net, model, ema, opt, objective, batch, lr, ema_decay, grad_clip, extra_blocks=(), accum=1):
    """One optimisation step on batch = (x, y, draws), as Batches gives it; returns the loss terms.
    net runs the forward pass (the model itself, or its DDP / torch.compile wrapper); model is the
    bare module, whose weights are clipped, stepped and averaged into ema. With accum > 1 the batch
    runs as that many equal micro-batches, each holding whole dispersive groups: each loss divided
    by accum, their gradients sum to the batch's mean (the flow loss is a mean over samples, the
    dispersive loss a mean over its groups)."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    mean = {}
    for i, (x, y, draws) in enumerate(micro_batches(batch, accum)):
        # under DDP the gradients are averaged across GPUs once, in the last micro-batch's backward;
        # DDP has no_sync (through torch.compile's wrapper too), a bare model has not
        last = i == accum - 1
        sync = last or not hasattr(net, "no_sync")
        with contextlib.nullcontext() if sync else net.no_sync():
            with autocast(x.device):
                losses = objective(net, x, y, draws, extra_blocks)
            (losses["total"] / accum).backward()
        for k in ("flow", "disp", "total"):
            mean[k] = mean.get(k, 0) + losses[k].detach() / accum
        if not last:
            del losses      # its block outputs, freed before the next micro-batch's forward pass
    losses.update(mean)       # the terms of the whole batch; losses["blocks"] are the last micro-batch's
    # the gradient's norm before clipping is logged, with or without clipping: it shows whether
    # --grad-clip binds, or would
    if grad_clip > 0:
        losses["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    else:   # the same norm clip_grad_norm_ computes, without the clipping
        losses["grad_norm"] = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    opt.step()
    with torch.no_grad():   # ema = decay * ema + (1 - decay) * w, all tensors in one kernel
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - ema_decay)
    return losses


def blocks_to_return(depth, compiled, log_now):
    """Blocks whose outputs a step returns besides the regularised ones: all of them at log steps,
    for the diagnostics, and under torch.compile at every step. The blocks returned are part of
    the compiled graph, so asking for them at log steps only would compile a second graph at the
    first log step (about as long as the first; docs/speed.md has the timings). They are
    computed anyway (the residual stream), so returning them costs no arithmetic."""
    return tuple(range(1, depth + 1)) if log_now or compiled else ()


def log_values(losses, reg):
    """What a log line reports (before averaging over GPUs): the loss terms; the dispersive loss of
    the regularised blocks whatever its weight, in the groups it is trained in and over the whole
    per-GPU batch (with --accum-steps, the last micro-batch); and for every block the mean squared
    distance / d and rms of its outputs."""
    blocks = {b: h.detach() for b, h in losses["blocks"].items()}     # diagnostics: no autograd graph
    # disp_diag (a diagnostic; nothing to do with the Gram matrix's diagonal) is the dispersive loss
    # of the regularised blocks, measured alike in every arm: the baseline trains with disp = 0, and
    # this shows what its term would be; in the dispersive arm it equals disp (with --accum-steps,
    # it is the last micro-batch's own value, disp the mean over micro-batches). It calls
    # dispersive_loss, not reg(...), so that a fork that changes what Dispersive.__call__
    # disperses keeps the same measure.
    measured = lambda group_size: torch.stack([dispersive_loss(blocks[b], reg.variant, reg.tau, group_size=group_size)
                                               for b in reg.blocks]).mean()
    stats = {b: block_stats(blocks[b]) for b in sorted(blocks)}          # (distance, rms) of every block
    return {"flow": losses["flow"], "disp": losses["disp"], "total": losses["total"], "grad_norm": losses["grad_norm"],
            "disp_diag": measured(reg.group_size), "disp_diag_batch": measured(0),
            "mean_sq_dist": torch.stack([stats[b][0] for b in reg.blocks]).mean(),
            "block_dist": torch.stack([s[0] for s in stats.values()]),
            "block_rms": torch.stack([s[1] for s in stats.values()])}


def main(argv=None):
    args = get_args(argv)
    # the grids' solver (and the periodic FID's), refused now if it cannot sample this objective
    solver, _, sample_steps = sampler(args.objective, args.sample_solver, args.sample_steps,
                                      ("--sample-solver", "--sample-steps"))
    rank, world, device = init_distributed(args.device)
    main_proc = rank == 0
    torch.backends.cuda.matmul.allow_tf32 = True   # fp32 matmuls outside autocast use TF32 (the dispersive distances too)
    torch.backends.cudnn.allow_tf32 = True
    resume_path, ckpt, own, seen = rundir.prepare(args.out, args.resume)   # checks only: it creates nothing yet

    # --- data (small sets live whole on the training device), model, EMA, optimiser, objective ---
    with rank0_first(device):                       # rank 0 downloads first; if one rank fails, all stop
        data = load_dataset(args.data, args.data_path, args.image_size, warn=main_proc).to(device)
    model, ema, opt, objective = build(args, data, device, world)
    # views: forward passes per image (1; 2 for contrastive.py's two noised copies of each image)
    reg, views = objective.reg, objective.views
    model_config = {"name": args.model, "image_size": data.shape[1], "in_channels": data.shape[0],
                    "num_classes": model.num_classes, "objective": args.objective}
    start = 0 if ckpt is None else rundir.restore(ckpt, resume_path, model, ema, opt, model_config, args, main_proc,
                                                  world, data)
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    if args.compile:
        net = torch.compile(net)
    # Batches refuses a batch larger than the data: before rundir.create, so that no directory is left
    batches = Batches(data, args.batch_size // views, args.seed, objective.draw, device, rank, world,
                      labels=model.num_classes > 0)
    with rank0_first(device):                       # rank 0 downloads first; if one rank fails, all stop
        # Grids of a latent model are decoded by the set's VAE, loaded now: a VAE that cannot be
        # loaded stops the run here, not at the first grid hours later. So does a missing FID file.
        decode = data.decoder(device) if main_proc and args.sample_every and args.data == "latents" else None
        fid_eval = fid.TrainingFID.from_args(args, data, device, rank, world)    # every rank samples its share
    with rank0_first(device):                       # what rank 0 alone does; if it fails, all stop
        # The run directory only now, once every rank has loaded the above: a failure there leaves
        # none behind. A run continued from another run directory starts a log of its own here.
        rundir.create(args.out, new_log=not own, main_proc=main_proc, seen=seen)
        log = rundir.Logger(os.path.join(args.out, "metrics.jsonl"), main_proc, keep_until_step=start if own else None)
        log(type="config", step=start, args=vars(args), model_config=model_config,
            params=sum(p.numel() for p in model.parameters()), disp_blocks=list(reg.blocks), world_size=world,
            resumed_from=resume_path, vae=data.vae, device=describe_device(device),
            versions={"torch": str(torch.__version__), "python": platform.python_version(), "cuda": torch.version.cuda,
                      "git": git_commit()})

    def save(step):
        bad = rundir.not_finite(model, ema, opt)
        if bad:
            raise UserError(f"NaN or inf in the {bad} at step {step}; not saving (earlier checkpoints are intact)")
        if main_proc:
            state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                     "args": vars(args), "model_config": model_config, "world_size": world,
                     "classes": data.classes, "data_size": len(data),     # --resume checks it is the same data
                     "vae": data.vae,      # latent sets: the VAE that decodes samples
                     "rng": {"torch": torch.get_rng_state()}, "versions": {"torch": str(torch.__version__)}}
            return rundir.save_checkpoint(args.out, step, state, args.keep_ckpts)

    grid_path = lambda step: os.path.join(args.out, "samples", f"step_{step:07d}.png")

    def draw_grid(step):
        """The EMA model's sample grid at this step. Every grid starts from the same noise (the
        run's seed), so grids of successive steps show the same images as training shapes them.
        A signal cuts it short (it raises Stopped)."""
        n = (min(model.num_classes, 16) if model.num_classes else 8) * 8
        imgs = generate(ema.eval(), grid_labels(model.num_classes, n).to(device), solver, sample_steps,
                        cfg_scale=args.sample_cfg, generator=torch.Generator(device).manual_seed(args.seed),
                        decode=decode, stop=stop)
        save_grid(imgs, grid_path(step), n // 8)

    def measure_fid(step):
        """The periodic FID of the EMA model, logged; False when a signal cut it short (all ranks agree)."""
        result = fid_eval(ema.eval(), args.objective, args.seed, stop)
        if result:
            log(type="fid", step=step, **result)
        return result is not None

    def redo_cut_short(step):
        """A signal that cut short the grid or the FID of a step saves that step's checkpoint without
        them, and the run resumed from it would never make them: the step's grid and FID are made
        now, if due (by this run's flags) and missing. False when a signal cuts them short again."""
        grid_missing = main_proc and args.sample_every and step % args.sample_every == 0 \
            and not os.path.exists(grid_path(step))
        if grid_missing:
            with contextlib.suppress(Stopped):
                draw_grid(step)
        if rundir.agree_to_stop(stop, device):      # under DDP, with every rank
            return False
        if fid_eval is None or not fid_eval.due(step):
            return True
        # rank 0 reads the log; every rank samples a share of the FID, so all must agree
        missing = torch.tensor([main_proc and not log.holds(type="fid", step=step)], device=device, dtype=torch.int)
        if all_reduce(missing, "max").item():
            return measure_fid(step)
        return True

    # --- the loop ------------------------------------------------------------------------
    guard = rundir.NonFiniteGuard(("flow", "disp"), device)
    net.train()
    with rundir.stop_on_signals() as stop, \
            tqdm(total=args.steps, initial=start, disable=not main_proc, dynamic_ncols=True) as pbar:
        todo = range(start, args.steps)
        if own and not redo_cut_short(start):
            todo = ()       # stopped again: the checkpoint of step `start` is on disk already
            if main_proc:
                pbar.close()
                print(f"stopped by {stop['signal']} at step {start}, before training on; continue with --resume")
        t_last, step_last = time.perf_counter(), start      # img_per_s: images per second of training
        for step in todo:
            done = step + 1
            log_now = done % args.log_every == 0 or done == args.steps
            # the step: loss terms, backward, AdamW, EMA (ramped up early on)
            lr = args.lr * min(1.0, done / max(1, args.warmup_steps))
            losses = train_step(net, model, ema, opt, objective, batches(step), lr,
                                min(args.ema_decay, (1 + step) / (10 + step)), args.grad_clip,
                                extra_blocks=blocks_to_return(model.depth, args.compile, log_now),
                                accum=args.accum_steps)
            guard.update((losses["flow"], losses["disp"]), done)      # no host-device sync here
            pbar.update(1)

            # log: the only host-device sync, every --log-every steps
            if log_now:
                stats = mean_over_gpus(log_values(losses, reg))
                guard.check()
                now = time.perf_counter()
                ips = (done - step_last) * (args.batch_size // views) / (now - t_last)   # images, not views
                t_last, step_last = now, done
                log(type="train", step=done, **stats, lr=lr, img_per_s=ips)
                pbar.set_postfix(flow=f"{stats['flow']:.4f}", disp=f"{stats['disp']:.4f}", img_s=f"{ips:.0f}")
            del losses      # under --compile it holds every block's output: free them before the next step
            t_pause = time.perf_counter()       # grids, FID and checkpoints: img_per_s's clock skips them

            # samples and evaluations of the EMA model
            if main_proc and args.sample_every and done % args.sample_every == 0:
                with contextlib.suppress(Stopped):      # the checkpoint below comes first
                    draw_grid(done)
            fid_cut = fid_eval is not None and fid_eval.due(done) and not measure_fid(done)

            # checkpoints, and a clean stop on SIGINT / SIGTERM. Under DDP the ranks agree only at log
            # steps (a round trip through every GPU each step would stall the pipeline); one process
            # checks every step, and a FID cut short by a signal has just agreed, so it stops now
            agree_now = done % args.log_every == 0 or world == 1 or fid_cut
            stopping = rundir.agree_to_stop(stop, device) if agree_now else False
            if done % args.ckpt_every == 0 or done == args.steps or stopping:
                guard.check()
                with rank0_first(device):           # rank 0 writes it; if that fails, all stop
                    path = save(done)
                if stopping:
                    if main_proc:
                        pbar.close()
                        print(f"stopped by {stop['signal']} at step {done}; saved {path}; continue with --resume")
                    break
            t_last += time.perf_counter() - t_pause
    rundir.release(args.out)
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
