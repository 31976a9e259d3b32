"""The executable specification of the method (loss.py): the dispersive loss against a float64
double loop and hand-computed cases, its groups, flow matching's interpolant and target, how
the two terms combine, and where the dispersive gradient goes. The first test file to read."""
import math

import pytest
import torch

from loss import USES_TAU, VARIANTS, Dispersive, FlowMatching, block_stats, dispersive_loss, interpolate, parse_blocks
from model import DiT
from utils import UserError


def infonce_l2_reference(z, tau):
    """The paper's formula as a direct double loop over all B*B ordered pairs, in float64."""
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
    for seed in range(20):   # far apart, so off the diagonal exp(-D) is 0; large norms, where the diagonal's
                             # D = a.a + a.a - 2 a.a must still come out exactly 0 (or be set to it)
        far = torch.randn(8, 64, generator=torch.Generator().manual_seed(seed)) * 100
        assert dispersive_loss(far).item() == pytest.approx(-math.log(8), abs=1e-6)


def test_batch_size_one_still_backprops():
    z = torch.randn(1, 10, requires_grad=True)
    dispersive_loss(z).backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("variant", VARIANTS)
def test_order_invariant(variant):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(7, 3, 5, generator=g) * 0.5       # D of a pair about 0.5: inside the hinge's margin of 1
    perm = torch.randperm(7, generator=g)
    value = dispersive_loss(z, variant).item()
    assert abs(value) > 1e-3                           # a case with something to compare
    assert dispersive_loss(z[perm], variant).item() == pytest.approx(value, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_tau_matters_exactly_for_the_forms_in_uses_tau(variant):
    # ab.py and plots.py name runs by USES_TAU: a form with a temperature left out of it would
    # have its tau sweep trained as one run
    z = torch.randn(8, 6, generator=torch.Generator().manual_seed(11))
    changes = dispersive_loss(z, variant, tau=0.5).item() != pytest.approx(dispersive_loss(z, variant, tau=2.0).item())
    assert changes == (variant in USES_TAU)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_autocast_computes_in_float32(variant):
    lin = torch.nn.Linear(16, 32)
    x = torch.randn(8, 4, 16, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = lin(x)
        assert z.dtype == torch.bfloat16
        loss = dispersive_loss(z, variant)
    assert loss.dtype == torch.float32
    # Exactly the float32 loss of the same (bf16-rounded) features: nothing inside ran in bf16 ...
    assert loss.item() == dispersive_loss(z.float(), variant).item()
    # ... and within bf16's rounding of the features of the full float32 computation.
    assert loss.item() == pytest.approx(dispersive_loss(lin(x), variant).item(), rel=2e-2, abs=2e-3)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in lin.parameters())


def test_gradient_step_disperses():
    z = (torch.randn(16, 32, generator=torch.Generator().manual_seed(3)) * 0.3).requires_grad_()
    before = block_stats(z)[0].item()
    dispersive_loss(z, tau=0.5).backward()
    with torch.no_grad():
        z -= 0.5 * z.grad
    assert block_stats(z)[0].item() > before


# ----------------------------------------------------------------------------------------
# Groups: the paper's runs dispersed 16 samples per device, not the whole batch
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_groups_are_the_mean_of_separate_groups(variant):
    z = torch.randn(12, 2, 3, generator=torch.Generator().manual_seed(4)) * 0.6
    per_group = [dispersive_loss(z[i:i + 4], variant).item() for i in range(0, 12, 4)]
    assert dispersive_loss(z, variant, group_size=4).item() == pytest.approx(sum(per_group) / 3, rel=1e-5, abs=1e-6)
    assert dispersive_loss(z, variant, group_size=12).item() == dispersive_loss(z, variant).item()   # G = B: one group, as 0
    assert dispersive_loss(z, variant, group_size=4).item() != pytest.approx(dispersive_loss(z, variant).item())


def test_group_floor_is_minus_log_group_size():
    far = torch.randn(32, 64, generator=torch.Generator().manual_seed(5)) * 100
    assert dispersive_loss(far, group_size=16).item() == pytest.approx(-math.log(16), abs=1e-6)
    assert dispersive_loss(far).item() == pytest.approx(-math.log(32), abs=1e-6)
    with pytest.raises(ValueError, match="does not divide the batch of 32"):
        dispersive_loss(far, group_size=5)


def test_infonce_l2_groups_match_the_double_loop():
    z = torch.randn(6, 5, generator=torch.Generator().manual_seed(6))
    expected = (infonce_l2_reference(z[:3], 0.5) + infonce_l2_reference(z[3:], 0.5)) / 2
    assert dispersive_loss(z, tau=0.5, group_size=3).item() == pytest.approx(expected, abs=1e-5)


def test_infonce_cos_hand_case():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])                    # cos matrix [[1, 0], [0, 1]]
    expected = math.log((2 * math.e + 2) / 4)
    assert dispersive_loss(z, "infonce_cos", tau=1.0).item() == pytest.approx(expected, abs=1e-6)
    expected_t = math.log((2 * math.exp(2) + 2) / 4)
    assert dispersive_loss(z, "infonce_cos", tau=0.5).item() == pytest.approx(expected_t, abs=1e-5)


def test_infonce_cos_floor_is_the_simplex():
    """The cosine form's least value: B directions as a regular simplex, every off-diagonal cosine
    -1/(B-1) (the most negative mean that B unit vectors allow), log((e^(1/tau) + (B-1)
    e^(-1/((B-1) tau))) / B). Any other directions score higher."""
    B, tau = 16, 0.5
    simplex = torch.eye(B) - 1.0 / B                         # centred basis vectors: a regular simplex
    floor = math.log((math.exp(1 / tau) + (B - 1) * math.exp(-1 / ((B - 1) * tau))) / B)
    assert dispersive_loss(simplex, "infonce_cos", tau=tau).item() == pytest.approx(floor, abs=1e-5)
    torch.manual_seed(0)
    assert all(dispersive_loss(torch.randn(B, 64), "infonce_cos", tau=tau).item() > floor for _ in range(20))


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
    torch.manual_seed(0)
    z = torch.randn(6, 5, dtype=torch.float64)
    corr = torch.corrcoef(z.T)
    expected = ((corr ** 2).sum() - (corr.diag() ** 2).sum()) / 5
    assert dispersive_loss(z.float(), "covariance").item() == pytest.approx(expected.item(), rel=1e-4)


def test_covariance_floor_when_features_outnumber_samples():
    """d >> B, as for any block output: B samples give correlations of rank <= B - 1 and trace d,
    so the value is at least d / (B - 1) - 1, whatever the samples; random ones land just above."""
    torch.manual_seed(0)
    B, d = 16, 4096
    floor = d / (B - 1) - 1
    for z in (torch.randn(B, d), torch.randn(B, d) * torch.linspace(0.1, 10, d), torch.randn(B, 4).repeat(1, d // 4)):
        value = dispersive_loss(z, "covariance").item()
        assert value >= floor * (1 - 1e-4)
    assert dispersive_loss(torch.randn(B, d), "covariance").item() == pytest.approx(floor, rel=0.01)


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
    assert torch.allclose(fd, xd - ed, atol=1e-6)                         # d x_t / dt = x - eps, the target


# ----------------------------------------------------------------------------------------
# The objective: flow matching + lambda * dispersive, on the blocks' outputs
# ----------------------------------------------------------------------------------------

class Oracle(torch.nn.Module):
    """Returns a fixed velocity, and its input x_t as the output of every block asked for.
    Records the labels it saw."""

    def __init__(self, v):
        super().__init__()
        self.v, self.seen = v, None

    def forward(self, xt, t, y, return_blocks=None):
        self.seen = y.clone()
        return self.v.clone(), {b: xt for b in return_blocks}


def draws(eps, t, drop=None):
    return {"eps": eps, "t": t, "drop": drop}


def test_oracle_gets_zero_loss_and_labels_drop_once():
    x, eps, t = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4), torch.rand(4)
    model = Oracle(x - eps)
    drop = torch.tensor([True, False, True, False])
    objective = FlowMatching(Dispersive(weight=0.0, blocks=(1,)), null_label=10)
    losses = objective(model, x, torch.tensor([0, 1, 2, 3]), draws(eps, t, drop))
    assert losses["flow"].item() == 0.0 and losses["total"].item() == 0.0 and losses["disp"].item() == 0.0
    assert model.seen.tolist() == [10, 1, 10, 3]


def test_total_combines_terms():
    """The objective passes its weight, tau and group size on (tau 0.3, not the default 0.5:
    a Dispersive that dropped its tau would fail here)."""
    x, eps, t = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4), torch.rand(4)
    model = Oracle(x - eps - 0.1)
    objective = FlowMatching(Dispersive(weight=0.25, tau=0.3, blocks=(1,), group_size=2))
    losses = objective(model, x, torch.zeros(4, dtype=torch.long), draws(eps, t))
    assert losses["flow"].item() == pytest.approx(0.01, rel=1e-4)
    xt = interpolate(x, eps, t)
    assert losses["disp"].item() == pytest.approx(dispersive_loss(xt, tau=0.3, group_size=2).item(), abs=1e-6)
    assert losses["disp"].item() != pytest.approx(dispersive_loss(xt, tau=0.5, group_size=2).item(), abs=1e-3)
    assert losses["total"].item() == pytest.approx(losses["flow"].item() + 0.25 * losses["disp"].item(), abs=1e-6)


def test_draw_is_the_papers_noise():
    objective = FlowMatching(Dispersive(), null_label=10, p_uncond=0.1)
    noise = objective.draw(torch.Generator().manual_seed(0), (20000, 1, 2, 2))
    assert noise["eps"].shape == (20000, 1, 2, 2) and abs(noise["eps"].std().item() - 1) < 0.01
    # t ~ U[0, 1): its empirical CDF is within 0.01 of u everywhere (Kolmogorov-Smirnov; SD3's
    # logit-normal(0, 1) t, also of mean 0.5, is off by 0.12 near u = 0.2)
    t = noise["t"].sort().values
    assert 0 <= t[0] and t[-1] < 1
    assert (torch.arange(1, len(t) + 1) / len(t) - t).abs().max() < 0.01
    assert abs(noise["drop"].float().mean().item() - 0.1) < 0.01


def perturbed_dit(depth=4, seed=0):
    """A small DiT whose zero-initialised layers are random, so every block does something."""
    model = DiT(image_size=8, in_channels=1, patch=4, hidden=16, depth=depth, heads=2, num_classes=3)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("k", [1, 2, 3])
def test_dispersive_gradient_reaches_blocks_up_to_k_only(k):
    """The dispersive term of block k trains every weight of blocks 1..k and the embeddings
    below them, and nothing above: a .detach() on the features, the wrong block, or a point
    inside block k (after its attention, before its MLP) fails here."""
    model = perturbed_dit()
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(8, 1, 8, 8, generator=g), torch.randn(8, 1, 8, 8, generator=g)
    objective = FlowMatching(Dispersive(weight=0.5, blocks=(k,), group_size=4))
    losses = objective(model, x, torch.randint(0, 3, (8,), generator=g), draws(eps, torch.rand(8, generator=g)))
    params = list(model.parameters())
    grads = torch.autograd.grad(losses["disp"], params, retain_graph=True, allow_unused=True)
    norm = {name: 0.0 if gr is None else gr.norm().item() for (name, _), gr in zip(model.named_parameters(), grads)}
    for name, v in norm.items():
        if name.startswith("blocks."):
            i = int(name.split(".")[1]) + 1
            assert (v > 0) == (i <= k), (name, k, v)
    assert norm["patch_embed.weight"] > 0 and norm["t_embed.mlp.0.weight"] > 0 and norm["y_embed.table.weight"] > 0
    assert norm["final.linear.weight"] == 0
    # ... and the total's gradient is the flow term's plus lambda times it
    flow = torch.autograd.grad(losses["flow"], params, retain_graph=True)
    total = torch.autograd.grad(losses["total"], params)
    for t, f, d in zip(total, flow, grads):
        torch.testing.assert_close(t, f + 0.5 * (torch.zeros_like(f) if d is None else d), rtol=1e-5, atol=1e-7)


def test_baseline_computes_no_dispersive_term(monkeypatch):
    """weight 0: the regularised block is not returned and the dispersive loss is never evaluated
    (weight 0.5, the control: it is, once)."""
    import loss
    calls = []
    real = loss.dispersive_loss
    # record each call, then run the real function
    monkeypatch.setattr(loss, "dispersive_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = perturbed_dit()
    x, y, noise = torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long), draws(torch.randn(4, 1, 8, 8), torch.rand(4))
    baseline = FlowMatching(Dispersive(weight=0.0, blocks=(1,), group_size=4))
    losses = baseline(model, x, y, noise)
    assert losses["disp"].item() == 0.0 and losses["blocks"] == {} and calls == []
    with_watch = baseline(model, x, y, noise, extra_blocks=(2, 4))     # train.py's diagnostics at a log step
    assert sorted(with_watch["blocks"]) == [2, 4] and with_watch["disp"].item() == 0.0 and calls == []
    FlowMatching(Dispersive(weight=0.5, blocks=(1,), group_size=4))(model, x, y, noise)
    assert calls == [1]


def test_disp_block_parsing():
    assert parse_blocks(None, 12) == (3,)                # depth // 4, counted from 1: the paper's
    assert parse_blocks(None, 28) == (7,)
    assert parse_blocks("last", 12) == (12,)
    assert parse_blocks("all", 4) == (1, 2, 3, 4)
    assert parse_blocks("6,2", 12) == (2, 6)
    with pytest.raises(UserError, match="out of range"):
        parse_blocks("13", 12)
    with pytest.raises(UserError, match="expected"):
        parse_blocks("middle", 12)
    with pytest.raises(UserError, match="names a block twice"):
        parse_blocks("2,2", 12)


def test_block_stats_by_hand():
    z = torch.tensor([[[0.0, 0.0]], [[3.0, 4.0]]])           # two samples, d = 2
    dist, rms = block_stats(z)
    assert dist.item() == pytest.approx(25 / 2)              # ||z_1 - z_2||^2 / d
    assert rms.item() == pytest.approx((0 + 5 / math.sqrt(2)) / 2)
