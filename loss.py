"""Losses: flow matching, and the dispersive regulariser on a block's hidden states.

Time convention, used everywhere in this project (as in SiT and METHOD.md):
    x_t = t * x + (1 - t) * eps,   eps ~ N(0, I),   t ~ U[0, 1]
t = 0 is pure noise, t = 1 is data, and the network regresses the velocity
    v = d x_t / dt = x - eps.
Sampling (sample.py) integrates dx/dt = v(x, t) from t = 0 to t = 1.
"""
import math

import torch
import torch.nn.functional as F

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
    if null_label is not None and p_uncond > 0:
        if drop is None:
            drop = torch.rand(B, device=x.device, generator=generator) < p_uncond
        y = torch.where(drop, torch.full_like(y, null_label), y)

    xt = interpolate(x, eps, t)
    need_feats = disp_weight > 0 or return_feats
    out = model(xt, t, y, return_blocks=tuple(disp_blocks) if need_feats else ())
    pred, feats = out if need_feats else (out, [])
    flow = F.mse_loss(pred.float(), velocity_target(x, eps).float())

    if disp_weight > 0:
        disp = torch.stack([dispersive_loss(f, disp_variant, disp_tau) for f in feats]).mean()
    else:
        disp = flow.new_zeros(())
    losses = {"flow": flow, "disp": disp, "total": flow + disp_weight * disp}
    if return_feats:
        losses["feats"] = feats
    return losses
