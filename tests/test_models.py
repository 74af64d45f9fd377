"""Reference backbones: shapes, patch layout, the selective scan, causality, hand-routed DiT, U-ViT skips."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenroute.models import (
    DIT_PRESETS,
    MAMBA_PRESETS,
    UVIT_PRESETS,
    DiffusionMamba,
    DiT,
    DiTBlock,
    MambaBlock,
    UViT,
    UViTBlock,
    build_backbone,
    get_2d_sincos_pos_embed,
    patchify,
    selective_scan,
    selective_scan_ref,
    unpatchify,
)
from tokenroute.models.layers import PatchEmbed, TimestepEmbedder

from handwritten import dit_forward_handrouted

FAMILIES = {"dit": DiT, "uvit": UViT, "mamba": DiffusionMamba}


def randomize_(model: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """Re-initialise every parameter from N(0, std): a fresh DiT outputs exactly zero (adaLN-zero), which
    would make output comparisons vacuous."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def tiny_inputs(batch: int = 2, channels: int = 1, size: int = 8, num_classes: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=gen)
    t = torch.rand(batch, generator=gen) * 1000
    y = torch.randint(0, num_classes + 1, (batch,), generator=gen)  # num_classes = null label
    return x, t, y


# --------------------------------------------------------------------------------------------------
# Construction and shapes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_output_shape_and_attributes(name):
    model = randomize_(build_backbone(name, "tiny"))
    x, t, y = tiny_inputs(batch=3)
    out = model(x, t, y)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()
    assert model.num_prefix_tokens == (0 if name == "dit" else 2)
    assert (model.patch_size, model.in_channels, model.out_channels, model.num_classes) == (2, 1, 1, 10)


def test_dit_learn_sigma_doubles_channels_and_fresh_output_is_zero():
    model = DiT.from_preset("tiny", learn_sigma=True, in_channels=3)
    x, t, y = tiny_inputs(channels=3)
    out = model(x, t, y)
    assert out.shape == (2, 6, 8, 8) and model.out_channels == 6
    assert torch.count_nonzero(out) == 0  # adaLN-zero: why every comparison test randomizes first
    assert "pos_embed" not in model.state_dict()  # fixed, non-persistent buffer


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_bf16_autocast_forward(name):
    model = randomize_(build_backbone(name, "tiny"))
    x, t, y = tiny_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    ref = model(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.05)


def test_presets_and_build_backbone_errors():
    assert {"DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2", "tiny"} <= set(DIT_PRESETS)
    assert {"U-ViT-S/2", "tiny"} <= set(UVIT_PRESETS)
    assert {"Mamba-B/2", "tiny"} <= set(MAMBA_PRESETS)
    with torch.device("meta"):  # sizes without allocating: DiT-XL/2 is the 675M model of the paper
        xl = DiT.from_preset("DiT-XL/2", num_classes=1000, learn_sigma=True)
        b2 = build_backbone("dit", "DiT-B/2", num_classes=1000, learn_sigma=True)
    assert round(sum(p.numel() for p in xl.parameters()) / 1e6) == 675
    assert round(sum(p.numel() for p in b2.parameters()) / 1e6) == 130
    assert len(build_backbone("dit", "tiny", depth=2).blocks) == 2
    with pytest.raises(ValueError, match="dit"):
        build_backbone("resnet", "tiny")
    with pytest.raises(ValueError, match="DiT-B/2"):
        build_backbone("dit", "DiT-Q/3")
    with pytest.raises(ValueError, match="tiny"):
        UViT.from_preset("huge")


def test_embedders():
    emb = TimestepEmbedder(32)
    for t in (torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0.0, 500.0, 999.0]), torch.tensor([1, 2, 3])):
        out = emb(t)
        assert out.shape == (3, 32) and torch.isfinite(out).all()
    f = TimestepEmbedder.timestep_embedding(torch.tensor([0.25, 0.5]), 256)
    assert f.dtype == torch.float32 and not torch.equal(f[0], f[1])  # fractional timesteps are distinguished
    model = DiT.from_preset("tiny")
    assert model.y_embedder.embedding_table.num_embeddings == model.num_classes + 1


# --------------------------------------------------------------------------------------------------
# Patches and position embedding
# --------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), c=st.integers(1, 4), p=st.integers(1, 4), gh=st.integers(1, 5),
       gw=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_patchify_unpatchify_exact_inverse(b, c, p, gh, gw, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, gh * p, gw * p, generator=gen)
    tokens = patchify(x, p)
    assert tokens.shape == (b, gh * gw, p * p * c)
    assert torch.equal(unpatchify(tokens, p, gh, gw, c), x)
    other = torch.randn(b, gh * gw, p * p * c, generator=gen)
    assert torch.equal(patchify(unpatchify(other, p, gh, gw, c), p), other)


def test_patch_layout_row_major_ppc_and_patch_embed_agree():
    b, c, p, gh, gw = 2, 3, 2, 3, 4
    x = torch.randn(b, c, gh * p, gw * p)
    tokens = patchify(x, p)
    for hi, wi, i, j, ch in [(0, 0, 0, 0, 0), (1, 2, 1, 0, 2), (2, 3, 1, 1, 1), (0, 3, 0, 1, 2)]:
        assert tokens[1, hi * gw + wi, (i * p + j) * c + ch] == x[1, ch, hi * p + i, wi * p + j]
    embed = PatchEmbed((gh * p, gw * p), p, c, 16)
    weight = embed.proj.weight.permute(0, 2, 3, 1).reshape(16, -1)  # (D, p, p, C) flattened
    torch.testing.assert_close(embed(x), tokens @ weight.T + embed.proj.bias, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="grid"):
        unpatchify(tokens, p, gh * p, gw * p, c)  # pixel sizes instead of grid sizes


def test_sincos_pos_embed():
    emb = get_2d_sincos_pos_embed(16, 3, 5)
    assert emb.shape == (15, 16) and emb.dtype == torch.float32
    # first half encodes the column, second half the row (MAE / DiT layout)
    assert torch.equal(emb[1, :8], emb[6, :8]) and not torch.equal(emb[1, 8:], emb[6, 8:])
    assert torch.equal(emb[5, 8:], emb[7, 8:]) and not torch.equal(emb[5, :8], emb[7, :8])
    assert len({tuple(r.tolist()) for r in emb}) == 15


# --------------------------------------------------------------------------------------------------
# Selective scan and Mamba causality
# --------------------------------------------------------------------------------------------------


def scan_inputs(b, l, h, p, n, seed, dt_scale, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen, dtype=dtype)
    dt = torch.rand(b, l, h, generator=gen, dtype=dtype) * dt_scale
    A = -torch.rand(h, generator=gen, dtype=dtype) * 16
    B = torch.randn(b, l, n, generator=gen, dtype=dtype)
    C = torch.randn(b, l, n, generator=gen, dtype=dtype)
    D = torch.randn(h, generator=gen, dtype=dtype)
    return x, dt, A, B, C, D


@settings(max_examples=60, deadline=None)
@given(l=st.integers(1, 80), h=st.integers(1, 4), p=st.integers(1, 4), n=st.integers(1, 5),
       chunk=st.integers(1, 40), dt_scale=st.sampled_from([0.01, 0.3, 3.0, 100.0]), seed=st.integers(0, 2**16))
def test_selective_scan_matches_reference(l, h, p, n, chunk, dt_scale, seed):
    inputs = scan_inputs(2, l, h, p, n, seed, dt_scale)
    ref = selective_scan_ref(*inputs)
    torch.testing.assert_close(selective_scan(*inputs, chunk_size=chunk), ref, atol=1e-10, rtol=1e-9)
    fast32 = selective_scan(*(v.float() for v in inputs), chunk_size=chunk)
    assert fast32.dtype == torch.float32 and torch.isfinite(fast32).all()
    torch.testing.assert_close(fast32, ref.float(), atol=2e-4, rtol=2e-4)


def test_selective_scan_gradients_match_reference():
    leaves = [v.requires_grad_() for v in scan_inputs(2, 45, 3, 2, 4, 7, 0.5)]
    grads_ref = torch.autograd.grad(selective_scan_ref(*leaves).square().sum(), leaves)
    grads = torch.autograd.grad(selective_scan(*leaves, chunk_size=8).square().sum(), leaves)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, g_ref, atol=1e-9, rtol=1e-8)


def test_selective_scan_runs_in_float32_under_bf16_autocast():
    inputs = [v.to(torch.bfloat16) for v in scan_inputs(2, 70, 4, 2, 3, 3, 1.0)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = selective_scan(*inputs, chunk_size=16)
    assert out.dtype == torch.bfloat16
    ref = selective_scan_ref(*(v.double() for v in inputs))
    torch.testing.assert_close(out.double(), ref, atol=0.05, rtol=0.02)  # only the final cast rounds


def test_mamba_mixer_is_causal():
    block = randomize_(MambaBlock(16, d_state=4, headdim=8, chunk_size=8), std=0.2)
    x = torch.randn(2, 37, 16)
    with torch.no_grad():
        for j in (0, 5, 16, 36):
            x2 = x.clone()
            x2[:, j] += torch.randn(2, 16)
            out, out2 = block.mixer(x), block.mixer(x2)
            assert torch.equal(out[:, :j], out2[:, :j])
            assert not torch.allclose(out[:, j], out2[:, j])
            assert torch.equal(block(x)[:, :j], block(x2)[:, :j])


def test_diffusion_mamba_is_causal_over_patches():
    model = randomize_(DiffusionMamba.from_preset("tiny"), std=0.1)
    x, t, y = tiny_inputs()
    x2 = x.clone()
    x2[:, :, 4:6, 2:4] += 1.0  # patch (row 2, col 1) of the 4x4 grid: token 9
    with torch.no_grad():
        out, out2 = patchify(model(x, t, y), 2), patchify(model(x2, t, y), 2)
    assert torch.equal(out[:, :9], out2[:, :9])
    assert not torch.allclose(out[:, 9:], out2[:, 9:])


# --------------------------------------------------------------------------------------------------
# Hand-routed DiT
# --------------------------------------------------------------------------------------------------


def test_dit_handrouted_keep_all_equals_forward_bitwise():
    model = randomize_(DiT.from_preset("tiny"))
    x, t, y = tiny_inputs(batch=3)
    n = model.x_embedder.num_patches
    keep = torch.arange(n).expand(3, n)
    with torch.no_grad():
        ref = model(x, t, y)
        assert torch.count_nonzero(ref) > 0
        assert torch.equal(dit_forward_handrouted(model, x, t, y, []), ref)
        assert torch.equal(dit_forward_handrouted(model, x, t, y, [(1, 2, keep)]), ref)
        assert torch.equal(dit_forward_handrouted(model, x, t, y, [(0, 0, keep), (2, 3, keep)]), ref)


def test_dit_handrouted_subset_skips_dropped_tokens():
    model = randomize_(DiT.from_preset("tiny"))
    x, t, y = tiny_inputs()
    n = model.x_embedder.num_patches
    gen = torch.Generator().manual_seed(1)
    keep = torch.stack([torch.randperm(n, generator=gen)[: n // 2].sort().values for _ in range(2)])
    seen = {}
    hooks = [model.blocks[0].register_forward_hook(lambda m, a, out: seen.__setitem__("before", out)),
             model.blocks[3].register_forward_pre_hook(lambda m, a: seen.__setitem__("after", a[0]))]
    with torch.no_grad():
        out = dit_forward_handrouted(model, x, t, y, [(1, 2, keep)])
    for h in hooks:
        h.remove()
    assert out.shape == x.shape and not torch.allclose(out, model(x, t, y))
    dropped = torch.ones(2, n, dtype=torch.bool)
    dropped[torch.arange(2)[:, None], keep] = False
    assert torch.equal(seen["before"][dropped], seen["after"][dropped])  # dropped tokens skipped blocks 1..2
    assert not torch.allclose(seen["before"][~dropped], seen["after"][~dropped])
    with pytest.raises(ValueError, match="overlaps"):
        dit_forward_handrouted(model, x, t, y, [(0, 2, keep), (2, 3, keep)])
    with pytest.raises(ValueError, match="out of range"):
        dit_forward_handrouted(model, x, t, y, [(1, 4, keep)])


# --------------------------------------------------------------------------------------------------
# U-ViT skips
# --------------------------------------------------------------------------------------------------


def test_uvit_skips_are_lifo_and_stack_order():
    model = randomize_(UViT.from_preset("tiny"))
    assert len(model.in_blocks) == len(model.out_blocks) == 2 and isinstance(model.mid_block, UViTBlock)
    names = [n for n, _ in model.named_children() if n in ("in_blocks", "mid_block", "out_blocks")]
    assert names == ["in_blocks", "mid_block", "out_blocks"]
    assert all(b.skip_linear is None for b in [*model.in_blocks, model.mid_block])
    assert all(b.skip_linear is not None for b in model.out_blocks)

    outputs, skips = [], []
    hooks = [b.register_forward_hook(lambda m, a, out: outputs.append(out)) for b in model.in_blocks]
    hooks += [b.register_forward_pre_hook(lambda m, a: skips.append(a[1])) for b in model.out_blocks]
    x, t, y = tiny_inputs()
    with torch.no_grad():
        out = model(x, t, y)
    for h in hooks:
        h.remove()
    assert out.shape == x.shape
    assert len(skips) == 2
    assert skips[0] is outputs[1] and skips[1] is outputs[0]
    assert outputs[0].shape[1] == model.num_prefix_tokens + model.patch_embed.num_patches
    with pytest.raises(ValueError, match="skip"):
        model.out_blocks[0](outputs[0])


def test_block_signatures():
    d = 16
    x, c = torch.randn(2, 5, d), torch.randn(2, d)
    assert DiTBlock(d, 2)(x, c).shape == x.shape
    assert UViTBlock(d, 2, skip=True)(x, x).shape == x.shape
    assert MambaBlock(d, headdim=8)(x).shape == x.shape
