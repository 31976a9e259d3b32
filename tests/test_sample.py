"""The samplers against closed forms: fixed-step solvers and their orders, dopri5 (SiT's), the
time grid, classifier-free guidance, grids."""
import math

import pytest
import torch

from sample import dopri5, euler, generate, generate_many, guided, heun, sampler, save_grid


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


def test_dopri5_meets_its_tolerance_on_known_fields():
    pytest.importorskip("torchdiffeq")
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    nfe = {"n": 0}

    def f(x, t):
        nfe["n"] += 1
        return -1.5 * x + math.sin(6 * t)                          # x(1) in closed form below
    # x' = -a x + sin(w t): x(1) = x0 e^-a + (a sin w - w cos w + w e^-a) / (a^2 + w^2)
    a, w = 1.5, 6.0
    exact = x0 * math.exp(-a) + (a * math.sin(w) - w * math.cos(w) + w * math.exp(-a)) / (a * a + w * w)
    loose = dopri5(f, x0, atol=1e-6, rtol=1e-3)
    n_loose = nfe["n"]
    nfe["n"] = 0
    tight = dopri5(f, x0, atol=1e-10, rtol=1e-10)
    assert (loose - exact).abs().max() < 1e-3                   # SiT's tolerances
    assert (tight - exact).abs().max() < 1e-8 and nfe["n"] > n_loose   # tighter costs more evaluations
    # the model is asked about float times from 0 to 1, never beyond (the last step ends at 1)
    seen = []
    dopri5(lambda x, t: seen.append(t) or torch.ones_like(x), torch.zeros(2))
    assert seen[0] == 0.0 and 1 - 1e-6 < max(seen) <= 1.0 and all(isinstance(t, float) for t in seen)


def test_time_grid_ends_exactly_at_one():
    seen = []
    euler(lambda x, t: seen.append(t) or torch.zeros_like(x), torch.zeros(1), 1000)
    assert seen[0] == 0.0 and len(seen) == 1000
    assert seen[-1] + 1 / 1000 == pytest.approx(1.0, abs=1e-15)


class Stub(torch.nn.Module):
    """4 channels, like SD-VAE latents, whose output depends on the channel, on t and on the
    label: v[c] = (c + 1) * (1 + y) * x[c] + t. DiT's code guided only 3 of the 4 channels;
    a sampler that passed the wrong t or guided some channels only would differ from the formula."""
    num_classes, in_channels, image_size = 5, 4, 2

    def forward(self, x, t, y, r=None):
        c = torch.arange(1, 5, dtype=x.dtype).view(1, 4, 1, 1)
        out = c * (1 + y.to(x.dtype).view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1)
        return out if r is None else out + 10 * r.view(-1, 1, 1, 1)     # MeanFlow's r shifts it


def test_guidance_on_every_channel_with_the_right_t_and_r():
    model, x, y = Stub(), torch.randn(3, 4, 2, 2), torch.tensor([0, 1, 2])
    c = torch.arange(1, 5, dtype=x.dtype).view(1, 4, 1, 1)
    for t in (0.0, 0.3, 0.9):
        cond = c * (1 + y.view(-1, 1, 1, 1)) * x + t
        null = c * 6 * x + t                                        # label 5, the null class
        assert torch.equal(guided(model, y, 1.0)(x, t), cond)                  # scale 1: conditional only
        expected = null + 3.0 * (cond - null)
        torch.testing.assert_close(guided(model, y, 3.0)(x, t), expected, rtol=1e-6, atol=1e-6)
        # with MeanFlow's r both halves get it, and the guidance formula is unchanged
        torch.testing.assert_close(guided(model, y, 3.0)(x, t, r=0.95), expected + 10 * 0.95, rtol=1e-6, atol=1e-5)
    counter = {}
    guided(model, y, 2.0, counter)(x, 0.5)
    assert counter["nfe"] == 1                                     # one batched evaluation, both halves


def test_sampler_defaults_and_refusals():
    from utils import UserError
    assert sampler("flow")[1:] == ("euler", 50) and sampler("flow", "heun", 7)[1:] == ("heun", 7)
    with pytest.raises(UserError, match="flow models are sampled with euler, heun, dopri5"):
        sampler("flow", "meanflow")
    with pytest.raises(UserError, match="dopri5 chooses its own steps"):     # refused before torchdiffeq is looked for
        sampler("flow", "dopri5", 7)


def test_dopri5_is_taken_when_torchdiffeq_is_installed():
    pytest.importorskip("torchdiffeq")       # optional: without it, sampler() refuses dopri5 (tests/test_fid.py)
    assert sampler("flow", "dopri5")[1:] == ("dopri5", None)      # adaptive: no step count to record


def test_generate_and_grid(tmp_path):
    from PIL import Image
    imgs = generate(Stub(), torch.tensor([0, 1, 2, 3, 4]), euler, 3, generator=torch.Generator().manual_seed(0))
    assert imgs.shape == (5, 4, 2, 2) and imgs.dtype == torch.uint8
    one_channel = imgs[:, :1]
    save_grid(one_channel, tmp_path / "g.png", nrow=2)
    grid = Image.open(tmp_path / "g.png")
    assert grid.size == (2 * 4 + 2, 3 * 4 + 2)                     # 2-pixel borders around 2 x 2 images
    assert grid.getpixel((2, 2))[0] == one_channel[0, 0, 0, 0].item()   # image 0's top-left pixel
    for name in ("g.jpg", "g.jpeg"):                                     # a JPEG, not PNG bytes
        save_grid(one_channel, tmp_path / name, nrow=2)
        assert (tmp_path / name).read_bytes()[:2] == b"\xff\xd8" and Image.open(tmp_path / name).format == "JPEG"


def test_the_ranks_shares_are_the_images_of_one_process():
    """Under torchrun the periodic FID samples every world-th batch on each rank (generate_many's
    rank, world). Each batch must start from the noise it has in one process, so that the union
    of the shares is one process's images and the FID does not depend on the number of GPUs."""
    from model import build_model
    torch.manual_seed(0)
    model = build_model("DiT-Mi/4", image_size=8, num_classes=5).eval()
    torch.nn.init.normal_(model.final.linear.weight, std=0.5)       # adaLN-Zero's output is 0: make it move
    labels = torch.arange(10) % 5                                   # batches of 4: 4, 4, 2
    many = lambda rank=0, world=1: generate_many(model, labels, euler, 2, batch_size=4, rank=rank, world=world,
                                                 generator=torch.Generator().manual_seed(3))
    one = many()
    assert one.shape == (10, 3, 8, 8) and len(one.unique()) > 100
    for world in (2, 3):
        shares = [many(rank, world) for rank in range(world)]
        batches = [b for k in range(3) for b in [shares[k % world][4 * (k // world):4 * (k // world) + 4]]]
        assert torch.equal(torch.cat(batches), one), world
    assert many(3, 4).shape == (0,)                                 # a rank without a batch: nothing
