"""The paper's central comparison: contrastive losses with positive pairs, the counterparts of
the four dispersive variants. "Dispersive Loss consistently outperforms the corresponding
contrastive losses while avoiding dual-view sampling"; this file lets the A/B check that.

    python train.py --objective contrastive --disp-weight 0.5 --disp-variant infonce_l2
    python ab.py --arms baseline,dispersive,contrastive ...

Each image is noised twice (two views) and both views pass the model in one batch; the
positive of a view is the other view of its image, the negatives are the views of the other
images. Choices the paper leaves open, made here:
- Equal compute: --batch-size counts views, so a batch is B/2 images x 2 views and costs the
  same forward and backward passes as a dispersive run at batch B (it sees half the images).
- The two views share the time t and differ in their noise (--pair-t same, default): the pair
  then differs only by the noise draw, the analogue of two augmentations of one image; with
  independent times one view may be nearly pure noise, and pulling its representation onto a
  clean view's asks for something no denoiser can give. --pair-t independent is the other choice.
- Both views share the label drop (classifier-free guidance), so a pair has one conditioning.
- The flow loss is the mean over all views, exactly as for a batch of B images.
- The views of image i are rows 2i and 2i + 1, so groups of --disp-group-size views (even) hold
  whole pairs.
"""

import torch
import torch.nn.functional as F

from loss import VARIANTS, Dispersive, FlowMatching, dispersive_loss, drop_labels, interpolate, pairwise_sq_dists
from utils import UserError


def contrastive_loss(z, variant="infonce_l2", tau=0.5, margin=1.0, group_size=0):
    """The contrastive counterpart of loss.dispersive_loss for views z: (2n, ...), rows 2i and
    2i + 1 being the two views of image i; D(z_i, z_j) = ||z_i - z_j||^2 / d as there.

    infonce_l2  InfoNCE (as SimCLR's NT-Xent) with similarity -D / tau: for each view i,
                -log( exp(-D(i, p) / tau) / sum_{j != i} exp(-D(i, j) / tau) ), p its positive,
                averaged over the views. Unlike the dispersive form, a view is not compared
                with itself.
    infonce_cos the same with similarity cos(z_i, z_j) / tau.
    hinge       the dispersive hinge over negative pairs only (pairs of different images),
                max(0, margin - D)^2 averaged, plus the alignment term: D(i, p) averaged over
                the views (the alignment of Wang and Isola, 2020, with its exponent 2).
    covariance  the dispersive covariance term of all the views, plus the same alignment term
                (VICReg's invariance term: the mean squared distance between the two views).
    group_size G > 0 (even, >= 4): computed within consecutive groups of G views and averaged."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown contrastive variant {variant!r}; choose one of {VARIANTS}")
    B = z.shape[0]
    G = group_size or B
    if B % G or G % 2 or G < 4:     # a group of one image's two views holds no negative
        raise ValueError(f"the group size {G} must be even, at least 4 (two images) and divide the batch of {B} views")
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.reshape(B // G, G, -1).float()                              # (groups, G, d)
        d = z.shape[-1]
        eye = torch.eye(G, dtype=torch.bool, device=z.device)
        pos = torch.arange(G, device=z.device) ^ 1                        # the other view: 0<->1, 2<->3, ...
        D = pairwise_sq_dists(z) / d                                      # (groups, G, G)
        if variant in ("infonce_l2", "infonce_cos"):
            if variant == "infonce_l2":
                sim = -D / tau
            else:
                zn = F.normalize(z, dim=-1)
                sim = (zn @ zn.transpose(1, 2)) / tau
            sim = sim.masked_fill(eye, float("-inf"))                     # j != i
            return (torch.logsumexp(sim, dim=2) - sim[:, torch.arange(G), pos]).mean()
        align = D[:, torch.arange(G), pos].mean()
        if variant == "hinge":
            negative = ~(eye | F.one_hot(pos, G).bool())
            return F.relu(margin - D[:, negative]).pow(2).mean() + align
        if variant == "covariance":
            return dispersive_loss(z.flatten(0, 1), "covariance", group_size=G) + align
        raise NotImplementedError(f"variant {variant!r} has no contrastive counterpart here")


class Contrastive(Dispersive):
    """The regulariser of this comparison, with the dispersive one's settings and interface."""

    def __call__(self, outputs):
        return torch.stack([contrastive_loss(outputs[b], self.variant, self.tau, group_size=self.group_size)
                            for b in self.blocks]).mean()


def pair_up(x):
    """(n, ...) -> (2n, ...): each image twice, as rows 2i and 2i + 1."""
    return x.repeat_interleave(2, dim=0)


class PairedContrastive(FlowMatching):
    """Flow matching on two views of each image + lambda * the contrastive loss of --disp-variant."""
    views = 2
    min_group = 4           # two images' pairs: one image's pair alone has no negative

    def __init__(self, reg, null_label=None, p_uncond=0.1, same_t=True):
        super().__init__(reg, null_label, p_uncond)
        self.same_t = same_t

    @classmethod
    def add_args(cls, parser):
        g = parser.add_argument_group("the contrastive comparison (--objective contrastive; contrastive.py)")
        return [g.add_argument("--pair-t", default="same", choices=("same", "independent"),
                               help="whether an image's two views share the time t (and differ in noise only)")]

    @classmethod
    def from_args(cls, args, model, null_label):
        if args.disp_group_size % 2:        # too small a group (min_group) is train.build's to refuse
            raise UserError(f"--disp-group-size {args.disp_group_size}: groups must hold whole pairs of views (even)")
        reg = Contrastive(args.disp_weight, args.disp_tau, Dispersive.from_args(args, model.depth).blocks,
                          args.disp_variant, args.disp_group_size)
        return cls(reg, null_label, args.p_uncond, same_t=args.pair_t == "same")

    def draw(self, gen, shape):
        """For n images: noise for 2n views, a time per image (or per view) and a drop per image."""
        n, device = shape[0], gen.device
        return {"eps": torch.randn((n, 2, *shape[1:]), device=device, generator=gen),
                "t": torch.rand((n,) if self.same_t else (n, 2), device=device, generator=gen),
                "drop": torch.rand(n, device=device, generator=gen) < self.p_uncond}

    def inputs(self, x, y, draws):
        """Flow matching's inputs and target for the 2n views of the n images."""
        x, y = pair_up(x), pair_up(drop_labels(y, draws["drop"], self.null_label))
        eps = draws["eps"].flatten(0, 1)
        t = pair_up(draws["t"]) if draws["t"].dim() == 1 else draws["t"].flatten()
        return interpolate(x, eps, t), t, y, x - eps
