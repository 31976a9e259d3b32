"""Measure training and sampling speed: images/s, achieved TFLOP/s and MFU.

    python bench.py                                    # DiT-S/2, CIFAR-10 shapes, batch 256, eager
    python bench.py --model DiT-B/2 --compile          # eager and torch.compile, side by side
    python bench.py --device cpu --model DiT-Mi/4 --batch-size 16 --steps 3 --warmup 1
    python bench.py --objective meanflow --compile     # MeanFlow's step (its JVP) and 1-step sampling

Each row times the very step train.py runs (batch from the device-resident data set, flips,
noise, bf16 autocast on CUDA, forward, backward, clipping, fused AdamW, EMA), once with the
dispersive weight at 0 and once above 0, so the overhead of the regulariser is the
difference. Sampling is timed separately (Euler, EMA model, no guidance).

MFU = model FLOPs / time / the device's peak dense bf16 FLOP/s. Model FLOPs are counted
analytically (forward_macs): a training step costs 6 x forward MACs per image (a
multiply-add is 2 FLOPs; the backward pass costs twice the forward), a sampling step
2 x forward MACs. Only the network counts, not the dispersive term, the optimiser or the
noise: time spent there lowers the MFU, as it should.

MeanFlow steps (--objective meanflow) count 10 x forward MACs per image: the forward pass
(2), the target's Jacobian-vector product (primal and tangent, 2 + 2) and the backward (4).
That slightly undercounts (the tangent of an attention product takes two products), so the
MeanFlow MFU errs low.
Its attention runs on SDPA's math kernel inside the JVP (flash has no forward-mode rule).
"""
import argparse
import copy
import gc
import platform
import statistics
import time

import torch

from data import BatchStream, ImageSet
from loss import meanflow_losses, meanflow_target, meanflow_times, training_losses
from model import MODELS, build_model
from sample import generate
from train import step_randomness, update
from utils import UserError, autocast, pick_device, run_main

# Dense bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets (the "with sparsity"
# figures are twice these). Matched against torch.cuda.get_device_name, first hit wins.
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0)]


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


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


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


def make_train_step(args, device, disp_weight, compile_model):
    """A fresh model, EMA and optimiser, and a function that runs training step i as train.py does."""
    torch.manual_seed(0)
    C, H, B = args.channels, args.image_size, args.batch_size
    mf = args.objective == "meanflow"
    model = build_model(args.model, H, C, args.num_classes, mean_flow=mf).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    net = torch.compile(model) if compile_model else model
    target_fn = torch.compile(meanflow_target) if compile_model and mf else meanflow_target
    # Random uint8 images stand in for the data set; they live on the device as in train.py.
    # Step i reads batch i % 4 of one epoch, so no new permutation is drawn while timing.
    n = 4 * B
    data = ImageSet(torch.randint(0, 256, (n, C, H, H), dtype=torch.uint8), torch.randint(0, args.num_classes, (n,)),
                    args.num_classes, [str(k) for k in range(args.num_classes)], flip=True).to(device)
    stream = BatchStream(n, B, seed=0, device=device)
    gen = torch.Generator(device)
    blocks = (args.disp_block or max(1, model.depth // 4),)

    def step(i):   # the body of train.py's loop, with its defaults (p_uncond 0.1, clipping 1.0)
        x, y = data.batch(stream.indices(i % stream.steps_per_epoch))
        flip, eps, t, drop = step_randomness(gen, 0, i, (B, C, H, H), 0.1)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        common = dict(disp_weight=disp_weight, disp_tau=args.disp_tau, disp_blocks=blocks,
                      null_label=args.num_classes, eps=eps, t=t, drop=drop)
        with autocast(device):
            if mf:   # train.py's defaults: 25% of r != t, no guidance, the JVP in float32
                common["t"], r = meanflow_times(B, gen, device)
                losses = meanflow_losses(net, x, y, r=r, target_model=model, target_fn=target_fn, **common)
            else:
                losses = training_losses(net, x, y, **common)
        update(model, ema, opt, losses["total"], 1.0, min(0.9999, (1 + i) / (10 + i)))
    return step


def make_sample_batch(args, device, compile_model):
    torch.manual_seed(0)
    model = build_model(args.model, args.image_size, args.channels, args.num_classes,
                        mean_flow=args.objective == "meanflow").to(device).eval()
    for p in model.parameters():   # a fresh DiT outputs exactly 0; give it weights that do something
        torch.nn.init.normal_(p, std=0.02)
    net = torch.compile(model) if compile_model else model
    labels = torch.arange(args.sample_batch, device=device) % args.num_classes
    gen = torch.Generator(device).manual_seed(0)
    return lambda i: generate(net, labels, steps=args.sample_steps, generator=gen)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default="DiT-S/2", choices=list(MODELS), metavar="MODEL", help=f"model size: {', '.join(MODELS)}")
    a("--batch-size", type=int, default=256, help="training batch (one device)")
    a("--image-size", type=int, default=32, help="image side in pixels (CIFAR-10: 32)")
    a("--channels", type=int, default=3, help="image channels (CIFAR-10: 3)")
    a("--num-classes", type=int, default=10, help="number of classes (CIFAR-10: 10)")
    a("--disp-weight", type=float, default=0.5, help="dispersive weight of the second row of each mode (the first is 0)")
    a("--disp-tau", type=float, default=0.5, help="temperature of the dispersive loss")
    a("--disp-block", type=int, default=None, help="block whose output is dispersed (default: depth // 4)")
    a("--compile", action="store_true", help="also time torch.compile'd models (the first warmup steps compile)")
    a("--steps", type=int, default=10, help="timed training steps per round")
    a("--rounds", type=int, default=3, help="rounds of --steps steps; the median round is reported")
    a("--warmup", type=int, default=5, help="untimed steps before timing (compilation happens here)")
    a("--objective", default="flow", choices=("flow", "meanflow"), help="the training objective to time")
    a("--sample-steps", type=int, default=None, help="sampling steps per batch (default: 50 Euler; MeanFlow: 1 jump)")
    a("--sample-batch", type=int, default=None, help="images per sampling batch (default: --batch-size)")
    a("--sample-batches", type=int, default=2, help="timed sampling batches (0: do not time sampling)")
    a("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    a("--peak-tflops", type=float, default=None,
      help="the device's peak dense FLOP/s in TFLOP/s for MFU (default: known GPUs; MFU is n/a otherwise)")
    args = p.parse_args(argv)
    if args.sample_steps is None:
        args.sample_steps = 1 if args.objective == "meanflow" else 50
    for name in ("batch_size", "image_size", "channels", "num_classes", "steps", "rounds", "sample_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.sample_batches < 0:
        raise UserError("--warmup and --sample-batches must be >= 0")
    if args.disp_weight <= 0 or args.disp_tau <= 0:
        raise UserError("--disp-weight and --disp-tau must be > 0 (the baseline row with weight 0 is always run)")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise UserError(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    args.sample_batch = args.sample_batch or args.batch_size
    return args


def main(argv=None):
    args = get_args(argv)
    device = pick_device(args.device)
    depth, hidden, heads, patch = MODELS[args.model]
    if args.image_size % patch:
        raise UserError(f"--image-size {args.image_size} is not divisible by {args.model}'s patch size {patch}")
    if args.disp_block is not None and not 1 <= args.disp_block <= depth:
        raise UserError(f"--disp-block {args.disp_block} is out of range: {args.model} has blocks 1..{depth}")
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

    modes = ["eager", "compile"] if args.compile else ["eager"]
    train_rows, sample_rows = [], []
    for mode in modes:
        fresh()
        weights = (0.0, args.disp_weight)
        steps = [make_train_step(args, device, w, mode == "compile") for w in weights]
        secs, warms = timed(steps, args.warmup, args.steps, args.rounds, device)
        peak_mem = mem()    # of the two models together
        for w, sec, warm in zip(weights, secs, warms):
            flops = (10 if args.objective == "meanflow" else 6) * macs * args.batch_size / sec
            over = f"{100 * (sec - secs[0]) / secs[0]:+.1f}%" if w else "-"
            train_rows.append([mode, f"{w:g}", f"{1000 * sec:.1f}", f"{args.batch_size / sec:.0f}",
                               f"{flops / 1e12:.3g}", fmt_mfu(flops), over, f"{warm:.0f}", peak_mem])
        del steps
        if args.sample_batches:
            fresh()
            sample = make_sample_batch(args, device, mode == "compile")
            (sec,), (warm,) = timed([sample], 1, args.sample_batches, 1, device)
            ips = args.sample_batch / sec
            flops = 2 * macs * args.sample_steps * ips
            sample_rows.append([mode, f"{ips:.0f}", f"{50_000 / ips:.0f}", f"{flops / 1e12:.3g}", fmt_mfu(flops),
                                f"{warm:.0f}", mem()])
            del sample

    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    print(f"device: {device_name(device)}; torch {torch.__version__} (CUDA {torch.version.cuda}); {precision}; "
          f"peak {f'{peak:g} TFLOP/s' if peak else 'unknown (pass --peak-tflops)'}")
    print(f"{args.model}, {args.image_size}x{args.image_size}x{args.channels}, batch {args.batch_size}, "
          f"{macs / 1e9:.3f} GMACs forward per image; median of {args.rounds} rounds of {args.steps} steps "
          f"after {args.warmup} warmup steps; "
          f"objective {args.objective}; sampling: {args.sample_steps} "
          f"{'MeanFlow jumps' if args.objective == 'meanflow' else 'Euler steps'}, batch {args.sample_batch}, no guidance")
    table(["training", "disp weight", "ms / step", "images/s", "TFLOP/s", "MFU", "dispersive overhead",
           "warmup s", "peak mem GB (both)"], train_rows)
    if sample_rows:
        table(["sampling", "images/s", "50K images, s", "TFLOP/s", "MFU", "warmup s", "peak mem GB"], sample_rows)


def table(head, rows):
    """A Markdown table, ready to paste into the README."""
    print()
    for r in [head, ["---"] * len(head), *rows]:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    run_main(main)
