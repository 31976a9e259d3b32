"""DiT's diffusion objective: the schedule's closed forms, a noise-predicting oracle, and DDIM
on a Gaussian toy against the analytic answer."""
import math

import pytest
import torch

import train
from conftest import read_jsonl, run_script, tiny_args
from diffusion import STEPS, Diffusion, alphas_cumprod, ddim, model_time
from loss import Dispersive


def test_schedule_closed_forms():
    abar = alphas_cumprod()
    assert abar.dtype == torch.float64 and abar.shape == (1000,)
    betas = [1e-4 + (0.02 - 1e-4) * k / 999 for k in range(1000)]           # DiT's linear schedule
    prod = 1.0
    for k in (0, 1, 500, 999):
        prod = math.prod(1 - b for b in betas[:k + 1])
        assert abar[k].item() == pytest.approx(prod, rel=1e-12)
    assert abar[0].item() == pytest.approx(1 - 1e-4) and abar[-1].item() < 1e-4     # nearly clean .. nearly noise
    assert (abar[1:] < abar[:-1]).all()
    # the one stated mapping onto this project's times: k = 0 -> t = 1 (data), k = 999 -> t = 0.001
    assert model_time(0) == 1.0 and model_time(999) == pytest.approx(0.001) and model_time(500) == 0.5


class NoiseOracle(torch.nn.Module):
    """Inverts x_k = sqrt(a) x + sqrt(1 - a) eps for the known clean batch: the exact noise."""

    def __init__(self, x):
        super().__init__()
        self.x, self.abar = x, alphas_cumprod()

    def forward(self, xk, t, y, return_blocks=None):
        k = torch.round((1 - t.double()) * STEPS).long()                       # model_time inverted
        a = self.abar[k].view(-1, 1, 1, 1)
        eps = ((xk.double() - a.sqrt() * self.x.double()) / (1 - a).sqrt()).float()
        return eps if return_blocks is None else (eps, {b: xk for b in return_blocks})


def test_noise_predicting_oracle_gets_zero_loss():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 4, 4, generator=g)
    objective = Diffusion(Dispersive(weight=0.0), null_label=None)
    noise = objective.draw(g, x.shape)
    k = (1 - noise["t"].double()) * 1000                       # the drawn DDPM steps, on the model's time grid
    assert torch.allclose(k, k.round(), atol=1e-3) and 0 <= k.min() and k.max() <= 999
    losses = objective(NoiseOracle(x), x, torch.zeros(6, dtype=torch.long), noise)
    assert losses["flow"].item() < 1e-8 and losses["total"].item() == losses["flow"].item()
    wrong = objective(lambda *a, **k: (torch.zeros_like(x), {}), x, torch.zeros(6, dtype=torch.long), noise)
    assert wrong["flow"].item() == pytest.approx(noise["eps"].pow(2).mean().item(), rel=1e-6)   # predicting 0


def gaussian_eps(mu, s):
    """The exact noise prediction E[eps | x_k] for data N(mu, s^2): x_k is N(sqrt(a) mu, a s^2 + 1 - a)."""
    abar = alphas_cumprod()

    def fn(x, t):
        a = abar[round((1 - t) * STEPS)].item()
        return math.sqrt(1 - a) * (x - math.sqrt(a) * mu) / (a * s * s + 1 - a)
    return fn


def test_ddim_with_the_exact_noise_reaches_the_analytic_answer():
    mu, s = 0.7, 0.5
    x_T = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # The deterministic flow keeps each point's standard score from step 999 down to the clean data.
    a_T = alphas_cumprod()[-1].item()
    exact = mu + s * (x_T - math.sqrt(a_T) * mu) / math.sqrt(a_T * s * s + 1 - a_T)
    err = lambda n: (ddim(gaussian_eps(mu, s), x_T, n) - exact).abs().max().item()
    # first order, like Euler on the probability-flow ODE: halving the step halves the error
    # (measured: 0.104 at 50 steps, 0.053 at 100, 0.027 at 200, 0.0056 with all 1000)
    assert 1.8 < err(100) / err(200) < 2.1 and err(1000) < 0.01
    # A point mass (s = 0) is reached exactly in any number of steps: x0 is always predicted right.
    assert (ddim(gaussian_eps(mu, 0.0), x_T, 3) - mu).abs().max() < 1e-12


def test_noised_is_the_ddpm_marginal_at_step_k():
    """At every step k, from the float32 time the model sees (all in float32: MPS has no float64)."""
    torch.manual_seed(0)
    x, eps = torch.randn(STEPS, 1, 2, 2), torch.randn(STEPS, 1, 2, 2)
    k = torch.arange(STEPS)
    a = alphas_cumprod()[k].float().view(-1, 1, 1, 1)
    got = Diffusion.noised(x, eps, model_time(k.float()))
    assert torch.equal(got, a.sqrt() * x + (1 - a).sqrt() * eps)


def test_ddim_visits_dits_respaced_steps():
    seen = []
    ddim(lambda x, t: seen.append(round((1 - t) * STEPS)) or torch.zeros_like(x), torch.zeros(1), 50)
    assert len(seen) == 50 and seen[0] == 999 and seen[-1] == 0 and seen[1] == 979   # 999 / 49 apart, rounded


def test_cli_train_and_ddim_sampling(image_folder, tmp_path):
    out = tmp_path / "dit"
    train.main(tiny_args(image_folder, out, "--steps", "4", "--objective", "diffusion", "--sample-every", "4",
                         "--sample-steps", "3"))
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "train"]
    assert [r["step"] for r in rows] == [2, 4] and all(r["disp"] < 0 for r in rows)
    ckpt = str(out / "checkpoints" / "step_0000004.pt")
    assert torch.load(ckpt, weights_only=True)["model_config"]["objective"] == "diffusion"
    r = run_script("sample.py", "--ckpt", ckpt, "--steps", "4", "--cfg-scale", "2", "--out", str(tmp_path / "g.png"),
                   "--device", "cpu")
    assert r.returncode == 0 and "ddim: 4 network evaluations" in r.stdout, r.stderr
    r = run_script("sample.py", "--ckpt", ckpt, "--solver", "euler", "--out", str(tmp_path / "g.png"), "--device", "cpu")
    assert r.returncode == 2 and "diffusion models are sampled with ddim" in r.stderr
