"""The paired contrastive counterparts (contrastive.py) against hand-computed cases and a
float64 double loop, and the two-view objective at equal compute."""
import math

import pytest
import torch

import train
from conftest import read_jsonl, tiny_args
from contrastive import Contrastive, PairedContrastive, contrastive_loss
from loss import dispersive_loss
from utils import UserError


def infonce_reference(z, tau, sim):
    """InfoNCE for interleaved views (rows 2i, 2i+1 are a pair) as a double loop, in float64."""
    z = z.reshape(z.shape[0], -1).double()
    B, total = z.shape[0], 0.0
    for i in range(B):
        s = [sim(z[i], z[j]) / tau for j in range(B)]
        total += -s[i ^ 1] + math.log(sum(math.exp(s[j]) for j in range(B) if j != i))
    return total / B


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_infonce_matches_double_loop(tau):
    z = torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(0))
    l2 = lambda a, b: -((a - b) ** 2).sum().item() / a.numel()
    cos = lambda a, b: (a @ b / a.norm() / b.norm()).item()
    assert contrastive_loss(z, "infonce_l2", tau).item() == pytest.approx(infonce_reference(z, tau, l2), abs=1e-5)
    assert contrastive_loss(z, "infonce_cos", tau).item() == pytest.approx(infonce_reference(z, tau, cos), abs=1e-5)


def test_hand_cases():
    # two images, positives identical, negatives at D = 1 (d = 1)
    z = torch.tensor([[0.0], [0.0], [1.0], [1.0]])
    assert contrastive_loss(z, "infonce_l2", tau=1.0).item() == pytest.approx(math.log(1 + 2 / math.e), abs=1e-6)
    assert contrastive_loss(z, "hinge", margin=2.0).item() == pytest.approx(1.0)      # (2 - 1)^2, no alignment cost
    # a pair that disagrees costs its alignment D (views 0 and 1 are 1 apart): mean over views (1 + 1 + 0 + 0) / 4
    z = torch.tensor([[0.0], [1.0], [3.0], [3.0]])
    assert contrastive_loss(z, "hinge", margin=2.0).item() == pytest.approx(0.5)     # negatives all at D >= 4
    # covariance: the dispersive covariance term plus the same alignment. With d = 1 that term is 0
    # (one feature has no off-diagonal), so the check takes d = 3, where the term is the features'
    # correlations squared, off the diagonal, over d (numpy's corrcoef as the reference)
    z3 = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 2.0, 0.0], [2.0, 2.0, 3.0]])
    cov = (torch.corrcoef(z3.T).pow(2).sum() - 3) / 3
    assert cov.item() > 0.5
    assert dispersive_loss(z3, "covariance").item() == pytest.approx(cov.item(), abs=1e-5)
    align = (1 / 3 + 1 / 3 + 3 + 3) / 4        # D of pair (0, 1) is 1/3, of pair (2, 3) 9/3, each counted twice
    assert contrastive_loss(z3, "covariance").item() == pytest.approx(cov.item() + align, abs=1e-5)


def test_a_group_must_hold_two_images():
    # one image's two views have no negative: InfoNCE would be exactly 0 and hinge's mean empty (NaN)
    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    for variant in ("infonce_l2", "hinge"):
        with pytest.raises(ValueError, match="at least 4"):
            contrastive_loss(z, variant, group_size=2)
        with pytest.raises(ValueError, match="at least 4"):
            contrastive_loss(z[:2], variant)


def test_alignment_pulls_pairs_together_and_groups_hold_pairs():
    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)).requires_grad_()
    contrastive_loss(z, "infonce_l2", group_size=4).backward()
    pair_gap = lambda w: (w[0::2] - w[1::2]).pow(2).sum().item()
    assert pair_gap(z - 0.5 * z.grad) < pair_gap(z)                 # one step draws the positives together
    per_group = [contrastive_loss(z[i:i + 4].detach(), "hinge").item() for i in (0, 4)]
    assert contrastive_loss(z.detach(), "hinge", group_size=4).item() == pytest.approx(sum(per_group) / 2)
    with pytest.raises(ValueError, match="even"):
        contrastive_loss(z, group_size=3)


class Recorder(torch.nn.Module):
    def forward(self, xt, t, y, return_blocks=None):
        self.xt, self.t, self.y = xt, t, y
        return torch.zeros_like(xt), {b: xt for b in return_blocks}


@pytest.mark.parametrize("same_t", [True, False])
def test_two_views_per_image_at_equal_compute(same_t):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 1, 2, 2, generator=g), torch.tensor([0, 1, 2])
    objective = PairedContrastive(Contrastive(weight=0.5, blocks=(1,), group_size=6), null_label=9, same_t=same_t)
    noise = objective.draw(g, x.shape)                               # drawn per image
    noise["drop"] = torch.tensor([False, True, False])
    net = Recorder()
    losses = objective(net, x, y, noise)
    assert net.xt.shape == (6, 1, 2, 2) and net.y.tolist() == [0, 0, 9, 9, 2, 2]    # 3 images x 2 views
    assert torch.equal(net.t[0::2], net.t[1::2]) == same_t
    eps = noise["eps"].flatten(0, 1)
    x2 = x.repeat_interleave(2, 0)
    t4 = net.t.view(-1, 1, 1, 1)
    assert torch.allclose(net.xt, t4 * x2 + (1 - t4) * eps)
    assert not torch.equal(net.xt[0], net.xt[1])                     # the two views differ in noise
    assert losses["flow"].item() == pytest.approx((x2 - eps).pow(2).mean().item(), rel=1e-6)   # the net predicts 0
    assert losses["disp"].item() == pytest.approx(contrastive_loss(net.xt).item(), rel=1e-6)
    assert losses["disp"].item() != pytest.approx(dispersive_loss(net.xt).item())


def test_cli_trains_both_views(image_folder, tmp_path):
    out = tmp_path / "c"
    train.main(tiny_args(image_folder, out, "--steps", "2", "--objective", "contrastive", "--pair-t", "independent"))
    rec = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "train"][-1]
    assert rec["disp"] > 0 and math.isfinite(rec["flow"])           # InfoNCE is positive, unlike its dispersive form
    with pytest.raises(Exception, match="--pair-t: flags of --objective contrastive"):
        train.main(tiny_args(image_folder, tmp_path / "x", "--steps", "1", "--pair-t", "independent"))
    with pytest.raises(Exception, match="even"):
        train.main(tiny_args(image_folder, tmp_path / "y", "--steps", "1", "--objective", "contrastive",
                             "--disp-group-size", "1"))
    # one image's two views, as --disp-group-size 2 or as whole-micro-batch groups (size 0): refused
    # before training, not at step 1
    with pytest.raises(UserError, match="needs groups of at least 4 forward passes; these hold 2"):
        train.main(tiny_args(image_folder, tmp_path / "z", "--steps", "1", "--objective", "contrastive",
                             "--disp-group-size", "2"))
    with pytest.raises(UserError, match="needs groups of at least 4 forward passes; these hold 2"):
        train.main(tiny_args(image_folder, tmp_path / "z", "--steps", "1", "--objective", "contrastive",
                             "--disp-group-size", "0", "--accum-steps", "4"))
    assert not (tmp_path / "z").exists()
