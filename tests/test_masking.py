"""MaskDiT masked training on the repo's backbones."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from hypothesis import given, strategies as st

import tokenroute
from tokenroute import RouteError
from tokenroute.core import find_stack
from tokenroute.core.tokens import gather_tokens
from tokenroute.models import DiTBlock

from helpers import backbone_inputs, make_backbone, traced_examples

BACKBONES = ["dit", "uvit", "mamba"]


def decoder_call(model, stack):
    """Run the added decoder after the last block of an unwrapped twin: the reference for eval."""
    decoder = model.tokenroute_masking.decoder
    last = stack.blocks[-1]
    stream = next(iter(inspect.signature(last.forward).parameters))

    def hook(module, args, kwargs, out):
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        return decoder(out, **{k: v for k, v in bound.items() if k != stream})

    return last.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("name", BACKBONES)
@given(ratio=st.sampled_from([0.0, 0.25, 0.5, 0.75]), k=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_eval_is_bitwise_unwrapped_with_stack_decoder(name, ratio, k, seed):
    model = make_backbone(name, depth=5)
    inputs = backbone_inputs(2, seed)
    expected = model.eval()(*inputs)
    tokenroute.mask(model, ratio, decoder=k, seed=seed)
    assert torch.equal(model.eval()(*inputs), expected)


def narrow(depth):
    """MaskDiT's asymmetric decoder: a narrower stack of the model's block class."""
    return tokenroute.Decoder(depth=depth, width=8, block=lambda width: DiTBlock(width, num_heads=2))


@pytest.mark.parametrize("name, own_width", [("dit", False), ("mamba", False), ("dit", True)])
@traced_examples
@given(seed=st.integers(0, 2**16), depth=st.integers(1, 2))
def test_eval_with_added_decoder_is_backbone_then_decoder(name, own_width, seed, depth):
    model = make_backbone(name, depth=4)
    twin = copy.deepcopy(model).eval()
    inputs = backbone_inputs(2, seed)
    decoder = narrow(depth) if own_width else tokenroute.Decoder(depth=depth)
    tokenroute.mask(model, 0.5, decoder=decoder, seed=seed)
    decoder_call(model, find_stack(twin))
    with torch.no_grad():
        assert torch.equal(model.eval()(*inputs), twin(*inputs))
    assert tokenroute.routing_masks(model) == []


@pytest.mark.parametrize("name", BACKBONES)
@traced_examples
@given(ratio=st.sampled_from([0.25, 0.5, 0.75]), k=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_encoder_sees_visible_tokens_and_mask_token_fills_dropped(name, ratio, k, seed):
    model = make_backbone(name, depth=5)
    stack = find_stack(model)
    prefix = model.num_prefix_tokens
    twin = copy.deepcopy(model)  # before any hook: a copy would carry them along
    tokenroute.mask(model, ratio, decoder=k, seed=seed)
    seen = {}
    stack.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("encoder_in", a[0]))
    stack.blocks[-k - 1].register_forward_hook(lambda m, a, out: seen.__setitem__("encoder_out", out))
    stack.blocks[-k].register_forward_pre_hook(lambda m, a: seen.__setitem__("decoder_in", a[0]))
    full = {}
    find_stack(twin).blocks[0].register_forward_pre_hook(lambda m, a: full.__setitem__("embedded", a[0]))
    inputs = backbone_inputs(3, seed)
    model.train()(*inputs)
    twin.train()(*inputs)
    (dropped,) = tokenroute.routing_masks(model)
    n = dropped.shape[1]
    assert (dropped.sum(1) == int(n * ratio)).all()
    keep = (~dropped).nonzero()[:, 1].view(3, -1)
    embedded = full["embedded"]
    assert torch.equal(seen["encoder_in"][:, :prefix], embedded[:, :prefix])
    assert torch.equal(seen["encoder_in"][:, prefix:], gather_tokens(embedded[:, prefix:], keep))
    decoder_in = seen["decoder_in"][:, prefix:]
    token = model.tokenroute_masking.mask_token
    assert torch.equal(decoder_in[dropped], token.expand(int(dropped.sum()), -1))
    assert torch.equal(decoder_in[~dropped], seen["encoder_out"][:, prefix:].reshape(-1, token.shape[0]))


@pytest.mark.parametrize("decoder", [2, tokenroute.Decoder(depth=2), narrow(2)])
def test_gradients_reach_mask_token_and_decoder(decoder):
    model = tokenroute.mask(make_backbone("dit", depth=5), 0.5, decoder=decoder, seed=0)
    model.train()(*backbone_inputs(2)).square().mean().backward()
    masking = model.tokenroute_masking
    assert masking.mask_token.grad.abs().sum() > 0
    if masking.decoder is not None:
        assert all(p.grad is not None for p in masking.decoder.parameters())
        width = masking.decoder.width
        assert masking.decoder.pos_embed.shape[-1] == width and f"width {width}" in tokenroute.explain(model)
    assert "masked training adds <model>.tokenroute_masking" in tokenroute.explain(model)


def test_loss_and_unmasking_tuning():
    model = tokenroute.mask(make_backbone("dit", depth=5), 0.5, decoder=2, seed=0)
    out = model.train()(*backbone_inputs(2))
    masks = tokenroute.routing_masks(model)
    per_token = out.square().mean(1).unfold(1, 2, 2).unfold(2, 2, 2).mean((-1, -2)).flatten(1)
    loss, parts = tokenroute.losses.combine(per_token, masks, mode="visible", mae=per_token, mae_weight=0.1)
    assert torch.allclose(parts["denoise"], per_token[~masks[0]].view(2, -1).mean(1).mean())
    tokenroute.set_ratio(model, 0.0)
    model(*backbone_inputs(2))
    assert not tokenroute.routing_masks(model)[0].any()


def test_unwrap_removes_the_added_parameters():
    model = make_backbone("dit", depth=5)
    keys = set(model.state_dict())
    tokenroute.mask(model, 0.5, decoder=tokenroute.Decoder(depth=1))
    assert any(k.startswith("tokenroute_masking.decoder") for k in model.state_dict())
    tokenroute.unwrap(model)
    assert set(model.state_dict()) == keys


@pytest.mark.parametrize("kwargs, message", [
    (dict(ratio=1.0), r"outside \[0, 1\)"),
    (dict(ratio=-0.5), r"outside \[0, 1\)"),
    (dict(decoder=5), "does not fit a stack of 5"),
    (dict(decoder=0), "does not fit"),
    (dict(decoder="two"), "neither a number"),
    (dict(decoder=tokenroute.Decoder(depth=0)), "at least 1"),
    (dict(decoder=tokenroute.Decoder(depth=1, width=8)), "go together"),
    (dict(decoder=2, routes=[(1, 3, 0.5)]), "overlap"),
])
def test_bad_input(kwargs, message):
    model = make_backbone("dit", depth=5)
    with pytest.raises(RouteError, match=message):
        tokenroute.mask(model, **kwargs)
    assert not tokenroute.is_wrapped(model) and "forward" not in model.__dict__
    assert not hasattr(model, "tokenroute_masking")


def test_added_decoder_refuses_skip_blocks():
    model = make_backbone("uvit", depth=5)
    with pytest.raises(RouteError, match="use decoder=k"):
        tokenroute.mask(model, 0.5, decoder=tokenroute.Decoder(depth=1))


def test_tread_routes_inside_the_decoder():
    model = tokenroute.mask(make_backbone("dit", depth=6), 0.5, decoder=3, routes=[(4, 5, 0.5)], seed=0)
    model.train()(*backbone_inputs(2))
    dropped, routed = tokenroute.routing_masks(model)
    assert dropped.sum() == 16 and routed.sum() == 16
