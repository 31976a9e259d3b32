"""Measure training and sampling speed: images/s, achieved TFLOP/s and MFU.

    python bench.py                                    # DiT-S/2, CIFAR-10 shapes, batch 256, eager
    python bench.py --model DiT-B/2 --compile          # eager and torch.compile, side by side
    python bench.py --device cpu --model DiT-Mi/4 --batch-size 16 --steps 3 --warmup 1
    python bench.py --objective meanflow --compile     # MeanFlow's step (its JVP) and 1-step sampling
    python bench.py --compile --profile 5              # and where the time of 5 compiled steps goes

Each row times the very step train.py runs (batch from the device-resident data set, flips,
noise, bf16 autocast on CUDA, forward, backward, clipping, fused AdamW, EMA), once with the
dispersive weight at 0 and once above 0, so the overhead of the regulariser is the
difference; the term is also timed alone (make_term). Sampling is timed separately (Euler, EMA
model, no guidance).

MFU = model FLOPs / time / the device's peak dense bf16 FLOP/s. Model FLOPs are counted
analytically (forward_macs): a training step costs 6 x forward MACs per image (a
multiply-add is 2 FLOPs; the backward pass costs twice the forward), a sampling step
2 x forward MACs. Only the network counts, not the dispersive term, the optimiser or the
noise: time spent there lowers the MFU, as it should.

Other objectives state their own count (flops_per_forward_mac): MeanFlow's step is 10 x
forward MACs (meanflow.py says why), and its JVP runs attention on SDPA's math kernel.
"""
import argparse
import gc
import statistics
import time
from collections import Counter

import torch

import train
from data import Batches, ImageSet
from loss import Dispersive, parse_blocks
from model import MODELS, build_model
from objectives import OBJECTIVES
from sample import generate, sampler
from utils import HelpFormatter, UserError, describe_device, number, pick_device, run_main

# Dense bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets (the "with sparsity"
# figures are twice these). Matched against torch.cuda.get_device_name, first hit wins.
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0)]
# torch.compile's modes (--compile-mode)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")


def forward_macs(depth, hidden, patch, image_size, in_channels, mlp_ratio=4.0, out_channels=None, freq_dim=256):
    """Multiply-accumulates of one DiT forward pass for ONE image (matrix products only;
    norms, activations and the modulation are elementwise and left out, as is customary).
    The conditioning (timestep MLP, adaLN regressors) runs once per image, not per token."""
    out_channels = out_channels or in_channels
    T = (image_size // patch) ** 2                          # tokens
    C, M = hidden, int(hidden * mlp_ratio)
    per_token = 3 * C * C + C * C + 2 * C * M               # qkv, attention output, MLP
    attention = 2 * T * C                                   # q.k^T and attn.v, per token
    per_block = T * (per_token + attention) + C * 6 * C     # + adaLN: 6 vectors per image
    embed = T * patch * patch * in_channels * C + freq_dim * C + C * C
    final = T * C * patch * patch * out_channels + C * 2 * C
    return depth * per_block + embed + final


def model_macs(model):
    """forward_macs of a built DiT."""
    b = model.blocks[0]
    return forward_macs(model.depth, model.hidden, model.patch, model.image_size, model.in_channels,
                        mlp_ratio=b.mlp[0].out_features / model.hidden)


def peak_tflops(device, override):
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in PEAK_TFLOPS if key in name), None)
    return None


def sync(device):
    """Wait for the device: GPU work is asynchronous, so a timer must not stop before it ends."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fns, warmup, steps, rounds, device):
    """Seconds per call of each fn(i), and the seconds each warmup took. Every fn first runs
    `warmup` untimed calls (torch.compile compiles there, cuBLAS and the allocator settle);
    then the fns take turns, `rounds` rounds of `steps` calls each, and the median round
    counts. Taking turns exposes them alike to slow drifts (clocks, heat, other processes),
    which matters when the difference between them is the thing measured."""
    warm = []
    for fn in fns:
        t0 = time.perf_counter()
        for i in range(warmup):
            fn(i)
        sync(device)
        warm.append(time.perf_counter() - t0)
    per_call = [[] for _ in fns]
    for r in range(rounds):
        for fn, times in zip(fns, per_call):
            sync(device)
            t0 = time.perf_counter()
            for i in range(steps):
                fn(warmup + r * steps + i)
            sync(device)
            times.append((time.perf_counter() - t0) / steps)
    return [statistics.median(times) for times in per_call], warm


# The first kind whose key is in a kernel's name wins: Inductor's kernels are all triton_*
# whatever they fuse, and cuDNN's attention kernels also say wgmma.
KERNEL_KINDS = [("fused elementwise (triton)", ("triton",)),
                ("attention", ("flash", "fmha", "attention", "sdpa")),
                ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "wgmma"))]


def kernel_kind(name):
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def profile(fn, sec_per_step, steps, device, top=15, what="step", show=True):
    """Where the device time of `steps` calls of fn goes: the top kernels, their kinds (matrix
    products and attention are compute bound; the fused elementwise kernels move bytes), and
    how much of the step time measured without the profiler the GPU was busy at all (near 100%:
    the kernels bound the step; far below: launches and the host do). Copies and memsets count
    as kernels here: they occupy the GPU too. Returns the (kernel name, microseconds) pairs; on
    other devices, where no kernels are recorded, the operators' own CPU times (and prints their
    table)."""
    from torch.profiler import ProfilerActivity
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(steps):
            fn(100_000 + i)
        sync(device)
    if device.type != "cuda":
        if show:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
        return [(e.name, e.self_cpu_time_total) for e in prof.events()]
    kernels = [(e.name, e.time_range.elapsed_us()) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    if show:
        print_kernels(kernels, steps, sec_per_step, top, what)
    return kernels


def tally(kernels):
    """(calls, microseconds) per kernel name, from (kernel name, microseconds) pairs."""
    calls, us = Counter(), Counter()
    for name, t in kernels:
        calls[name] += 1
        us[name] += t
    return calls, us


def print_added(without, with_term, steps, sec_added, top=10):
    """What the dispersive term adds to a training step: the time per step of each kernel name
    with the term minus without it (two profiles of `steps` steps), the largest first, next to
    the difference that the timing without the profiler measured."""
    (calls0, us0), (calls1, us1) = tally(without), tally(with_term)
    added = Counter({name: us1[name] - us0[name] for name in us0.keys() | us1.keys()})
    ms = lambda t: t / 1000 / steps
    print(f"\nwhat the dispersive term adds per step: {ms(sum(added.values())):.2f} ms of device time in the profiles "
          f"(the timing: {1000 * sec_added:+.2f} ms), {(len(with_term) - len(without)) / steps:+.0f} kernels "
          f"(on a CPU: operators)")
    table(["kernels with more time", "calls / step without, with", "ms / step added"],
          [[name[:90].replace("|", "/"), f"{calls0[name] / steps:g}, {calls1[name] / steps:g}", f"{ms(t):+.3f}"]
           for name, t in added.most_common(top) if t > 0])


def print_kernels(kernels, steps, sec_per_step, top=15, what="step"):
    """The profile's tables from (kernel name, microseconds) pairs of `steps` steps (or sampling
    batches: what)."""
    calls, by_name = tally(kernels)
    by_kind = Counter()                                              # microseconds summed per kind
    for name, us in by_name.items():
        by_kind[kernel_kind(name)] += us
    ms = lambda us: us / 1000 / steps                                # per step
    busy = ms(sum(by_kind.values()))
    print(f"\nprofile of {steps} {what}s: {len(kernels) / steps:.0f} kernels (and copies) per {what}; GPU busy "
          f"{busy:.2f} ms of the {1000 * sec_per_step:.2f} ms measured per {what} "
          f"({100 * busy / (1000 * sec_per_step):.0f}%)")
    table(["kernel kind", f"ms / {what}", "share of busy"],
          [[k, f"{ms(v):.2f}", f"{100 * ms(v) / busy:.0f}%"] for k, v in by_kind.most_common()])
    table(["top kernels", f"calls / {what}", f"ms / {what}", "share of busy"],
          [[name[:90].replace("|", "/"), f"{calls[name] / steps:g}", f"{ms(v):.3f}", f"{100 * ms(v) / busy:.1f}%"]
           for name, v in by_name.most_common(top)])


def make_train_step(args, device, disp_weight, mode):
    """A fresh model, EMA, optimiser and objective, built as train.py builds them, and a function
    that runs training step i with train.py's own train_step on random uint8 images that live
    on the device, as a data set does (step i reads batch i % 4 of one epoch)."""
    n = 4 * args.batch_size
    data = ImageSet(torch.randint(0, 256, (n, args.channels, args.image_size, args.image_size), dtype=torch.uint8),
                    torch.randint(0, args.num_classes, (n,)), args.num_classes, [str(k) for k in range(args.num_classes)],
                    flip=True).to(device)
    targs = train.get_args(["--model", args.model, "--batch-size", str(args.batch_size), "--objective", args.objective,
                            "--disp-weight", str(disp_weight), "--disp-tau", str(args.disp_tau),
                            "--disp-group-size", str(args.disp_group_size), "--accum-steps", str(args.accum_steps),
                            "--data", "folder", "--warmup-steps", "0",
                            *(["--disp-block", str(args.disp_block)] if args.disp_block else []),
                            *(["--compile"] if mode != "eager" else [])])
    model, ema, opt, objective = train.build(targs, data, device)
    net = torch.compile(model, mode=args.compile_mode) if mode == "compile" else model
    # "compile-loss": one graph for the whole loss (inputs, forward, flow and dispersive terms)
    loss_fn = torch.compile(objective.__call__, mode=args.compile_mode) if mode == "compile-loss" else objective
    batches = Batches(data, args.batch_size // objective.views, 0, objective.draw, device)

    def step(i):
        train.train_step(net, model, ema, opt, loss_fn, batches(i % batches.stream.steps_per_epoch), targs.lr,
                         min(targs.ema_decay, (1 + i) / (10 + i)), targs.grad_clip,
                         extra_blocks=train.blocks_to_return(model.depth, mode != "eager", log_now=False),
                         accum=args.accum_steps)
    return step, objective


def group_size(args):
    """The dispersive group of one forward pass: --disp-group-size, or 0 for the whole
    (micro-)batch, as train.py groups it."""
    return args.disp_group_size or args.batch_size // args.accum_steps


def make_term(args, device):
    """The dispersive term alone, forward and backward, eager as train.py runs it, on a float32
    block output of the model's shape (the residual stream is float32 under autocast too), and
    one copy of that output: a read and a write of it, the memory floor of a term that reads it
    once and writes its gradient once. Timed apart from the step, the term's cost is not the small
    difference of two long steps (bench.py's overhead column) but a number of its own. Under
    --accum-steps it is one call in the micro-batches' groups, where train.py makes one call per
    micro-batch: the same arithmetic, fewer launches."""
    _, hidden, _, patch = MODELS[args.model]
    z = torch.randn(args.batch_size, (args.image_size // patch) ** 2, hidden, device=device, requires_grad=True)
    reg = Dispersive(args.disp_weight, args.disp_tau, (1,), group_size=group_size(args))

    def term(i):
        z.grad = None
        reg({1: z}).backward()
    return term, lambda i: z.detach().clone(), tuple(z.shape)


# Candidates for the dispersive term's Gram product (docs/speed.md: on a GPU, 16 x 16 outputs
# over an inner dimension of 98,304 give too few tiles to fill the card, and the gradient takes
# two products without tensor cores). Each maps z (groups, G, d) to z z^T (groups, G, G),
# differentiably; --gram-candidates times them before loss.py takes one (none has earned it yet).

def gram_split(z, splits):
    """The inner dimension cut into `splits` chunks whose Gram matrices are batched and summed:
    `splits` times more output tiles, for one copy of z forward and one of its gradient backward
    (the chunks of a group are not one strided batch; contiguous, they are)."""
    zs = z.unflatten(-1, (splits, -1)).transpose(-3, -2).contiguous()   # (groups, splits, G, d / splits)
    return (zs @ zs.mT).sum(-3)


def gram_whole_batch(z, splits):
    """The B x B Gram matrix of the whole batch, its diagonal G x G blocks kept: B / G times the
    FLOPs, but its inner dimension splits without a copy (the chunks are one strided batch)."""
    g, G, d = z.shape
    zs = z.reshape(g * G, splits, d // splits).transpose(0, 1)          # (splits, B, d / splits), a view
    full = (zs @ zs.mT).sum(0)                                          # (B, B)
    return full.view(g, G, g, G).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


class SymmetricGram(torch.autograd.Function):
    """z z^T with one backward product, dz = (dG + dG^T) z, where autograd runs one product per
    side of z z^T and adds the two; the forward product split as gram_split's if splits > 1."""

    @staticmethod
    def forward(ctx, z, splits):
        ctx.save_for_backward(z)
        return gram_split(z, splits) if splits > 1 else z @ z.mT

    @staticmethod
    def backward(ctx, dg):
        z, = ctx.saved_tensors
        return (dg + dg.mT) @ z, None


# (name, function, the number the inner dimension must divide by)
GRAM_CANDIDATES = [("z z^T (loss.py's)", lambda z: z @ z.mT, 1),
                   ("split 4", lambda z: gram_split(z, 4), 4),
                   ("split 16", lambda z: gram_split(z, 16), 16),
                   ("split 64", lambda z: gram_split(z, 64), 64),
                   ("whole batch, split 16", lambda z: gram_whole_batch(z, 16), 16),
                   ("one backward product", lambda z: SymmetricGram.apply(z, 1), 1),
                   ("split 16, one backward product", lambda z: SymmetricGram.apply(z, 16), 16)]


def time_gram_candidates(args, device):
    """bench.py --gram-candidates: each candidate's forward and backward (a fixed upstream gradient)
    on a float32 block output of the model's shape, in its dispersive groups, eager, and its
    largest error against a float64 product (TF32 shows there), over the largest entry."""
    _, hidden, _, patch = MODELS[args.model]
    G = group_size(args)
    z = torch.randn(args.batch_size // G, G, (args.image_size // patch) ** 2 * hidden, device=device,
                    requires_grad=True)
    dg = torch.randn(z.shape[0], G, G, device=device)
    z64 = z.detach().cpu().double()
    exact = z64 @ z64.mT
    names, fns, errors = [], [], []
    for name, gram, divides in GRAM_CANDIDATES:
        if z.shape[-1] % divides:
            continue
        with torch.no_grad():
            errors.append((gram(z).cpu().double() - exact).abs().max().item() / exact.abs().max().item())

        def run(i, gram=gram):
            z.grad = None
            gram(z).backward(dg)
        names.append(name)
        fns.append(run)
    secs, _ = timed(fns, args.warmup, args.steps, args.rounds, device)
    table([f"Gram candidate, {tuple(z.shape)} (groups, G, d)", "ms, forward and backward", "largest error"],
          [[n, f"{1000 * s:.3f}", f"{e:.1e}"] for n, s, e in zip(names, secs, errors)])


def make_sample_batch(args, device, mode):
    torch.manual_seed(0)
    Objective = OBJECTIVES[args.objective]
    model = build_model(args.model, args.image_size, args.channels, args.num_classes,
                        cls=Objective.model_class).to(device).eval()
    for p in model.parameters():   # a fresh DiT outputs exactly 0; give it weights that do something
        torch.nn.init.normal_(p, std=0.02)
    net = torch.compile(model, mode=args.compile_mode) if mode != "eager" else model
    labels = torch.arange(args.sample_batch, device=device) % args.num_classes
    gen = torch.Generator(device).manual_seed(0)
    solver, _, _ = sampler(args.objective, None, args.sample_steps)
    return lambda i: generate(net, labels, solver, args.sample_steps, generator=gen)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    pos = number(int, min=1)
    a("--model", default="DiT-S/2", choices=list(MODELS), metavar="MODEL", help=f"model size: {', '.join(MODELS)}")
    a("--batch-size", type=pos, default=256, help="training batch (one device)")
    a("--image-size", type=pos, default=32, help="image side in pixels (CIFAR-10: 32)")
    a("--channels", type=pos, default=3, help="image channels (CIFAR-10: 3)")
    a("--num-classes", type=pos, default=10, help="number of classes (CIFAR-10: 10)")
    a("--disp-weight", type=number(float, above=0), default=0.5, help="dispersive weight of the second row of each "
      "mode (the first row, weight 0, is the baseline)")
    a("--disp-tau", type=number(float, above=0), default=0.5, help="temperature of the dispersive loss")
    a("--disp-block", type=pos, default=None, help="block whose output is dispersed (default: depth // 4)")
    a("--disp-group-size", type=number(int, min=0), default=16, help="dispersive group size, as train.py's")
    a("--compile", action="store_true", help="also time torch.compile'd models (the first warmup steps compile)")
    a("--compile-loss", action="store_true", help="also time the whole loss compiled as one graph (training only)")
    a("--compile-mode", default="default", choices=COMPILE_MODES, help="torch.compile's mode for the compiled rows "
      "(train.py --compile uses default; max-autotune's Triton templates can fuse elementwise work into the "
      "matrix products, and reduce-overhead's CUDA graphs cut launches: candidates for docs/speed.md's targets)")
    a("--gram-candidates", action="store_true", help="also time the candidates for the dispersive term's Gram "
      "product (GRAM_CANDIDATES), forward and backward, alone")
    a("--accum-steps", type=pos, default=1, help="each training step as this many micro-batches, as train.py's "
      "(compare its peak memory and ms / step with a run without it)")
    a("--steps", type=pos, default=10, help="timed training steps per round")
    a("--rounds", type=pos, default=3, help="rounds of --steps steps; the median round is reported")
    a("--warmup", type=number(int, min=0), default=5, help="untimed steps before timing (compilation happens here)")
    a("--objective", default="flow", choices=list(OBJECTIVES), help="the training objective to time")
    a("--sample-steps", type=pos, default=None, help="sampling steps per batch (default: the objective's)")
    a("--sample-batch", type=pos, default=None, help="images per sampling batch (default: --batch-size)")
    a("--sample-batches", type=number(int, min=0), default=2, help="timed sampling batches (0: do not time sampling)")
    a("--profile", type=number(int, min=0), default=0, help="profile this many training steps (dispersive "
      "weight on; the compile mode if timed, as train.py --compile runs it, else eager) and print where the "
      "device time goes, then what the dispersive term adds (the same steps at weight 0, profiled too), and "
      "one sampling batch if sampling is timed (0: do not)")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    a("--peak-tflops", type=number(float, above=0), default=None,
      help="the device's peak dense FLOP/s in TFLOP/s for MFU (default: known GPUs; MFU is n/a otherwise)")
    args = p.parse_args(argv)
    depth, _, _, patch = MODELS[args.model]
    if args.image_size % patch:
        raise UserError(f"--image-size {args.image_size} is not divisible by {args.model}'s patch size {patch}")
    # train.build() checks these too, but only after the table's header is out
    parse_blocks(None if args.disp_block is None else str(args.disp_block), depth)
    views = OBJECTIVES[args.objective].views
    if args.batch_size % (args.accum_steps * views):
        parts = ([f"{args.accum_steps} micro-batches (--accum-steps)"] if args.accum_steps > 1 else []) \
            + ([f"{views} views of each image ({args.objective})"] if views > 1 else [])
        raise UserError(f"--batch-size {args.batch_size} does not split into {' of '.join(parts)}")
    micro = args.batch_size // args.accum_steps
    if args.disp_group_size and micro % args.disp_group_size:
        raise UserError(f"--disp-group-size {args.disp_group_size} does not divide "
                        + (f"the micro-batch of {micro} (--accum-steps)" if args.accum_steps > 1
                           else f"--batch-size {args.batch_size}"))
    args.sample_steps = args.sample_steps or OBJECTIVES[args.objective].sample_steps
    args.sample_batch = args.sample_batch or args.batch_size
    return args


def main(argv=None):
    args = get_args(argv)
    device = pick_device(args.device)
    depth, hidden, heads, patch = MODELS[args.model]
    torch.backends.cuda.matmul.allow_tf32 = True      # as train.py
    torch.backends.cudnn.allow_tf32 = True
    macs = forward_macs(depth, hidden, patch, args.image_size, args.channels)
    peak = peak_tflops(device, args.peak_tflops)

    def fmt_mfu(flops_per_s):
        return f"{100 * flops_per_s / (peak * 1e12):.1f}%" if peak else "n/a"

    def fresh():
        """Free the previous mode's models and compiled graphs, and restart the memory peak."""
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    def mem():
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}" if device.type == "cuda" else "-"

    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    print(f"device: {describe_device(device)}; torch {torch.__version__} (CUDA {torch.version.cuda}); {precision}; "
          f"peak {f'{peak:g} TFLOP/s' if peak else 'unknown (pass --peak-tflops)'}")
    print(f"{args.model}, {args.image_size}x{args.image_size}x{args.channels}, batch {args.batch_size}"
          f"{f' in {args.accum_steps} micro-batches' if args.accum_steps > 1 else ''}, "
          f"{macs / 1e9:.3f} GMACs forward per image; median of {args.rounds} rounds of {args.steps} steps "
          f"after {args.warmup} warmup steps; "
          f"{f'torch.compile mode {args.compile_mode}; ' if args.compile or args.compile_loss else ''}"
          f"objective {args.objective}; sampling: {args.sample_steps} steps of {sampler(args.objective)[1]}, "
          f"batch {args.sample_batch}, no guidance")
    # Each row is printed as soon as it is measured: a run stopped by a time limit keeps its rows.
    modes = ["eager"] + ["compile"] * args.compile + ["compile-loss"] * args.compile_loss
    profiled = "compile" if args.compile else "eager"     # the mode train.py runs
    modes.sort(key=lambda m: m == profiled)               # last, so that its profile follows the whole table
    table(["training", "disp weight", "ms / step", "images/s", "TFLOP/s", "MFU", "dispersive overhead",
           "warmup s", "peak mem GB (both)"])
    for mode in modes:
        fresh()
        weights = (0.0, args.disp_weight)
        steps, objectives = zip(*[make_train_step(args, device, w, mode) for w in weights])
        secs, warms = timed(steps, args.warmup, args.steps, args.rounds, device)
        peak_mem = mem()    # of the two models together
        for w, sec, warm in zip(weights, secs, warms):
            flops = objectives[0].flops_per_forward_mac * macs * args.batch_size / sec
            over = f"{100 * (sec - secs[0]) / secs[0]:+.1f}%" if w else "-"
            row([mode, f"{w:g}", f"{1000 * sec:.1f}", f"{args.batch_size / sec:.0f}",
                 f"{flops / 1e12:.3g}", fmt_mfu(flops), over, f"{warm:.0f}", peak_mem])
        if args.profile and mode == profiled:
            with_term = profile(steps[-1], secs[-1], args.profile, device)
            without = profile(steps[0], secs[0], args.profile, device, show=False)
            print_added(without, with_term, args.profile, secs[-1] - secs[0])
        del steps, objectives
    fresh()
    term, copy, shape = make_term(args, device)
    (sec_term, sec_copy), _ = timed([term, copy], args.warmup, args.steps, args.rounds, device)
    print(f"\nwhat the dispersive term costs alone (eager, forward and backward, a float32 block output of "
          f"{shape}, groups of {group_size(args)}): {1000 * sec_term:.3f} ms; one copy of "
          f"that output: {1000 * sec_copy:.3f} ms")
    del term, copy
    if args.gram_candidates:
        time_gram_candidates(args, device)
    sample_modes = [m for m in modes if m != "compile-loss"] if args.sample_batches else []
    if sample_modes:
        table(["sampling", "images/s", "50K images, s", "TFLOP/s", "MFU", "warmup s", "peak mem GB"])
    for mode in sample_modes:
        fresh()
        sample = make_sample_batch(args, device, mode)
        (sec,), (warm,) = timed([sample], 1, args.sample_batches, 1, device)
        ips = args.sample_batch / sec
        flops = 2 * macs * args.sample_steps * ips
        row([mode, f"{ips:.0f}", f"{50_000 / ips:.0f}", f"{flops / 1e12:.3g}", fmt_mfu(flops), f"{warm:.0f}", mem()])
        if args.profile and mode == profiled:
            profile(sample, sec, 1, device, what="sampling batch")
        del sample


def table(head, rows=()):
    """A Markdown table, ready to paste into the README (its rows now, or later through row())."""
    print()
    for r in [head, ["---"] * len(head), *rows]:
        row(r)


def row(cells):
    print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    run_main(main)
