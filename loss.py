"""The method: flow matching plus the dispersive loss on the hidden states of one block.

Time convention, used everywhere in this project (as in SiT):
    x_t = t * x + (1 - t) * eps,   eps ~ N(0, I),   t ~ U[0, 1]
t = 0 is pure noise, t = 1 is data, and the network regresses the velocity
    v = d x_t / dt = x - eps.
Sampling (sample.py) integrates dx/dt = v(x, t) from t = 0 to t = 1.

    L = mean over all elements of (v_theta(x_t, t, y) - v)^2  +  lambda * L_disp(block-k outputs)

(a per-element mean, as SiT's mean_flat: lambda = 0.5 is weighed against that scale).

An objective is a small class built once and called once per training step, as in EDM's
training/loss.py: objective(net, x, y, draws) returns the loss terms {flow, disp, total} (and
the block outputs it asked the network for). FlowMatching (the paper's, i.e. SiT's) is below;
the others (MeanFlow, DiT's diffusion, the paired contrastive comparison) live in files of
their own, subclass it, and are listed in objectives.py.
"""
import math

import torch
import torch.nn.functional as F

from model import DiT
from utils import UserError

VARIANTS = ("infonce_l2", "infonce_cos", "hinge", "covariance")
USES_TAU = ("infonce_l2", "infonce_cos")         # the variants whose value depends on tau (train.py
                                                 # refuses --disp-tau for the others; ab.py and plots.py
                                                 # name runs and sweep tau by it)


# ----------------------------------------------------------------------------------------
# The dispersive loss
# ----------------------------------------------------------------------------------------

def pairwise_sq_dists(z):
    """(..., B, d) -> (..., B, B) squared Euclidean distances from one matrix product, the Gram
    matrix G = z z^T: ||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b, the squared norms being G's
    diagonal. The subtraction cancels badly for vectors with large norms, so the diagonal
    (exactly 0) is set by hand and the rest clamped at 0. (The released code used F.pdist: a
    sqrt then a square, float32-only on CUDA and without tensor cores.)"""
    gram = z @ z.transpose(-1, -2)
    # The norms ||a||^2, ||b||^2 come from G itself, not from a pass of their own over z (z * z,
    # summed): one pass over the block output fewer, forward and backward, 41% less time for the
    # term on one CPU thread (S/2's block, batch 256). Under TF32 all three terms then share one
    # rounding of z.
    sq = gram.diagonal(dim1=-2, dim2=-1)
    d2 = (sq[..., :, None] + sq[..., None, :] - 2.0 * gram).clamp_min(0.0)
    return d2 * (1.0 - torch.eye(z.shape[-2], device=z.device, dtype=z.dtype))


def dispersive_loss(z, variant="infonce_l2", tau=0.5, margin=1.0, group_size=0):
    """Dispersive loss of a batch of hidden states z: (B, ...), each sample flattened to a
    vector of length d (all tokens together; no pooling, no normalisation, no projection).

    infonce_l2  (the paper's default) log( 1/B^2 * sum_{i,j} exp(-||z_i - z_j||^2 / (d * tau)) )
                over all B*B ordered pairs, the diagonal included: the value lies in
                [-log B, 0] and is exactly 0 for B = 1.
    infonce_cos the same log-mean-exp with D = -cos(z_i, z_j); diagonal included (cos = 1),
                so the value is at most 1/tau, and at least log((e^(1/tau) + (B-1)
                e^(-1/((B-1) tau))) / B), reached when the B directions form a regular simplex.
    hinge       mean over the B*(B-1) pairs i != j of max(0, margin - ||z_i - z_j||^2 / d)^2.
                The diagonal is left out: D(z_i, z_i) = 0 would add the constant margin^2
                and no gradient. margin is ours to choose (the paper gives none): 1.0, half
                the D of two independent unit-variance vectors, which is 2.
    covariance  sum of squared off-diagonal entries of the d x d covariance of the batch
                features, each feature standardised over the batch first (so the entries
                are correlations), divided by d as VICReg does. With d > B (always, here)
                the correlations have rank <= B - 1 and trace d (when no feature is constant
                within the group), so the value cannot fall below d / (B - 1) - 1 (about
                6,550 for S/2's block, d = 98,304, B = 16):
                compare its changes, not its size, with the other variants. The d x d matrix
                is never formed: its squared Frobenius norm equals that of the B x B Gram
                matrix of the samples.

    group_size G > 0: the loss is computed within consecutive groups of G samples and averaged
    over the groups, B above being G. Consecutive groups are random groups: every batch is a
    slice of a random permutation of the data (data.Batches), as each device's share is. The
    default here, 0, is one group of the whole batch; training uses groups of 16 (Dispersive).
    The paper computed it per device with no gather, and its runs had 16 samples per device
    (256 on 16 devices; the released PyTorch code 32): a batch of 256 dispersed as one group is
    a different loss (floor -log 256 instead of -log 16).

    Always computed in float32, whatever autocast is active, on z's own device. (Where TF32 is
    switched on, as train.py does on a GPU, the one matrix product runs in TF32, whose 10-bit
    mantissa slightly blurs the distances of samples that lie very close together.)
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown dispersive variant {variant!r}; choose one of {VARIANTS}")
    B = z.shape[0]
    G = group_size or B
    if B % G:
        raise ValueError(f"the dispersive group size {G} does not divide the batch of {B}")
    # Under autocast a matmul would run in bf16 / fp16; the exp of a distance needs fp32.
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.reshape(B // G, G, -1).float()                        # (groups, G, d)
        if G < 2:  # nothing to disperse: 0 for every variant; z stays in the graph so callers can backprop
            return z.sum() * 0.0
        d = z.shape[-1]
        if variant == "infonce_l2":   # distances per dimension (/ d): tau means the same at any size
            logits = -pairwise_sq_dists(z) / (d * tau)
            # logsumexp - log G^2: the log of the mean of exp over the G^2 pairs, with no overflow
            per_group = torch.logsumexp(logits.flatten(1), dim=1) - 2.0 * math.log(G)
        elif variant == "infonce_cos":
            zn = F.normalize(z, dim=-1)
            logits = (zn @ zn.transpose(1, 2)) / tau               # -D / tau with D = -cos
            per_group = torch.logsumexp(logits.flatten(1), dim=1) - 2.0 * math.log(G)
        elif variant == "hinge":
            D = pairwise_sq_dists(z) / d
            off = ~torch.eye(G, dtype=torch.bool, device=z.device)
            per_group = F.relu(margin - D[:, off]).pow(2).mean(dim=1)
        elif variant == "covariance":
            zc = z - z.mean(dim=1, keepdim=True)
            zs = zc / (zc.pow(2).sum(dim=1, keepdim=True) / (G - 1) + 1e-8).sqrt()   # unit variance per feature
            gram = zs @ zs.transpose(1, 2)                                           # (groups, G, G)
            fro2 = gram.pow(2).sum(dim=(1, 2)) / (G - 1) ** 2    # ||C||_F^2 with C = zs^T zs / (G-1)
            diag = zs.pow(2).sum(dim=1) / (G - 1)                # C's diagonal, (groups, d)
            per_group = (fro2 - diag.pow(2).sum(dim=1)) / d
        else:   # a fork's new name in VARIANTS, still without its formula
            raise NotImplementedError(f"dispersive variant {variant!r} is listed in VARIANTS but has no formula here")
        return per_group.mean()


class Dispersive:
    """The regulariser as the objectives use it: the dispersive loss of the chosen blocks'
    outputs (their mean, with several blocks), unweighted; the objective multiplies it by
    `weight` (lambda). weight 0 is the baseline: the objective then skips the term
    (FlowMatching.__call__). The defaults are the paper's (block 3 = depth // 4 of the 12-block
    S and B models; from_args takes the flags)."""

    def __init__(self, weight=0.5, tau=0.5, blocks=(3,), variant="infonce_l2", group_size=16):
        if variant not in VARIANTS:
            raise ValueError(f"unknown dispersive variant {variant!r}; choose one of {VARIANTS}")
        self.weight, self.tau, self.blocks = weight, tau, tuple(blocks)
        self.variant, self.group_size = variant, group_size

    @classmethod
    def from_args(cls, args, depth):
        return cls(args.disp_weight, args.disp_tau, parse_blocks(args.disp_block, depth), args.disp_variant,
                   args.disp_group_size)

    def blocks_needed(self, extra_blocks=()):
        """Block numbers the forward pass must return: ours (when the term is on) and extra_blocks."""
        return tuple(sorted(set(extra_blocks) | (set(self.blocks) if self.weight > 0 else set())))

    def __call__(self, outputs):
        """outputs: {block number: output}, as DiT.forward(..., return_blocks=...) returns them."""
        return torch.stack([dispersive_loss(outputs[b], self.variant, self.tau, group_size=self.group_size)
                            for b in self.blocks]).mean()


def parse_blocks(spec, depth):
    """--disp-block -> a tuple of block numbers in [1, depth]; the paper's default is depth // 4."""
    if spec is None:
        return (max(1, depth // 4),)
    if spec == "last":
        return (depth,)
    if spec == "all":
        return tuple(range(1, depth + 1))
    try:
        listed = [int(s) for s in spec.split(",")]
    except ValueError:
        raise UserError(f"--disp-block {spec!r}: expected N, N,M,..., 'last' or 'all'") from None
    blocks = tuple(sorted(set(listed)))
    if len(blocks) < len(listed):       # a block named twice is still one term, not one of twice the weight
        raise UserError(f"--disp-block {spec!r} names a block twice")
    if not all(1 <= b <= depth for b in blocks):
        raise UserError(f"--disp-block {spec!r} is out of range: this model has blocks 1..{depth}")
    return blocks


@torch.no_grad()
def block_stats(z):
    """Diagnostics of one block's outputs (B, ...) flattened to length d, in float32: the mean over
    pairs i != j of ||z_i - z_j||^2 / d (how dispersed), and the mean over i of ||z_i|| / sqrt(d)
    (the root-mean-square activation: the residual stream's growth)."""
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.reshape(z.shape[0], -1).float()
        B, d = z.shape
        dist = pairwise_sq_dists(z).sum() / (B * (B - 1) * d) if B > 1 else z.new_zeros(())
        return dist, (z.norm(dim=1) / math.sqrt(d)).mean()


# ----------------------------------------------------------------------------------------
# Flow matching, the paper's objective
# ----------------------------------------------------------------------------------------

def interpolate(x, eps, t):
    """x_t for a batch; t: (B,) broadcast over the other dimensions."""
    t = t.view(-1, *([1] * (x.dim() - 1)))
    return t * x + (1 - t) * eps


def drop_labels(y, drop, null_label):
    """Classifier-free guidance: where drop is True the label becomes the null class, once,
    here (sampling mixes the conditional and null predictions)."""
    if null_label is None or drop is None:
        return y
    return torch.where(drop, torch.full_like(y, null_label), y)


class FlowMatching:
    """Flow matching (SiT) plus the dispersive loss: the objective of the paper's tables.

    The attributes and methods at the end of the class tell train.py, sample.py and bench.py how
    to use an objective; the other objectives (objectives.py) subclass this one and change what
    differs (and `noised`, below)."""

    def __init__(self, reg, null_label=None, p_uncond=0.1):
        self.reg, self.null_label, self.p_uncond = reg, null_label, p_uncond

    def draw(self, gen, shape):
        """The step's random draws for a batch of images of `shape`: noise, times and label drops.
        data.Batches draws them for the whole global batch and gives each GPU its slice."""
        B, device = shape[0], gen.device
        return {"eps": torch.randn(shape, device=device, generator=gen),
                "t": torch.rand(B, device=device, generator=gen),
                "drop": torch.rand(B, device=device, generator=gen) < self.p_uncond}

    noised = staticmethod(interpolate)    # x_t from x, eps, t (probe.py uses it too; diffusion.py overrides it)

    def inputs(self, x, y, draws):
        """The network's inputs (x_t, t, labels with the dropped ones made null) and its target."""
        eps, t = draws["eps"], draws["t"]
        return self.noised(x, eps, t), t, drop_labels(y, draws["drop"], self.null_label), x - eps

    def __call__(self, net, x, y, draws, extra_blocks=()):
        """Loss terms of a batch x (B, C, H, W) with labels y and its slice of draw(). Returns
        {flow, disp, total, blocks}: blocks holds the outputs of the regularised blocks (when the
        weight is > 0; the baseline asks for none) and of extra_blocks (train.py asks for all of
        them at log steps, for its diagnostics, and under --compile at every step:
        train.blocks_to_return)."""
        xt, t, y, target = self.inputs(x, y, draws)
        pred, blocks = net(xt, t, y, return_blocks=self.reg.blocks_needed(extra_blocks))
        flow = F.mse_loss(pred.float(), target.float())
        disp = self.reg(blocks) if self.reg.weight > 0 else torch.zeros_like(flow)   # the baseline: nothing to compute
        return {"flow": flow, "disp": disp, "total": flow + self.reg.weight * disp, "blocks": blocks}

    # What train.py, sample.py and bench.py read from an objective (the subclasses change these)
    model_class = DiT                      # the network it trains
    views = 1                              # forward passes per image: --batch-size counts passes, so a
                                           # batch holds batch_size // views images (contrastive.py: 2)
    min_group = 1                          # the fewest forward passes a group may hold (contrastive.py: 4)
    solvers = ("euler", "heun", "dopri5")  # sample.py's solvers that fit its model; the first is the default
    solver_fns = {}                        # solvers of its own, by name (MeanFlow's jumps, DDIM)
    sample_steps = 50                      # default solver steps
    flops_per_forward_mac = 6              # training FLOPs per image / forward MACs per image, for bench.py's
                                           # MFU: 2 FLOPs per multiply-add, x 3 for forward + backward

    @classmethod
    def add_args(cls, parser):
        """Flags of this objective alone (none for flow matching): a list of argparse actions."""
        return []

    @classmethod
    def from_args(cls, args, model, null_label):
        return cls(Dispersive.from_args(args, model.depth), null_label, args.p_uncond)

    @staticmethod
    def sampling_note(train_args, cfg_scale):
        """A warning for sample.py about sampling such a model with these settings, or None."""
        return None
