"""Losses: flow matching, and the dispersive regulariser on a block's hidden states.

Time convention, used everywhere in this project (as in SiT and METHOD.md):
    x_t = t * x + (1 - t) * eps,   eps ~ N(0, I),   t ~ U[0, 1]
t = 0 is pure noise, t = 1 is data, and the network regresses the velocity
    v = d x_t / dt = x - eps.
Sampling (sample.py) integrates dx/dt = v(x, t) from t = 0 to t = 1.
"""
import contextlib
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

VARIANTS = ("infonce_l2", "infonce_cos", "hinge", "covariance")


def interpolate(x, eps, t):
    """x_t for a batch; t: (B,) broadcast over the other dimensions."""
    t = t.view(-1, *([1] * (x.dim() - 1)))
    return t * x + (1 - t) * eps


def velocity_target(x, eps):
    return x - eps


def pairwise_sq_dists(z):
    """(B, d) -> (B, B) squared Euclidean distances, from one matrix product:
    ||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b. The subtraction cancels badly for vectors with
    large norms, so the diagonal (exactly 0) is set by hand and the rest clamped at 0.
    (The released code used F.pdist: a sqrt then a square, float32-only on CUDA and
    without tensor cores.)"""
    sq = (z * z).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)).clamp_min(0.0)
    return d2 * (1.0 - torch.eye(len(z), device=z.device, dtype=z.dtype))


def dispersive_loss(z, variant="infonce_l2", tau=0.5, margin=1.0):
    """Dispersive loss of a batch of hidden states z: (B, ...), each sample flattened to a
    vector of length d (all tokens together; no pooling, no normalisation, no projection).

    infonce_l2  (the paper's default) log( 1/B^2 * sum_{i,j} exp(-||z_i - z_j||^2 / (d * tau)) )
                over all B*B ordered pairs, the diagonal included: the value lies in
                [-log B, 0] and is exactly 0 for B = 1.
    infonce_cos the same log-mean-exp with D = -cos(z_i, z_j); diagonal included (cos = 1),
                so the value lies in [1/tau - log B, 1/tau].
    hinge       mean over the B*(B-1) pairs i != j of max(0, margin - ||z_i - z_j||^2 / d)^2.
                The diagonal is left out: D(z_i, z_i) = 0 would add the constant margin^2
                and no gradient. margin is ours to choose (the paper gives none): 1.0, half
                the D of two independent unit-variance vectors, which is 2.
    covariance  sum of squared off-diagonal entries of the d x d covariance of the batch
                features, each feature standardised over the batch first (so the entries
                are correlations), divided by d as VICReg does, so the scale does not grow
                with the feature size. The d x d matrix is never formed: its squared
                Frobenius norm equals that of the B x B Gram matrix of the samples.

    Always computed in float32, whatever autocast is active, on z's own device. (Where TF32 is
    switched on, as train.py does on a GPU, the one matrix product runs in TF32, whose 10-bit
    mantissa slightly blurs the distances of samples that lie very close together.)
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown dispersive variant {variant!r}; choose one of {VARIANTS}")
    B = z.shape[0]
    # Under autocast a matmul would run in bf16 / fp16; the exp of a distance needs fp32.
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.reshape(B, -1).float()
        if B < 2:  # nothing to disperse; keep z in the graph so callers can backprop
            return z.sum() * 0.0
        d = z.shape[1]
        if variant == "infonce_l2":
            logits = -pairwise_sq_dists(z) / (d * tau)
            return torch.logsumexp(logits.flatten(), dim=0) - 2.0 * math.log(B)
        if variant == "infonce_cos":
            zn = F.normalize(z, dim=1)
            logits = (zn @ zn.T) / tau                  # -D / tau with D = -cos
            return torch.logsumexp(logits.flatten(), dim=0) - 2.0 * math.log(B)
        if variant == "hinge":
            D = pairwise_sq_dists(z) / d
            off = ~torch.eye(B, dtype=torch.bool, device=z.device)
            return F.relu(margin - D[off]).pow(2).mean()
        # covariance
        zc = z - z.mean(dim=0, keepdim=True)
        zs = zc / (zc.pow(2).sum(dim=0, keepdim=True) / (B - 1) + 1e-8).sqrt()   # unit variance per feature
        gram = zs @ zs.T                                                          # (B, B)
        fro2 = gram.pow(2).sum() / (B - 1) ** 2          # ||C||_F^2 with C = zs^T zs / (B-1)
        diag = zs.pow(2).sum(dim=0) / (B - 1)            # C's diagonal, (d,)
        return (fro2 - diag.pow(2).sum()) / d


def mean_sq_dist(z):
    """Diagnostic: mean over pairs i != j of ||z_i - z_j||^2 / d, in float32."""
    B = z.shape[0]
    if B < 2:
        return z.new_zeros((), dtype=torch.float32)
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.reshape(B, -1).float()
        return pairwise_sq_dists(z).sum() / (B * (B - 1) * z.shape[1])


@torch.no_grad()
def representation_diagnostics(feats, variant="infonce_l2", tau=0.5):
    """Logged at every log step, for the baseline too: the dispersive loss of the regularised
    block(s) (whatever its weight) and their mean pairwise squared distance / d, averaged
    over the blocks. Returns a float32 tensor (2,)."""
    return torch.stack([torch.stack([dispersive_loss(f, variant, tau) for f in feats]).mean(),
                        torch.stack([mean_sq_dist(f) for f in feats]).mean()])


def training_losses(model, x, y, *, disp_weight=0.5, disp_tau=0.5, disp_blocks=(3,),
                    disp_variant="infonce_l2", null_label=None, p_uncond=0.1,
                    eps=None, t=None, drop=None, generator=None, return_feats=False):
    """One training step's loss terms for a batch x of data (B, C, H, W), labels y (B,).

    Noise eps, times t and the label-drop mask can be passed in (tests make them exact);
    otherwise they are drawn from `generator`. With null_label set (a class-conditional
    model), a share p_uncond of labels becomes the null class, once, here: that is what
    classifier-free guidance needs at sampling time. disp_blocks lists the blocks (from 1)
    whose outputs are dispersed; with several, the loss is their mean.

    Returns a dict: flow, disp, total (scalars), and with return_feats the block outputs.
    The dispersive term is only computed (and only costs anything) when disp_weight > 0.
    """
    B = x.shape[0]
    if eps is None:
        eps = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    if t is None:
        t = torch.rand(B, device=x.device, generator=generator)
    y, drop = drop_labels(y, null_label, p_uncond, drop, generator)

    xt = interpolate(x, eps, t)
    need_feats = disp_weight > 0 or return_feats
    out = model(xt, t, y, return_blocks=tuple(disp_blocks) if need_feats else ())
    pred, feats = out if need_feats else (out, [])
    flow = F.mse_loss(pred.float(), velocity_target(x, eps).float())
    return add_dispersive(flow=flow, objective=flow, feats=feats, disp_weight=disp_weight, disp_tau=disp_tau,
                          disp_variant=disp_variant, return_feats=return_feats)


def drop_labels(y, null_label, p_uncond, drop, generator):
    """Classifier-free guidance: a share p_uncond of labels becomes the null class (a given
    mask `drop`, or one drawn here). Returns the labels and the mask (None if nothing drops)."""
    if null_label is None or p_uncond <= 0:
        return y, None
    if drop is None:
        drop = torch.rand(y.shape[0], device=y.device, generator=generator) < p_uncond
    return torch.where(drop, torch.full_like(y, null_label), y), drop


def add_dispersive(flow, objective, feats, disp_weight, disp_tau, disp_variant, return_feats):
    """The loss dict: flow (logged), disp, total = objective + lambda * disp (and feats)."""
    if disp_weight > 0:
        disp = torch.stack([dispersive_loss(f, disp_variant, disp_tau) for f in feats]).mean()
    else:
        disp = flow.new_zeros(())
    losses = {"flow": flow, "disp": disp, "total": objective + disp_weight * disp}
    if return_feats:
        losses["feats"] = feats
    return losses


# ----------------------------------------------------------------------------------------
# MeanFlow (Geng, Deng, Bai, Kolter and He, 2025): one-step generation.
#
# The network u(x_t, t, r) predicts the AVERAGE velocity from time t to a later time r:
#     u(x_t, t, r) = 1/(r - t) * integral_t^r v(x_s, s) ds,   so   x_r = x_t + (r - t) u.
# Differentiating (r - t) u = integral_t^r v ds in t (r fixed) gives the MeanFlow identity
#     u(x_t, t, r) = v(x_t, t) + (r - t) * du/dt,   du/dt = v . grad_x u + d_t u,
# the total derivative along the trajectory (dx_t/dt = v). Training regresses u on the
# right-hand side with the network's own du/dt (one Jacobian-vector product, tangent (v, 1)
# for (x, t) and 0 for r) and the conditional velocity x - eps as v; the target is a
# constant (stop-gradient): no second derivatives. The conditional x - eps may stand in for
# the marginal velocity v(x_t, t) = E[x - eps | x_t], as in flow matching: the target is
# linear in v (as itself and as the JVP's tangent), so its average over the (x, eps) that
# lead to x_t is the true target, and a squared error is minimised by that average.
#
# Mapping from the paper's convention (t = 0 data, t = 1 noise, z_t = (1 - t) x + t eps,
# v = eps - x, jumps from t down to r <= t, z_r = z_t - (t - r) u) to ours (t = 0 noise,
# t = 1 data): our t is 1 - its t, our r is 1 - its r (so r >= t here), our v and u are
# minus its v and u. Its identity u = v - (t - r) du/dt becomes the one above; its time
# input (t, t - r) becomes (t, r - t), the jump's length, the same number in both.
# ----------------------------------------------------------------------------------------

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


def meanflow_losses(model, x, y, *, disp_weight=0.5, disp_tau=0.5, disp_blocks=(3,), disp_variant="infonce_l2",
                    null_label=None, p_uncond=0.1, eps=None, t=None, r=None, drop=None, generator=None,
                    return_feats=False, adaptive_p=1.0, adaptive_c=0.01, cfg_omega=1.0, cfg_kappa=0.0,
                    target_model=None, target_fn=meanflow_target, jvp_fp32=True, time_kwargs=None):
    """MeanFlow's counterpart of training_losses (same arguments and dict, plus r).

    The loss of a sample is w * ||u - u_tgt||^2 (summed over its elements), with the paper's
    adaptive weight w = 1 / (||u - u_tgt||^2 + c)^p, itself a constant (stop-gradient); p = 0
    is the plain squared error, p = 1 (default) roughly a relative error. c = 0.01 is the
    released JAX code's default. "flow" in the dict is the unweighted mean squared error per
    element, on flow matching's scale (equal to it when r = t; it is not expected to fall
    steadily, since the target moves with the network); "total" uses the weighted loss, which
    stays near 1 per sample with p = 1. The dispersive term is computed on the same forward
    pass, unchanged; note that lambda weighs it against this weighted loss, so the same lambda
    is not the same strength as under flow matching.

    target_model: the module the target is computed with (train.py passes the bare model:
    torch.func.jvp cannot go through DDP, and the target needs no gradient sync); target_fn:
    meanflow_target, or a torch.compile of it."""
    B = x.shape[0]
    if eps is None:
        eps = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    if (t is None) != (r is None):
        raise ValueError("give both t and r, or neither (they are drawn together)")
    if t is None:
        t, r = meanflow_times(B, generator, x.device, **(time_kwargs or {}))
    y, drop = drop_labels(y, null_label, p_uncond, drop, generator)

    xt = interpolate(x, eps, t)
    u_tgt = target_fn(target_model or model, xt, t, y, r, velocity_target(x, eps), drop=drop, null_label=null_label,
                      cfg_omega=cfg_omega, cfg_kappa=cfg_kappa, fp32=jvp_fp32)
    need_feats = disp_weight > 0 or return_feats
    out = model(xt, t, y, r=r, return_blocks=tuple(disp_blocks) if need_feats else ())
    u, feats = out if need_feats else (out, [])
    sq = (u.float() - u_tgt).pow(2).flatten(1).sum(dim=1)                # ||u - u_tgt||^2 per sample
    weighted = (sq / (sq.detach() + adaptive_c).pow(adaptive_p)).mean()
    flow = sq.mean() / x[0].numel()
    return add_dispersive(flow=flow, objective=weighted, feats=feats, disp_weight=disp_weight, disp_tau=disp_tau,
                          disp_variant=disp_variant, return_feats=return_feats)
