"""DiT's objective (Peebles and Xie, 2023): DDPM noise prediction, sampled with DDIM, plus the
dispersive loss. The paper reports its gain on DiT as well as on SiT (flow matching, loss.py).

    python train.py --objective diffusion --disp-weight 0.5      # sample.py then takes 50 DDIM steps

DDPM's discrete steps k = 0 .. 999 use DiT's linear schedule beta_k from 1e-4 to 0.02, and
    x_k = sqrt(abar_k) x + sqrt(1 - abar_k) eps,   abar_k = prod_{i <= k} (1 - beta_i),
k = 999 being nearly pure noise. The network predicts eps (mean squared error, as DiT's
"simple" loss). Not reproduced: DiT's learned variance (its network has a second output and a
variational-bound term, used by its stochastic DDPM sampler); the deterministic DDIM sampler
below needs no variance.

The mapping onto this project's time convention (t = 0 noise, t = 1 data), in one place: step k
is the model's time input t = 1 - k / 1000, so the DiT time embedding, which embeds 1000 t, sees
the integers 1000 - k (1 .. 1000): DiT's 0 .. 999, read backwards and shifted by one.
"""
import functools

import torch

from loss import FlowMatching, drop_labels

STEPS = 1000


def alphas_cumprod(steps=STEPS, beta_start=1e-4, beta_end=0.02):
    """abar_k for k = 0 .. steps - 1 (float64): DiT's linear beta schedule."""
    betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


@functools.lru_cache
def alphas_cumprod_on(device):
    """The schedule in float32, copied to a device once (a copy per step would make the host wait
    for the GPU; MPS has no float64)."""
    return alphas_cumprod().to(device, torch.float32)


def model_time(k):
    """Discrete step k (0 = nearly clean, 999 = nearly pure noise) -> the model's t in [0, 1]."""
    return 1 - k / STEPS


def ddim(fn, x, steps):
    """Deterministic DDIM (eta = 0) over `steps` of DDPM's steps, evenly spaced from 999 down
    to 0 as DiT's respacing does; fn(x, t) predicts the noise. Each step predicts the clean
    image x0 from x_k and the predicted noise, then re-noises it to the next step's level with
    that same noise; the last step returns x0."""
    abar = alphas_cumprod()
    ks = torch.linspace(STEPS - 1, 0, steps, dtype=torch.float64).round().long().tolist()
    for i, k in enumerate(ks):
        a = abar[k].item()
        a_next = abar[ks[i + 1]].item() if i + 1 < len(ks) else 1.0     # after step 0: the clean image
        eps = fn(x, model_time(k))
        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        x = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps
    return x


class Diffusion(FlowMatching):
    """DDPM noise prediction + lambda * the dispersive loss of the same forward pass. "flow" in
    the loss dict is the noise-prediction error (the objective's own loss)."""
    solvers = ("ddim",)
    solver_fns = {"ddim": ddim}

    def draw(self, gen, shape):
        """A DDPM step k per image, uniform over 0 .. 999, given as the model's time t."""
        B, device = shape[0], gen.device
        k = torch.randint(0, STEPS, (B,), device=device, generator=gen)
        return {"eps": torch.randn(shape, device=device, generator=gen), "t": model_time(k.float()),
                "drop": torch.rand(B, device=device, generator=gen) < self.p_uncond}

    @staticmethod
    def noised(x, eps, t):
        """x_k = sqrt(abar_k) x + sqrt(1 - abar_k) eps at the step k = 1000 (1 - t) of time t.
        float32 recovers k exactly: t = 1 - k / 1000 is off by < 1e-7, so 1000 (1 - t) by < 1e-4."""
        k = torch.round((1 - t.float()) * STEPS).long().clamp(0, STEPS - 1)
        a = alphas_cumprod_on(x.device)[k].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return a.sqrt() * x + (1 - a).sqrt() * eps

    def inputs(self, x, y, draws):
        """x_k, the model's time, the labels with the dropped ones made null, and the target: eps."""
        eps, t = draws["eps"], draws["t"]
        return self.noised(x, eps, t), t, drop_labels(y, draws["drop"], self.null_label), eps
