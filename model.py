"""DiT: a Diffusion Transformer (Peebles and Xie, 2023) conditioned by adaLN-Zero.

The network maps a noisy image x_t, a time t in [0, 1] and a class label y to what the
objective regresses (a velocity for flow matching, loss.py). It can also hand back the output
of chosen transformer blocks: that residual stream is what the dispersive loss regularises.

Reading order: embedders, the block, the final layer, the model, the size registry. The file
stays comparable with DiT's models.py block by block, with shorter names (DiT's x_embedder,
t_embedder, y_embedder, adaLN_modulation, final_layer and embedding_table are patch_embed,
t_embed, y_embed, adaLN, final and table here); extensions (MeanFlow's second time input,
meanflow.py) are subclasses elsewhere.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x, shift, scale):
    # x: (B, T, C); shift, scale: (B, C), one value per image broadcast over its tokens
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ----------------------------------------------------------------------------------------
# Embedders: time, class label, 2-D position
# ----------------------------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t followed by a 2-layer MLP."""

    def __init__(self, hidden, freq_dim=256, t_scale=1000.0):
        super().__init__()
        self.freq_dim, self.t_scale = freq_dim, t_scale     # t_scale: see DiT.time_scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        half = self.freq_dim // 2
        dtype = torch.promote_types(t.dtype, torch.float32)                # float32, or float64 in tests
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=dtype) / half)
        args = (t.to(dtype) * self.t_scale)[:, None] * freqs[None]         # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)        # (B, freq_dim)
        return self.mlp(emb)


class LabelEmbedder(nn.Module):
    """One vector per class plus one for the "null" class (index num_classes) that
    classifier-free guidance uses. Labels are dropped to null in loss.py, once, not here."""

    def __init__(self, num_classes, hidden):
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y):
        return self.table(y)


def sincos_pos_embed(dim, grid_h, grid_w):
    """Fixed 2-D sin-cos position embedding, (grid_h * grid_w, dim): the first half of the
    channels encodes the row, the second half the column. (DiT's code, after MAE's, puts the
    column first: a relabelling of channels that changes nothing in training from scratch, but
    DiT's released weights would need the two halves swapped.)"""
    assert dim % 4 == 0, "hidden size must be divisible by 4 for the 2-D sin-cos embedding"

    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        out = np.outer(pos.reshape(-1), omega)                          # (T, d/2)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)       # (T, d)

    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")
    emb = np.concatenate([one_axis(dim // 2, rows), one_axis(dim // 2, cols)], axis=1)
    return torch.from_numpy(emb).float()


# ----------------------------------------------------------------------------------------
# The transformer block with adaLN-Zero conditioning
# ----------------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        assert hidden % heads == 0, f"hidden size {hidden} is not divisible by {heads} heads"
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, C // self.heads)     # (B, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                                 # each (B, H, T, Dh)
        # SDPA picks a fused kernel: flash or memory-efficient on a GPU, its own flash kernel on the CPU.
        x = F.scaled_dot_product_attention(q, k, v)                          # (B, H, T, Dh)
        return self.proj(x.transpose(1, 2).reshape(B, T, C))


class DiTBlock(nn.Module):
    """x + gate * Attn(modulate(LN(x))), then the same for the MLP. The six shift / scale /
    gate vectors are regressed from the conditioning c; their regressor starts at zero, so
    every gate is 0 and every block starts as the identity (the "Zero" in adaLN-Zero)."""

    def __init__(self, hidden, heads, mlp_ratio=4.0):
        super().__init__()
        # no affine parameters of their own: adaLN supplies each sample's shift and scale
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=1)   # each (B, C)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale; no gate), then a linear map from each token to its patch's pixels."""

    def __init__(self, hidden, patch, out_channels):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------

class DiT(nn.Module):
    # The sin-cos frequencies of the time embedding (periods 2*pi .. 2*pi*10000) were designed
    # for DDPM's integer steps 0..999; t in [0, 1] would move only the fastest few of them (the
    # rest would stay nearly constant), so it is scaled by 1000 first, as DiT's integer steps
    # are. SiT, the paper's flow model, feeds t in [0, 1] unscaled; the scaling is our choice, so
    # that one time embedding serves both objectives (the README's setup table lists it).
    # MeanFlowDiT goes back to SiT's, for the reason its docstring gives.
    time_scale = 1000.0

    def __init__(self, image_size=32, in_channels=3, patch=2, hidden=384, depth=12, heads=6,
                 mlp_ratio=4.0, num_classes=10):
        super().__init__()
        # a checkpoint's hand-edited model_config gets a ValueError here, not a traceback from deep in torch
        if any(type(v) is not int for v in (image_size, in_channels, num_classes)) \
                or min(image_size, in_channels) < 1 or num_classes < 0:
            raise ValueError(f"image_size {image_size!r} and in_channels {in_channels!r} must be integers >= 1, "
                             f"num_classes {num_classes!r} an integer >= 0")
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not divisible by the patch size {patch}")
        self.image_size, self.in_channels, self.patch = image_size, in_channels, patch
        self.hidden, self.depth, self.num_classes = hidden, depth, num_classes
        self.grid = image_size // patch
        self.patch_embed = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)
        # fixed, not learnt: a buffer that follows .to(device), left out of checkpoints (it is a
        # function of the shapes, rebuilt here)
        self.register_buffer("pos_embed", sincos_pos_embed(hidden, self.grid, self.grid).unsqueeze(0), persistent=False)
        self.t_embed = TimestepEmbedder(hidden, t_scale=self.time_scale)
        # num_classes = 0 trains an unconditional model: the table then holds only "null".
        self.y_embed = LabelEmbedder(num_classes, hidden)
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth)])
        self.final = FinalLayer(hidden, patch, in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        # Xavier for every linear layer, as in ViT / DiT ...
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # ... the patch embedding like a linear layer over flattened patches ...
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.y_embed.table.weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        # ... and the zeros of adaLN-Zero: every modulation regressor and the output layer.
        # A fresh model is therefore an identity map per block and outputs exactly 0.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN[-1].weight)
            nn.init.zeros_(block.adaLN[-1].bias)
        nn.init.zeros_(self.final.adaLN[-1].weight)
        nn.init.zeros_(self.final.adaLN[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def unpatchify(self, x):
        # (B, T, p*p*C) -> (B, C, H, W)
        B, p, g, C = x.shape[0], self.patch, self.grid, self.in_channels
        x = x.reshape(B, g, g, p, p, C)
        x = torch.einsum("bhwpqc->bchpwq", x)
        return x.reshape(B, C, g * p, g * p)

    def forward(self, x, t, y, return_blocks=None):
        """x: (B, C, H, W), t: (B,) in [0, 1], y: (B,) long in [0, num_classes] (num_classes is
        the null label). return_blocks: block numbers counted from 1; when given (even empty),
        the output comes with a dict {block number: that block's output (B, T, hidden)}."""
        c = self.t_embed(t) + self.y_embed(y)                                 # (B, hidden)
        return self.body(x, c, return_blocks)

    def body(self, x, c, return_blocks=None):
        """Everything after the conditioning vector c: patches, blocks, final layer, pixels. A
        separate method so that a subclass with other conditioning (MeanFlowDiT, which also
        embeds a second time) reuses it unchanged."""
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed   # (B, T, hidden)
        blocks = {}
        for i, block in enumerate(self.blocks, start=1):
            h = block(h, c)
            if return_blocks is not None and i in return_blocks:
                blocks[i] = h
        out = self.unpatchify(self.final(h, c))                               # (B, C, H, W)
        return out if return_blocks is None else (out, blocks)


# ----------------------------------------------------------------------------------------
# Sizes. S/B/L/XL are the DiT paper's; Ti and Mi are ours, small enough for a laptop CPU:
# Ti (tiny) is DeiT-Ti's width at half of its depth, Mi (micro) is for tests and the
# Fashion-MNIST preset (about 6 minutes on two CPU cores).
# ----------------------------------------------------------------------------------------

SIZES = {  # name: (depth, hidden, heads)
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
    "Ti": (6, 192, 3),
    "Mi": (4, 128, 4),
}
MODELS = {f"DiT-{name}/{patch}": (depth, hidden, heads, patch)
          for name, (depth, hidden, heads) in SIZES.items() for patch in (2, 4, 8)}


def build_model(name, image_size=32, in_channels=3, num_classes=10, cls=DiT):
    """A model of the registry by name; cls: DiT or a subclass (an objective's, e.g. MeanFlow's)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    depth, hidden, heads, patch = MODELS[name]
    return cls(image_size=image_size, in_channels=in_channels, patch=patch, hidden=hidden,
               depth=depth, heads=heads, num_classes=num_classes)
