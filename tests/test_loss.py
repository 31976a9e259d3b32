import math

import pytest
import torch

from loss import (dispersive_loss, interpolate, mean_sq_dist, training_losses, velocity_target)


def infonce_l2_reference(z, tau):
    """The formula of METHOD.md as a direct double loop, in float64."""
    z = z.reshape(z.shape[0], -1).double()
    B, d = z.shape
    total = 0.0
    for i in range(B):
        for j in range(B):
            total += math.exp(-((z[i] - z[j]) ** 2).sum().item() / d / tau)
    return math.log(total / B ** 2)


@pytest.mark.parametrize("B", [2, 5, 16])
@pytest.mark.parametrize("shape", [(3,), (4, 16)])
@pytest.mark.parametrize("tau", [0.1, 0.5, 2.0])
def test_infonce_l2_matches_double_loop(B, shape, tau):
    g = torch.Generator().manual_seed(B * 100 + len(shape))
    z = torch.randn(B, *shape, generator=g) * 0.7
    got = dispersive_loss(z, "infonce_l2", tau).item()
    assert got == pytest.approx(infonce_l2_reference(z, tau), abs=1e-5)


def test_infonce_l2_bounds():
    torch.manual_seed(0)
    z = torch.randn(1, 8, 4)
    assert dispersive_loss(z).item() == 0.0                       # B = 1
    same = torch.randn(1, 32).repeat(6, 1)
    assert dispersive_loss(same).item() == pytest.approx(0.0, abs=1e-6)
    for seed in range(20):   # well separated; large norms, where a careless a.a + b.b - 2a.b drifts
        far = torch.randn(8, 64, generator=torch.Generator().manual_seed(seed)) * 100
        assert dispersive_loss(far).item() == pytest.approx(-math.log(8), abs=1e-6)


def test_batch_size_one_still_backprops():
    z = torch.randn(1, 10, requires_grad=True)
    dispersive_loss(z).backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("variant", ["infonce_l2", "infonce_cos", "hinge", "covariance"])
def test_order_invariant(variant):
    z = torch.randn(7, 3, 5)
    perm = torch.randperm(7)
    assert dispersive_loss(z[perm], variant).item() == pytest.approx(dispersive_loss(z, variant).item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("variant", ["infonce_l2", "infonce_cos", "hinge", "covariance"])
def test_bf16_autocast_finite(variant):
    lin = torch.nn.Linear(16, 32)
    x = torch.randn(8, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = lin(x)
        assert z.dtype == torch.bfloat16
        loss = dispersive_loss(z, variant)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in lin.parameters())


def test_gradient_step_disperses():
    z = (torch.randn(16, 32) * 0.3).requires_grad_()
    before = mean_sq_dist(z).item()
    dispersive_loss(z, tau=0.5).backward()
    with torch.no_grad():
        z -= 0.5 * z.grad
    assert mean_sq_dist(z).item() > before


def test_infonce_cos_hand_case():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])                    # cos matrix [[1, 0], [0, 1]]
    expected = math.log((2 * math.e + 2) / 4)
    assert dispersive_loss(z, "infonce_cos", tau=1.0).item() == pytest.approx(expected, abs=1e-6)
    expected_t = math.log((2 * math.exp(2) + 2) / 4)
    assert dispersive_loss(z, "infonce_cos", tau=0.5).item() == pytest.approx(expected_t, abs=1e-5)


def test_hinge_hand_case():
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0]])                    # D = 1 / 2 for both ordered pairs
    assert dispersive_loss(z, "hinge").item() == pytest.approx(0.25)          # (1 - 0.5)^2
    assert dispersive_loss(z, "hinge", margin=0.4).item() == 0.0
    z3 = torch.tensor([[0.0], [1.0], [3.0]])                       # D = 1, 9, 4 -> with margin 2: 1, 0, 0
    assert dispersive_loss(z3, "hinge", margin=2.0).item() == pytest.approx(2 * 1.0 / 6)


def test_covariance_hand_cases():
    # Uncorrelated columns: no off-diagonal covariance.
    z = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    assert dispersive_loss(z, "covariance").item() == pytest.approx(0.0, abs=1e-6)
    # Identical columns: correlation 1 in both off-diagonal entries -> 2 / d = 1.
    z = torch.tensor([[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]])
    assert dispersive_loss(z, "covariance").item() == pytest.approx(1.0, abs=1e-5)
    # Random case against the explicit d x d correlation matrix.
    z = torch.randn(6, 5, dtype=torch.float64)
    corr = torch.corrcoef(z.T)
    expected = ((corr ** 2).sum() - (corr.diag() ** 2).sum()) / 5
    assert dispersive_loss(z.float(), "covariance").item() == pytest.approx(expected.item(), rel=1e-4)


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown dispersive variant"):
        dispersive_loss(torch.randn(2, 3), "nope")


def test_flow_matching_endpoints_and_target():
    x, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    assert torch.equal(interpolate(x, eps, torch.zeros(4)), eps)          # t = 0: noise
    assert torch.equal(interpolate(x, eps, torch.ones(4)), x)             # t = 1: data
    t, h = torch.full((4,), 0.3, dtype=torch.float64), 1e-6
    xd, ed = x.double(), eps.double()
    fd = (interpolate(xd, ed, t + h) - interpolate(xd, ed, t)) / h
    assert torch.allclose(fd, velocity_target(xd, ed), atol=1e-6)


class Oracle(torch.nn.Module):
    """Returns the true velocity for a known (x, eps) pair; records the labels it saw."""

    def __init__(self, x, eps):
        super().__init__()
        self.v = x - eps
        self.seen = None

    def forward(self, xt, t, y, return_blocks=()):
        self.seen = y.clone()
        out = self.v.clone()
        return (out, [xt]) if return_blocks else out


def test_oracle_gets_zero_loss_and_labels_drop_once():
    x, eps, t = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4), torch.rand(4)
    model = Oracle(x, eps)
    y = torch.tensor([0, 1, 2, 3])
    drop = torch.tensor([True, False, True, False])
    losses = training_losses(model, x, y, disp_weight=0.0, null_label=10, eps=eps, t=t, drop=drop)
    assert losses["flow"].item() == 0.0 and losses["total"].item() == 0.0
    assert model.seen.tolist() == [10, 1, 10, 3]


def test_total_combines_terms():
    x, eps, t = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4), torch.rand(4)
    model = Oracle(x, eps + 0.1)
    losses = training_losses(model, x, torch.zeros(4, dtype=torch.long), disp_weight=0.25, eps=eps, t=t)
    assert losses["flow"].item() == pytest.approx(0.01, rel=1e-4)
    xt = interpolate(x, eps, t)
    assert losses["disp"].item() == pytest.approx(dispersive_loss(xt).item(), abs=1e-6)
    assert losses["total"].item() == pytest.approx(losses["flow"].item() + 0.25 * losses["disp"].item(), abs=1e-6)
