"""MeanFlow: the target against closed forms and finite differences, the reduction to flow
matching, the time sampler, one-step sampling and the scripts."""
import math
import os

import numpy as np
import pytest
import torch

import train
from conftest import read_jsonl, run_script, tiny_args
from loss import Dispersive, FlowMatching, interpolate
from meanflow import MeanFlow, MeanFlowDiT, jumps, meanflow_target, meanflow_times
from model import build_model


# ----------------------------------------------------------------------------------------
# A toy with closed forms: data x ~ N(mu, s^2) per element, noise N(0, 1). Then x_t (our
# convention, x_t = t x + (1 - t) eps) is N(t mu, sig(t)^2) with sig(t)^2 = t^2 s^2 + (1-t)^2,
# and the flow keeps each point's standard score: x_r = r mu + (x_t - t mu) sig(r) / sig(t).
# ----------------------------------------------------------------------------------------

def sig(t, s):
    return torch.sqrt(t ** 2 * s ** 2 + (1 - t) ** 2)


def v_exact(x, t, mu, s):
    """Marginal velocity d x_t / dt of the toy."""
    t = t.view(-1, 1, 1, 1)
    return mu + (x - t * mu) * (t * s ** 2 - (1 - t)) / sig(t, s) ** 2


def u_exact(x, t, r, mu, s):
    """Average velocity from t to r: (x_r - x_t) / (r - t), and v where r = t."""
    t4, r4 = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
    x_r = r4 * mu + (x - t4 * mu) * sig(r4, s) / sig(t4, s)
    gap = torch.where(r4 == t4, torch.ones_like(r4), r4 - t4)
    return torch.where(r4 == t4, v_exact(x, t, mu, s), (x_r - x) / gap)


class Toy(torch.nn.Module):
    """A "network" that is the exact average velocity; class k has mean mus[k] (the last
    entry is the null class), so guidance has something to mix."""

    def __init__(self, mus, s):
        super().__init__()
        self.mus, self.s = torch.tensor(mus, dtype=torch.float64), s

    def forward(self, x, t, y, r=None):
        mu = self.mus[y].view(-1, 1, 1, 1)
        return u_exact(x, t, t if r is None else r, mu, self.s)


def toy_batch(B=16, mu=0.7, s=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.9
    r = t + (1 - t) * torch.rand(B, generator=g, dtype=torch.float64)
    x = mu + s * torch.randn(B, 1, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(B, 1, 3, 3, generator=g, dtype=torch.float64)
    return interpolate(x, eps, t), t, r


def test_target_equals_closed_form_average_velocity():
    mu, s = 0.7, 0.5
    xt, t, r = toy_batch(mu=mu, s=s)
    y = torch.zeros(len(t), dtype=torch.long)
    model = Toy([mu, 0.0], s)
    # With the true (marginal) velocity as v, the MeanFlow identity holds exactly: the target
    # v + (r - t) du/dt is the average velocity itself.
    target = meanflow_target(model, xt, t, y, r, v_exact(xt, t, mu, s))
    expected = u_exact(xt, t, r, mu, s)
    assert target.dtype == torch.float64
    torch.testing.assert_close(target, expected, rtol=1e-10, atol=1e-10)
    # ... and the average velocity is not the instantaneous one (the test has teeth).
    assert (expected - v_exact(xt, t, mu, s)).abs().max() > 0.1
    # A wrong sign on the correction term would miss it.
    wrong = 2 * v_exact(xt, t, mu, s) - target
    assert (wrong - expected).abs().max() > 0.1


def test_guided_target_mixes_the_velocities_and_follows_them():
    mus, s, omega, kappa = [0.7, -0.4, 0.0], 0.5, 2.5, 0.3      # classes 0, 1 and the null class 2
    xt, t, r = toy_batch(B=8, mu=0.7, s=s, seed=1)
    y = torch.tensor([0, 1, 0, 1, 0, 1, 2, 2])
    drop = y == 2
    model = Toy(mus, s)
    v = torch.randn(xt.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    target = meanflow_target(model, xt, t, y, r, v, drop=drop, null_label=2, cfg_omega=omega, cfg_kappa=kappa)
    # Expected, independently: v_g = omega v + kappa u(t, t | y) + (1 - omega - kappa) u(t, t | null)
    # where the label was kept, v where it was dropped; then v_g + (r - t) du/dt along v_g,
    # du/dt by central differences.
    null = torch.full_like(y, 2)
    v_g = omega * v + kappa * model(xt, t, y) + (1 - omega - kappa) * model(xt, t, null)
    v_g = torch.where(drop.view(-1, 1, 1, 1), v, v_g)
    h = 1e-6
    du_dt = (model(xt + h * v_g, t + h, y, r=r) - model(xt - h * v_g, t - h, y, r=r)) / (2 * h)
    torch.testing.assert_close(target, v_g + (r - t).view(-1, 1, 1, 1) * du_dt, rtol=1e-6, atol=1e-6)


def perturbed_model(seed=0, dtype=torch.float32, **kw):
    """A small MeanFlow DiT whose zero-initialised layers are nudged, so every term is nonzero."""
    torch.manual_seed(seed)
    m = build_model("DiT-Mi/4", 8, 1, 3, cls=MeanFlowDiT, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.to(dtype)


def test_jvp_total_derivative_matches_finite_differences():
    model = perturbed_model(dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    B = 6
    xt = torch.randn(B, 1, 8, 8, generator=g, dtype=torch.float64)
    v = torch.randn(B, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.5
    r = t + 0.4
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    du_dt = (meanflow_target(model, xt, t, y, r, v) - v) / (r - t).view(-1, 1, 1, 1)
    h = 1e-6   # a central difference in float32: h small against the frequencies of the time embedding
    with torch.no_grad():
        fd = (model(xt + h * v, t + h, y, r=r) - model(xt - h * v, t - h, y, r=r)) / (2 * h)
    assert du_dt.abs().max() > 1e-2
    assert ((du_dt - fd).norm() / fd.norm()).item() < 1e-5


def test_r_equal_t_reduces_to_flow_matching():
    model = perturbed_model()
    g = torch.Generator().manual_seed(3)
    B = 8
    x = torch.rand(B, 1, 8, 8, generator=g) * 2 - 1
    y = torch.randint(0, 3, (B,), generator=g)
    eps = torch.randn(x.shape, generator=g)
    t = torch.rand(B, generator=g)
    drop = torch.rand(B, generator=g) < 0.3
    reg = Dispersive(weight=0.5, blocks=(1,), group_size=4)
    noise = {"eps": eps, "t": t, "drop": drop}
    # The target is then v = x - eps exactly: the JVP term is multiplied by r - t = 0.
    xt = interpolate(x, eps, t)
    torch.testing.assert_close(meanflow_target(model, xt, t, y, t, x - eps), x - eps, rtol=0, atol=0)
    mf = MeanFlow(reg, null_label=3, adaptive_p=0.0)(model, x, y, {**noise, "r": t})
    fm = FlowMatching(reg, null_label=3)(model, x, y, noise)
    torch.testing.assert_close(mf["flow"], fm["flow"])
    torch.testing.assert_close(mf["disp"], fm["disp"])
    # With p = 0 the MeanFlow loss is the squared error summed over a sample's elements: the
    # flow-matching loss times their number (64), the dispersive term unchanged ...
    n = x[0].numel()
    torch.testing.assert_close(mf["total"], n * fm["flow"] + 0.5 * fm["disp"])
    # ... and so are the gradients.
    params = list(model.parameters())
    mf_grads = torch.autograd.grad(mf["total"] - 0.5 * mf["disp"], params)
    fm_grads = torch.autograd.grad(fm["flow"], params)
    for a, b in zip(mf_grads, fm_grads):
        torch.testing.assert_close(a / n, b, rtol=1e-4, atol=1e-7)


def test_adaptive_weight_closed_form_and_stopped_gradients():
    model = perturbed_model(seed=1)
    g = torch.Generator().manual_seed(4)
    B = 5
    x = torch.rand(B, 1, 8, 8, generator=g) * 2 - 1
    y = torch.randint(0, 3, (B,), generator=g)
    eps = torch.randn(x.shape, generator=g)
    t, r = meanflow_times(B, g, ratio=1.0)
    objective = MeanFlow(Dispersive(weight=0.0), adaptive_p=0.5, adaptive_c=0.3)
    out = objective(model, x, y, {"eps": eps, "t": t, "r": r, "drop": None})
    xt = interpolate(x, eps, t)
    u_tgt = meanflow_target(model, xt, t, y, r, x - eps)
    assert not u_tgt.requires_grad           # the target is a constant: no second derivatives
    sq = (model(xt, t, y, r=r) - u_tgt).pow(2).flatten(1).sum(1)
    expected = (sq / (sq.detach() + 0.3) ** 0.5).mean()
    torch.testing.assert_close(out["total"], expected)
    torch.testing.assert_close(out["flow"], sq.mean() / 64)
    # The weight is a constant too: the gradient is w * d||u - u_tgt||^2, which a weight
    # left in the graph (sq / (sq + c)^p differentiated whole) would change.
    params = list(model.parameters())
    got = torch.autograd.grad(out["total"], params)
    want = torch.autograd.grad(expected, params, retain_graph=True)
    whole = torch.autograd.grad((sq / (sq + 0.3) ** 0.5).mean(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert max((a - b).abs().max().item() for a, b in zip(got, whole)) > 1e-4


def test_time_sampler():
    g = torch.Generator().manual_seed(0)
    n = 20000
    t, r = meanflow_times(n, g, ratio=0.25, logit_mean=0.4, logit_std=1.0)
    assert (r >= t).all() and (t > 0).all() and (r < 1).all()
    share = (r != t).float().mean().item()
    assert abs(share - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
    # Where r != t, (t, r) are the order statistics of two logit-normal draws: the mean of
    # their logits is the logit mean (0.4, +-4 standard errors), t's is below it.
    keep = r != t
    logit = lambda p: torch.log(p / (1 - p))
    both = (logit(t[keep]) + logit(r[keep])) / 2
    assert abs(both.mean().item() - 0.4) < 4 * (1 / math.sqrt(2)) / math.sqrt(keep.sum().item())
    assert logit(t[keep]).mean() < 0.4 - 0.4
    t0, r0 = meanflow_times(100, g, ratio=0.0)
    assert torch.equal(t0, r0)
    # The defaults are the paper's: 25% of r != t, logit mean +0.4 in our convention (its -0.4),
    # std 1: where r = t, t is the smaller of two draws, whose logit has mean 0.4 - 1/sqrt(pi)
    # (and std 0.83).
    t, r = meanflow_times(n, g)
    same = r == t
    assert abs(same.float().mean().item() - 0.75) < 4 * math.sqrt(0.25 * 0.75 / n)
    m = logit(t[same]).mean().item()
    assert abs(m - (0.4 - 1 / math.sqrt(math.pi))) < 4 * 0.83 / math.sqrt(same.sum().item())


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_mean_flow_sampler_is_exact_for_the_exact_average_velocity(steps):
    mu, s = 0.7, 0.5
    model = Toy([mu], s)
    y = torch.zeros(4, dtype=torch.long)
    x0 = torch.randn(4, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def fn(x, t, r):
        tt = torch.full((4,), t, dtype=torch.float64)
        return model(x, tt, y, r=torch.full_like(tt, r))
    # From noise at t = 0 the flow ends at mu + s * x0 (the standard score is kept).
    torch.testing.assert_close(jumps(fn, x0, steps), mu + s * x0, rtol=1e-12, atol=1e-12)


def test_flow_model_refuses_r_and_meanflow_solver():
    fm = build_model("DiT-Mi/4", 8, 1, 3)
    with pytest.raises(TypeError, match="'r'"):
        fm(torch.zeros(1, 1, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long), r=torch.ones(1))
    from sample import sampler
    from utils import UserError
    with pytest.raises(UserError, match="flow models are sampled with euler, heun, dopri5"):
        sampler("flow", "meanflow")


def test_cli_train_then_one_and_two_step_sampling(image_folder, tmp_path):
    out = tmp_path / "mf"
    train.main(tiny_args(image_folder, out, "--steps", "4", "--objective", "meanflow", "--mf-cfg-omega", "2",
                         "--mf-cfg-kappa", "0.5", "--sample-every", "4", "--disp-weight", "0.5"))
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "train"]
    assert [r["step"] for r in rows] == [2, 4] and all(math.isfinite(r["total"]) for r in rows)
    assert os.path.exists(out / "samples" / "step_0000004.png")
    ckpt = str(out / "checkpoints" / "step_0000004.pt")
    assert torch.load(ckpt, weights_only=True)["model_config"]["objective"] == "meanflow"
    for steps in ("1", "2"):
        res = run_script("sample.py", "--ckpt", ckpt, "--steps", steps, "--num-samples", "6",
                         "--out", str(tmp_path / f"s{steps}.npz"), "--device", "cpu")
        assert res.returncode == 0, res.stderr
        npz = np.load(tmp_path / f"s{steps}.npz")
        assert npz["arr_0"].shape == (6, 16, 16, 3)
        assert '"solver": "meanflow"' in str(npz["protocol"]) and f'"steps": {steps}' in str(npz["protocol"])
    # A flow-matching run cannot resume as MeanFlow, and guidance in training needs MeanFlow.
    res = run_script("train.py", *tiny_args(image_folder, out, "--steps", "6", "--resume"))
    assert res.returncode == 2 and "objective" in res.stderr
    res = run_script("train.py", *tiny_args(image_folder, tmp_path / "x", "--steps", "2", "--mf-cfg-omega", "2"))
    assert res.returncode == 2 and "--mf-cfg-omega: flags of --objective meanflow, not of flow" in res.stderr
    res = run_script("train.py", *tiny_args(image_folder, tmp_path / "x", "--steps", "2", "--objective", "meanflow",
                                            "--mf-cfg-omega", "2", "--p-uncond", "0"))
    assert res.returncode == 2 and "--p-uncond > 0" in res.stderr
    res = run_script("train.py", *tiny_args(image_folder, tmp_path / "x", "--steps", "2", "--mf-ratio", "1.5"))
    assert res.returncode == 2 and "--mf-ratio: must be a finite number >= 0 and <= 1, got 1.5" in res.stderr


def test_compiled_target_matches_eager():
    model = perturbed_model(seed=2)
    g = torch.Generator().manual_seed(5)
    xt = torch.randn(4, 1, 8, 8, generator=g)
    v = torch.randn(4, 1, 8, 8, generator=g)
    t, r = meanflow_times(4, g, ratio=1.0)
    y = torch.tensor([0, 1, 2, 3])
    eager = meanflow_target(model, xt, t, y, r, v)
    # fullgraph: the JVP, the math-attention context and the model trace as one graph (a
    # graph break would raise here instead of silently running eagerly)
    compiled = torch.compile(meanflow_target, fullgraph=True)(model, xt, t, y, r, v)
    # float32 rounding differs between the compiled and eager kernels (the JVP's many products)
    assert ((compiled - eager).norm() / eager.norm()).item() < 1e-5


def test_default_run_directory_names_the_objective():
    # a MeanFlow run must not land in (and then refuse to resume) a flow run's directory
    assert train.get_args([]).out == os.path.join("runs", "cifar10_DiT-S-2_w0.5_s0")
    assert train.get_args(["--objective", "meanflow"]).out == os.path.join("runs", "cifar10_DiT-S-2_meanflow_w0.5_s0")


def test_unscaled_time_embedding():
    """MeanFlow's key fix: both time embeddings take t in [0, 1] as it is, not DiT's 1000 t."""
    mf = build_model("DiT-Mi/4", 8, 1, 3, cls=MeanFlowDiT)
    assert mf.t_embed.t_scale == 1.0 and mf.r_embed.t_scale == 1.0
    seen = {}
    mf.t_embed.mlp[0].register_forward_hook(lambda m, inp, out: seen.__setitem__("x", inp[0]))
    mf.t_embed(torch.tensor([0.25]))
    assert seen["x"][0, mf.t_embed.freq_dim // 2].item() == pytest.approx(math.sin(0.25), abs=1e-6)


def test_default_sampler_is_one_jump():
    from sample import sampler
    assert sampler("meanflow")[1:] == ("meanflow", 1) and sampler("meanflow", "heun", 4)[1:] == ("heun", 4)


@pytest.mark.slow
def test_bench_times_the_meanflow_step():
    """MeanFlow's step (a JVP, 10 forward MACs per image) and its 1-jump sampling."""
    r = run_script("bench.py", "--device", "cpu", "--model", "DiT-Mi/4", "--image-size", "16", "--batch-size", "8",
                   "--steps", "1", "--rounds", "1", "--warmup", "1", "--sample-batches", "1", "--objective", "meanflow",
                   "--disp-group-size", "0")
    assert r.returncode == 0, r.stderr
    assert "objective meanflow; sampling: 1 steps of meanflow" in r.stdout
    assert len([l for l in r.stdout.splitlines() if l.startswith("| eager |")]) == 3
