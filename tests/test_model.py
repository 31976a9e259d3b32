import math

import pytest
import torch

from model import MODELS, DiT, build_model


def perturbed(model, seed=0):
    """A copy of the model with every weight random, so no block is the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("size,channels,patch", [(32, 3, 2), (28, 1, 4), (32, 4, 2), (16, 3, 8)])
def test_shapes(size, channels, patch):
    model = DiT(image_size=size, in_channels=channels, patch=patch, hidden=64, depth=2, heads=4, num_classes=10)
    x = torch.randn(3, channels, size, size)
    out, blocks = model(x, torch.rand(3), torch.tensor([0, 5, 10]), return_blocks=(1, 2))
    assert out.shape == x.shape
    assert sorted(blocks) == [1, 2] and [b.shape for b in blocks.values()] == [(3, (size // patch) ** 2, 64)] * 2


def test_fresh_model_outputs_exact_zero():
    model = build_model("DiT-Mi/2", 16, 3, 10)
    out = model(torch.randn(4, 3, 16, 16), torch.rand(4), torch.randint(0, 11, (4,)))
    assert torch.equal(out, torch.zeros_like(out))


def test_returned_feature_is_that_blocks_output():
    model = perturbed(DiT(image_size=16, in_channels=3, patch=4, hidden=32, depth=4, heads=2, num_classes=3))
    captured = {}
    for i, block in enumerate(model.blocks, start=1):
        block.register_forward_hook(lambda m, inp, out, i=i: captured.__setitem__(i, out))
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 3])
    out, blocks = model(x, t, y, return_blocks=(2, 4))
    assert torch.equal(blocks[2], captured[2]) and torch.equal(blocks[4], captured[4])
    assert not torch.equal(captured[1], captured[2])
    assert torch.equal(out, model(x, t, y))            # asking for features changes nothing else


def test_unpatchify_inverts_patchify():
    model = DiT(image_size=8, in_channels=3, patch=2, hidden=32, depth=1, heads=2)
    img = torch.randn(2, 3, 8, 8)
    # patchify by hand: (B, C, g, p, g, p) -> (B, g*g, p*p*C) with the (p, q, c) order of unpatchify
    tokens = img.reshape(2, 3, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 12)
    assert torch.equal(model.unpatchify(tokens), img)


def test_registry_and_errors():
    assert {"DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2", "DiT-B/4", "DiT-Mi/4", "DiT-Ti/2"} <= set(MODELS)
    assert build_model("DiT-S/2").depth == 12 and build_model("DiT-S/2").hidden == 384
    with pytest.raises(ValueError, match="unknown model"):
        build_model("DiT-Huge/2")
    with pytest.raises(ValueError, match="not divisible by the patch"):
        build_model("DiT-Mi/4", image_size=30)


def test_time_embedding_scale():
    """DiT's embedding sees 1000 t, DiT's integer steps: the sin-cos arguments are 1000 t * frequency."""
    emb = build_model("DiT-Mi/4", 8, 1, 3).t_embed
    seen = {}
    emb.mlp[0].register_forward_hook(lambda m, inp, out: seen.__setitem__("x", inp[0]))
    emb(torch.tensor([0.25]))
    assert seen["x"][0, emb.freq_dim // 2].item() == pytest.approx(math.sin(250.0), abs=1e-4)   # frequency 1
