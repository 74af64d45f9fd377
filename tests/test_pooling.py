"""Pooled routes (tokenroute.core.operations.PoolTokens, the token operation token density builds on), checked
from outside: hooks on the blocks see the pooled grid, and what leaves the route is the entering stream plus the
upsampled change."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import tokenroute
from tokenroute.core import Patch, Route, RouteError, Segment, apply_patch, remove_patch
from tokenroute.core.operations import PoolTokens
from tokenroute.core.splice.tracer import tracing

from helpers import backbone_inputs, make_backbone

SIZE = 16  # 8 x 8 tokens
MODELS = {name: make_backbone(name, depth=4, size=SIZE).eval() for name in ("dit", "uvit")}


class Pooling(Patch):
    name = "pooling"

    def __init__(self, start: int, end: int, factor: int):
        super().__init__()
        self.factor = factor
        self.segments = [Segment(Route(start, end, 0.0), PoolTokens(lambda: self.factor), self.name,
                                 needed_in_eval=True)]


def pooled(name: str, factor: int, start: int = 1, end: int = 2) -> tuple[torch.nn.Module, Pooling]:
    model = copy.deepcopy(MODELS[name])
    patch = Pooling(start, end, factor)
    apply_patch(model, patch)
    return model, patch


@pytest.mark.parametrize("name", MODELS)
def test_factor_one_is_the_model(name):
    model, _ = pooled(name, 1)
    x, t, y = backbone_inputs(2, size=SIZE)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), MODELS[name](x, t, y))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("factor", [2, 4])
def test_the_blocks_see_the_pooled_grid_and_the_exit_adds_their_change(name, factor):
    """Hooks: block 1 receives block 0's output with its 8x8 image grid average-pooled (other tokens as they
    are); block 3 receives block 0's output plus block 2's change to the pooled tokens, upsampled."""
    model, _ = pooled(name, factor)
    stack = tokenroute.core.find_stack(model)
    seen = {}
    for i in range(4):
        stack.blocks[i].register_forward_pre_hook(lambda m, a, i=i: None if tracing() else seen.__setitem__(f"in{i}", a[0]))
        stack.blocks[i].register_forward_hook(lambda m, a, o, i=i: None if tracing() else seen.__setitem__(f"out{i}", o))
    x, t, y = backbone_inputs(2, size=SIZE)
    with torch.no_grad():
        model(x, t, y)
    full, lead = seen["out0"], seen["out0"].shape[1] - 64
    side, d = 8 // factor, full.shape[-1]
    grid = full[:, lead:].reshape(2, 8, 8, d).permute(0, 3, 1, 2)
    expected = torch.cat([full[:, :lead], F.avg_pool2d(grid, factor).flatten(2).transpose(1, 2)], dim=1)
    torch.testing.assert_close(seen["in1"], expected, rtol=0, atol=1e-6)
    change = (seen["out2"] - seen["in1"])[:, lead:].reshape(2, side, side, d).permute(0, 3, 1, 2)
    up = F.interpolate(change, scale_factor=factor, mode="nearest").flatten(2).transpose(1, 2)
    torch.testing.assert_close(seen["in3"][:, lead:], full[:, lead:] + up, rtol=0, atol=1e-5)
    torch.testing.assert_close(seen["in3"][:, :lead], seen["out2"][:, :lead], rtol=0, atol=0)


def test_gradients_pass_and_remove_restores_and_bad_factors_are_refused():
    model, patch = pooled("dit", 2)
    x, t, y = backbone_inputs(2, size=SIZE)
    model.train()(x, t, y).square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("blocks.1."))
    remove_patch(model, "pooling")
    assert not tokenroute.is_wrapped(model)
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t, y), MODELS["dit"](x, t, y))
    model, patch = pooled("dit", 3)
    with pytest.raises(RouteError, match="does not divide the 8x8 grid"):
        model(x, t, y)


def test_local_attention_inside_a_pooled_route_sees_the_pooled_grid():
    """A method reading a block's tokens inside a pooled route is told the coarser grid, not the dense one."""
    model, _ = pooled("dit", 2)
    registry = tokenroute.core.patches.registry_of(model)
    from tokenroute.core import Tap

    class Reader(Patch):
        name = "reader"

        def __init__(self):
            super().__init__()
            self.taps, self.seen = [Tap(1, self.name)], []

        def attach(self, stack):
            stack.blocks[1].register_forward_pre_hook(
                lambda m, a: None if tracing() else self.seen.append(registry.splice.boundaries.tokens_at(1)))

    reader = Reader()
    apply_patch(model, reader)
    x, t, y = backbone_inputs(1, size=SIZE)
    with torch.no_grad():
        model(x, t, y)
    (tokens,) = reader.seen[-1:]
    assert tokens.layout.grid == (4, 4) and tokens.layout.image == 16 and tokens.index is None
