"""MeanFlow (Geng, Deng, Bai, Kolter and He, 2025): one-step generation, with the dispersive loss.

    python train.py --objective meanflow --disp-weight 0.5       # then sample.py takes 1 step

The network u(x_t, t, r) predicts the AVERAGE velocity from time t to a later time r:
    u(x_t, t, r) = 1/(r - t) * integral_t^r v(x_s, s) ds,   so   x_r = x_t + (r - t) u.
Differentiating (r - t) u = integral_t^r v ds in t (r fixed) gives the MeanFlow identity
    u(x_t, t, r) = v(x_t, t) + (r - t) * du/dt,   du/dt = v . grad_x u + d_t u,
the total derivative along the trajectory (dx_t/dt = v). Training regresses u on the
right-hand side with the network's own du/dt (one Jacobian-vector product, tangent (v, 1)
for (x, t) and 0 for r) and the conditional velocity x - eps as v; the target is a
constant (stop-gradient): no second derivatives. The conditional x - eps may stand in for
the marginal velocity v(x_t, t) = E[x - eps | x_t], as in flow matching: the target is
linear in v (as itself and as the JVP's tangent), so its average over the (x, eps) that
lead to x_t is the true target, and a squared error is minimised by that average.

Mapping from the paper's convention (t = 0 data, t = 1 noise, z_t = (1 - t) x + t eps,
v = eps - x, jumps from t down to r <= t, z_r = z_t - (t - r) u) to ours (t = 0 noise,
t = 1 data, loss.py): our t is 1 - its t, our r is 1 - its r (so r >= t here), our v and u
are minus its v and u. Its identity u = v - (t - r) du/dt becomes the one above; its time
input (t, t - r) becomes (t, r - t), the jump's length, the same number in both.

Everything MeanFlow needs is in this file: its model (a DiT subclass), its loss, its sampler
step and its flags. Deleting it, its test file and its line in objectives.py removes it.
"""
import contextlib
import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from loss import Dispersive, FlowMatching, drop_labels, interpolate
from model import DiT, TimestepEmbedder
from utils import UserError, number

# PyTorch's forward-mode AD (torch.func.jvp) scripts its own decompositions at its first use and
# warns that torch.jit.script is deprecated (torch 2.14): nothing of ours, and nothing to change here
warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)


class MeanFlowDiT(DiT):
    """DiT conditioned also on the jump's length r - t (the paper's default time input), by a
    second timestep embedder added to c; r = t (length 0) asks for the instantaneous velocity.

    Both time embeddings take t in [0, 1] as it is, as SiT's do, not DiT's 1000 t: the target
    holds du/dt, which passes through these embeddings, and 1000 t multiplies it by up to 1000
    (on Fashion-MNIST the d_t u part of the target grew to 10x the velocity in 250 steps and
    the residual rose from 6 to 140; unscaled, it fell from 5.6 to 1.3 in 1000 steps)."""
    time_scale = 1.0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.r_embed = TimestepEmbedder(self.hidden, t_scale=self.time_scale)
        torch.nn.init.normal_(self.r_embed.mlp[0].weight, std=0.02)
        torch.nn.init.zeros_(self.r_embed.mlp[0].bias)
        torch.nn.init.normal_(self.r_embed.mlp[2].weight, std=0.02)
        torch.nn.init.zeros_(self.r_embed.mlp[2].bias)

    def forward(self, x, t, y, r=None, return_blocks=None):
        """As DiT.forward, plus r: (B,) the end time of the average velocity (None: r = t)."""
        jump = torch.zeros_like(t) if r is None else r - t
        c = self.t_embed(t) + self.y_embed(y) + self.r_embed(jump)
        return self.body(x, c, return_blocks)


def meanflow_times(B, generator=None, device="cpu", logit_mean=0.4, logit_std=1.0, ratio=0.25):
    """Draw (t, r), r >= t, for a batch of B: two logit-normal times, the smaller is t and the
    larger r; then all but a share `ratio` of the samples get r = t (plain flow matching).
    Defaults: the paper's best ImageNet settings, lognorm(-0.4, 1.0) in its convention (its
    1 - t is our t, so the mean flips sign) and 25% of samples with r != t."""
    a, b = torch.sigmoid(torch.randn(2, B, device=device, generator=generator) * logit_std + logit_mean)
    t, r = torch.minimum(a, b), torch.maximum(a, b)
    r = torch.where(torch.rand(B, device=device, generator=generator) < ratio, r, t)
    return t, r


def meanflow_target(model, xt, t, y, r, v, *, drop=None, null_label=None, cfg_omega=1.0, cfg_kappa=0.0, fp32=True):
    """The regression target v_g + (r - t) * du/dt, computed without gradients.

    model(x, t, y, r=r) is the average velocity. Guidance learnt in training (the paper's
    CFG, 1-step sampling stays 1 evaluation): v_g = omega v + kappa u(x_t, t, t | y)
    + (1 - omega - kappa) u(x_t, t, t | null) for the samples whose label was kept (`drop`
    False), plain v for the others; omega = 1, kappa = 0 is no guidance. The same v_g is
    the JVP's tangent. Flash and memory-efficient attention have no forward-mode derivative,
    so attention runs on SDPA's plain (math) kernel here. fp32: run this in float32 even
    under a bf16 autocast (as the released PyTorch code does); False keeps the autocast.
    (Not implemented: the paper's option of guiding only inside a time interval.)"""
    if (cfg_omega != 1.0 or cfg_kappa != 0.0) and null_label is None:
        raise ValueError("guidance in training (cfg_omega, cfg_kappa) needs the null label of a conditional model")
    precision = torch.autocast(xt.device.type, enabled=False) if fp32 else contextlib.nullcontext()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), precision:
        v = v.to(xt.dtype)
        if cfg_omega != 1.0 or cfg_kappa != 0.0:
            u_null = model(xt, t, torch.full_like(y, null_label)).to(v.dtype)     # r = t: the velocity
            u_cond = model(xt, t, y).to(v.dtype) if cfg_kappa else 0.0
            guided = cfg_omega * v + cfg_kappa * u_cond + (1 - cfg_omega - cfg_kappa) * u_null
            keep = torch.ones_like(t, dtype=torch.bool) if drop is None else ~drop
            v = torch.where(keep.view(-1, 1, 1, 1), guided, v)
        _, du_dt = torch.func.jvp(lambda x, t: model(x, t, y, r=r), (xt, t), (v, torch.ones_like(t)))
        return v + (r - t).view(-1, 1, 1, 1) * du_dt.to(v.dtype)


def jumps(fn, x, steps):
    """The sampler: jump along the time grid with the average velocity, fn(x, t, r=...) = u(x, t, r).
    Each jump is exact for a perfect model, so 1 step suffices; more steps may correct errors."""
    ts = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).tolist()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        x = x + (t1 - t0) * fn(x, t0, r=t1)
    return x


class MeanFlow(FlowMatching):
    """The loss of a sample is w * ||u - u_tgt||^2 (summed over its elements), with the paper's
    adaptive weight w = 1 / (||u - u_tgt||^2 + c)^p, itself a constant (stop-gradient); p = 0
    is the plain squared error, p = 1 (default) roughly a relative error. c = 0.01 is the
    released JAX code's default. "flow" in the dict is the unweighted mean squared error per
    element, on flow matching's scale (equal to it when r = t; it is not expected to fall
    steadily, since the target moves with the network); "total" uses the weighted loss, which
    stays near 1 per sample with p = 1. The dispersive term is computed on the same forward
    pass, unchanged; note that lambda weighs it against this weighted loss, so the same lambda
    is not the same strength as under flow matching."""
    model_class = MeanFlowDiT
    solvers = ("meanflow", "euler", "heun", "dopri5")   # euler / heun / dopri5 integrate u(x, t, t)
    solver_fns = {"meanflow": jumps}
    sample_steps = 1
    # forward (2) + the target's JVP, primal and tangent (2 + 2) + backward (4); it slightly
    # undercounts (the tangent of an attention product takes two products), so the MFU errs low
    flops_per_forward_mac = 10

    def __init__(self, reg, null_label=None, p_uncond=0.1, *, model=None, ratio=0.25, logit_mean=0.4, logit_std=1.0,
                 adaptive_p=1.0, adaptive_c=0.01, cfg_omega=1.0, cfg_kappa=0.0, jvp_fp32=True, compile=False):
        super().__init__(reg, null_label, p_uncond)
        if (cfg_omega != 1.0 or cfg_kappa != 0.0) and (null_label is None or p_uncond == 0):
            raise UserError("--mf-cfg-omega / --mf-cfg-kappa need class labels and --p-uncond > 0 (the null class "
                            "must be trained; flow matching takes its guidance at sampling time: --sample-cfg)")
        # The target goes through the bare model (train.py's `model`, not the DDP wrapper, which
        # torch.func.jvp cannot go through; the target needs no gradient sync), compiled whole.
        self.model = model
        self.target_fn = torch.compile(meanflow_target) if compile else meanflow_target
        self.ratio, self.logit_mean, self.logit_std = ratio, logit_mean, logit_std
        self.adaptive_p, self.adaptive_c = adaptive_p, adaptive_c
        self.cfg_omega, self.cfg_kappa, self.jvp_fp32 = cfg_omega, cfg_kappa, jvp_fp32

    @classmethod
    def add_args(cls, parser):
        g = parser.add_argument_group("MeanFlow (--objective meanflow; the paper's ImageNet settings)")
        a = g.add_argument
        return [
            a("--mf-ratio", type=number(float, min=0, max=1), default=0.25, help="share of samples with "
              "r != t (the others train plain flow matching); the paper's 25%%"),
            a("--mf-logit-mean", type=number(float), default=0.4, help="mean of the logit-normal time "
              "draws, in this project's convention; the paper's lognorm(-0.4, 1.0) uses t = 1 for noise"),
            a("--mf-logit-std", type=number(float, above=0), default=1.0, help="std of the logit-normal draws"),
            a("--mf-adaptive-p", type=number(float, min=0), default=1.0, help="power p of the adaptive loss "
              "weight 1 / (||u - u_tgt||^2 + c)^p; 0 is the plain squared error"),
            a("--mf-adaptive-c", type=number(float, above=0), default=0.01, help="c of the adaptive weight"),
            a("--mf-cfg-omega", type=number(float), default=1.0, help="guidance scale omega learnt in "
              "training (1: none; the paper's ablation liked 3 with kappa 0); 1-step samples come guided"),
            a("--mf-cfg-kappa", type=number(float, min=0, below=1), default=0.0, help="kappa, the share of "
              "the conditional prediction in the guided velocity (effective scale omega / (1 - kappa))"),
            a("--mf-jvp-precision", default="fp32", choices=("fp32", "autocast"), help="run the target's "
              "Jacobian-vector product in float32 (as the released code) or in the step's bf16 autocast"),
        ]

    @classmethod
    def from_args(cls, args, model, null_label):
        return cls(Dispersive.from_args(args, model.depth), null_label, args.p_uncond, model=model, ratio=args.mf_ratio,
                   logit_mean=args.mf_logit_mean, logit_std=args.mf_logit_std, adaptive_p=args.mf_adaptive_p,
                   adaptive_c=args.mf_adaptive_c, cfg_omega=args.mf_cfg_omega, cfg_kappa=args.mf_cfg_kappa,
                   jvp_fp32=args.mf_jvp_precision == "fp32", compile=args.compile)

    @staticmethod
    def sampling_note(train_args, cfg_scale):
        omega = train_args.get("mf_cfg_omega", 1.0)
        if cfg_scale != 1 and omega != 1.0:
            return (f"this MeanFlow model learnt guidance in training (omega {omega}); --cfg-scale {cfg_scale} "
                    f"guides it a second time")
        return None

    def draw(self, gen, shape):
        draws = super().draw(gen, shape)
        draws["t"], draws["r"] = meanflow_times(shape[0], gen, gen.device, self.logit_mean, self.logit_std, self.ratio)
        return draws

    def __call__(self, net, x, y, draws, extra_blocks=()):
        eps, t, r, drop = draws["eps"], draws["t"], draws["r"], draws["drop"]
        y = drop_labels(y, drop, self.null_label)
        xt = interpolate(x, eps, t)
        u_tgt = self.target_fn(self.model or net, xt, t, y, r, x - eps, drop=drop, null_label=self.null_label,
                               cfg_omega=self.cfg_omega, cfg_kappa=self.cfg_kappa, fp32=self.jvp_fp32)
        u, blocks = net(xt, t, y, r=r, return_blocks=self.reg.blocks_needed(extra_blocks))
        sq = (u.float() - u_tgt).pow(2).flatten(1).sum(dim=1)                # ||u - u_tgt||^2 per sample
        weighted = (sq / (sq.detach() + self.adaptive_c).pow(self.adaptive_p)).mean()
        flow = sq.mean() / x[0].numel()
        disp = self.reg(blocks) if self.reg.weight > 0 else torch.zeros_like(flow)
        return {"flow": flow, "disp": disp, "total": weighted + self.reg.weight * disp, "blocks": blocks}
