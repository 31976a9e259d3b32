import math

import pytest
import torch

from sample import euler, generate, heun, save_grid, velocity_fn


def test_constant_field_exact():
    x0 = torch.randn(3, 2)
    for solver in (euler, heun):
        assert torch.allclose(solver(lambda x, t: torch.full_like(x, 2.0), x0, 7), x0 + 2.0, atol=1e-6)


def test_time_dependent_field():
    # dx/dt = 3 t^2 -> x(1) = x0 + 1. Heun (the trapezoid rule) has error 1 / (2 n^2) here.
    x0 = torch.zeros(1, dtype=torch.float64)
    f = lambda x, t: torch.full_like(x, 3 * t * t)
    for n in (10, 40):
        assert heun(f, x0, n).item() == pytest.approx(1 + 1 / (2 * n * n), abs=1e-12)
        # Euler is the left Riemann sum: (n-1)(2n-1) / (2 n^2)
        assert euler(f, x0, n).item() == pytest.approx((n - 1) * (2 * n - 1) / (2 * n * n), abs=1e-12)


def test_linear_field_reaches_analytic_answer_with_right_order():
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    f = lambda x, t: -1.5 * x                                    # x(1) = x0 exp(-1.5)
    exact = x0 * math.exp(-1.5)
    err = lambda solver, n: (solver(f, x0, n) - exact).abs().max().item()
    assert err(euler, 1000) < 1e-3 and err(heun, 100) < 1e-4
    assert err(euler, 100) / err(euler, 200) == pytest.approx(2.0, rel=0.05)    # first order
    assert err(heun, 100) / err(heun, 200) == pytest.approx(4.0, rel=0.05)      # second order


def test_time_grid_ends_exactly_at_one():
    seen = []
    euler(lambda x, t: seen.append(t) or torch.zeros_like(x), torch.zeros(1), 1000)
    assert seen[0] == 0.0 and len(seen) == 1000
    assert seen[-1] + 1 / 1000 == pytest.approx(1.0, abs=1e-15)


class Linear(torch.nn.Module):
    """v = x * (1 + label): the conditional and null predictions differ in a known way."""
    num_classes, in_channels, image_size = 5, 1, 4

    def forward(self, x, t, y):
        return x * (1 + y.float().view(-1, 1, 1, 1))


def test_guidance():
    model, x, y = Linear(), torch.randn(3, 1, 4, 4), torch.tensor([0, 1, 2])
    cond = model(x, torch.zeros(3), y)
    assert torch.equal(velocity_fn(model, y, 1.0)(x, 0.5), cond)              # scale 1: conditional
    null = model(x, torch.zeros(3), torch.full_like(y, 5))
    assert torch.allclose(velocity_fn(model, y, 3.0)(x, 0.5), null + 3.0 * (cond - null), atol=1e-6)


def test_generate_and_grid(tmp_path):
    from PIL import Image
    imgs = generate(Linear(), torch.tensor([0, 1, 2, 3, 4]), steps=3, generator=torch.Generator().manual_seed(0))
    assert imgs.shape == (5, 1, 4, 4) and imgs.dtype == torch.uint8
    save_grid(imgs, tmp_path / "g.png", nrow=2)
    assert Image.open(tmp_path / "g.png").size == (2 * 6 + 2, 3 * 6 + 2)
