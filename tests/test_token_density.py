"""Token density (tokenroute.methods.token_density), checked from outside: hooks on the blocks count the tokens each
block receives, the output is compared with the unconverted model and with a plain pooled route."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenroute
from tokenroute.core import Patch, Route, RouteError, Segment, apply_patch
from tokenroute.core.operations import PoolTokens
from tokenroute.core.splice.tracer import tracing
from tokenroute.methods.token_density import (TokenDensityConfig, apply_token_density, remove_token_density,
                                              token_density_factors)

from helpers import backbone_inputs, make_backbone

SIZE = 16  # 8 x 8 tokens
MODELS = {name: make_backbone(name, depth=4, size=SIZE).eval() for name in ("dit", "uvit")}
SCHEDULE = [(700.0, 4), (300.0, 2), (0.0, 1)]


def converted(name: str, **config) -> torch.nn.Module:
    return apply_token_density(copy.deepcopy(MODELS[name]), TokenDensityConfig(**({"routes": [(1, 2)]} | config)))


def tokens_seen(model: torch.nn.Module) -> dict[int, int]:
    """Block position -> the number of tokens its stream had in the last forward (a hook on each block)."""
    seen: dict[int, int] = {}
    for i, block in enumerate(tokenroute.core.find_stack(model).blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: None if tracing() else seen.__setitem__(i, a[0].shape[1]))
    return seen


@pytest.mark.parametrize("name", MODELS)
def test_factor_one_is_the_model_and_remove_restores_it_bitwise(name):
    model = converted(name, factor=1)
    x, t, y = backbone_inputs(2, size=SIZE)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), MODELS[name](x, t, y))
    model = converted(name, factor=2)
    with torch.no_grad():
        assert not torch.equal(model(x, t, y), MODELS[name](x, t, y))
    remove_token_density(model)
    assert set(model.state_dict()) == set(MODELS[name].state_dict())
    with torch.no_grad():
        assert torch.equal(model(x, t, y), MODELS[name](x, t, y))


class PlainPooling(Patch):
    name = "plain_pooling"

    def __init__(self, factor: int):
        super().__init__()
        self.segments = [Segment(Route(1, 2, 0.0), PoolTokens(lambda: factor), self.name, needed_in_eval=True)]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("factor", [2, 4])
def test_the_converted_model_starts_as_the_plain_pooled_route(name, factor):
    """merge and refine start contributing nothing: the output is the plain average-pooled route's; FlexDiT's
    initialisation (the route's change dropped, cross-attentions at their default init) starts elsewhere."""
    model = converted(name, factor=factor)
    plain = copy.deepcopy(MODELS[name])
    apply_patch(plain, PlainPooling(factor))
    x, t, y = backbone_inputs(2, size=SIZE)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), plain(x, t, y))
        flexdit = converted(name, factor=factor, init="flexdit")(x, t, y)
    assert not torch.allclose(flexdit, plain(x, t, y), atol=1e-3)


@pytest.mark.parametrize("name", MODELS)
@settings(max_examples=12, deadline=None)
@given(timesteps=st.lists(st.floats(0.0, 1000.0), min_size=1, max_size=3), batch=st.integers(1, 3))
def test_the_schedule_picks_the_grid_per_call(name, timesteps, batch):
    """Each call's blocks inside the route see the grid pooled by the table's factor at that timestep (the densest
    among the batch's timesteps); the blocks outside see the dense grid."""
    model = converted(name, factor=SCHEDULE)
    seen = tokens_seen(model)
    lead = _lead(name)
    x, _, y = backbone_inputs(batch, size=SIZE)
    for t in timesteps:
        samples = torch.tensor([t] + [1000.0] * (batch - 1))  # the others noisier: the first decides
        with torch.no_grad():
            model(x, samples, y)
        factor = next(f for start, f in SCHEDULE if t >= start)
        assert token_density_factors(model) == [factor]
        assert seen[1] == seen[2] == lead + 64 // factor ** 2 and seen[0] == seen[3] == lead + 64


def _lead(name: str) -> int:
    """Tokens before the image grid in the stream: U-ViT puts time and label tokens there."""
    return 2 if name == "uvit" else 0


def test_gradients_reach_the_merge_and_refine_layers():
    model = converted("dit", factor=2).train()
    x, t, y = backbone_inputs(2, size=SIZE)
    model(x, t, y).square().mean().backward()
    layers = model.token_density[0]
    assert layers.merge.out.weight.grad.abs().sum() > 0 and layers.refine.out.weight.grad.abs().sum() > 0
    for layer in (layers.merge, layers.refine):  # past the zero start, every weight learns
        torch.nn.init.normal_(layer.out.weight, std=0.02)
    model.zero_grad()
    model(x, t, y).square().mean().backward()
    for name, p in layers.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_pooling_attention_over_one_key_is_the_mean_of_the_values():
    """A block whose attention sees its 8 x 8 grid pooled to one key gives every query the same output (the mean
    of the values, FlexDiT's pooling attention); a factor of 1 is the block's own attention."""
    outputs = {}
    for d in (1, 8):
        model = converted("dit", routes=[], pooling_attention={0: d})
        branch = tokenroute.core.find_stack(model).blocks[0].attn
        branch.register_forward_hook(lambda m, a, out, d=d: outputs.__setitem__(d, out))
        with torch.no_grad():
            result = model(*backbone_inputs(2, size=SIZE))
        if d == 1:
            assert torch.equal(result, MODELS["dit"](*backbone_inputs(2, size=SIZE)))
    torch.testing.assert_close(outputs[8], outputs[8][:, :1].expand_as(outputs[8]), rtol=0, atol=1e-6)
    assert not torch.allclose(outputs[1], outputs[1][:, :1].expand_as(outputs[1]), atol=1e-3)


@pytest.mark.parametrize("case", ["dit", "pixart"])
def test_diffusers_layouts(case):
    """diffusers' DiT and PixArt (tiny): the grid comes from the graph, factor 1 is the model, factor 2 runs the
    route's blocks on a quarter of the image tokens."""
    from family import cases_core, cases_g1

    plain, inputs = {"dit": cases_core.dit, "pixart": cases_g1.pixart}[case]()
    plain.eval()
    depth = len(tokenroute.core.find_stack(plain).blocks)
    with torch.no_grad():
        reference = plain(**inputs).sample
        one = apply_token_density(copy.deepcopy(plain), TokenDensityConfig(routes=[(1, depth - 2)], factor=1))
        assert torch.equal(one(**inputs).sample, reference)
        two = apply_token_density(copy.deepcopy(plain), TokenDensityConfig(routes=[(1, depth - 2)], factor=2))
        seen = tokens_seen(two)
        two(**inputs)
    assert seen[1] * 4 == seen[0] and seen[depth - 1] == seen[0]


def test_bad_factors_and_schedules_are_refused():
    x, t, y = backbone_inputs(2, size=SIZE)
    with pytest.raises(RouteError, match="does not divide the 8x8 grid"):
        converted("dit", factor=3)(x, t, y)
    with pytest.raises(RouteError, match="outside the noise range"):
        converted("dit", factor=[(1200.0, 4), (0.0, 1)])
    with pytest.raises(RouteError, match="would have no factor"):
        converted("dit", factor=[(500.0, 2)])
    with pytest.raises(RouteError, match="must be an int >= 1"):
        converted("dit", factor=0)
    model = converted("dit", factor=SCHEDULE)
    with pytest.raises(RouteError, match="outside the schedule's range"):
        model(x, torch.full((2,), 1500.0), y)
    with pytest.raises(RouteError, match="timestep_arg="):
        converted("dit", factor=SCHEDULE, timestep_arg="noise")
    renamed = copy.deepcopy(MODELS["dit"])

    class Renamed(type(renamed)):  # a forward whose time argument has no usual name: it must be declared
        def forward(self, x, level, y):
            return super().forward(x, level, y)

    renamed.__class__ = Renamed
    with pytest.raises(RouteError, match="no argument named like a timestep.*timestep_arg='<name>'"):
        apply_token_density(copy.deepcopy(renamed), TokenDensityConfig(routes=[(1, 2)], factor=SCHEDULE))
    declared = apply_token_density(renamed, TokenDensityConfig(routes=[(1, 2)], factor=SCHEDULE, timestep_arg="level"))
    with torch.no_grad():
        declared(x, torch.full((2,), 900.0), y)
    assert token_density_factors(declared) == [4]
    with pytest.raises(RouteError, match="heads do not divide"):
        converted("dit", factor=2, heads=5)


def test_it_composes_with_tread_and_with_local_attention_on_the_pooled_grid():
    """TREAD routes a later block while the pooled route runs (hooks count both reductions); local attention inside
    the pooled route is told the pooled 4 x 4 grid: a radius covering it is the route's own attention, a radius
    of 1 on that grid is not."""
    from tokenroute.methods.local_attention import LocalAttentionConfig, apply_local_attention
    from tokenroute.methods.tread import TreadConfig, apply_tread

    model = converted("dit", factor=2)
    apply_tread(model, TreadConfig(routes=[(3, 3, 0.5)], seed=0))
    seen = tokens_seen(model)
    x, t, y = backbone_inputs(2, size=SIZE)
    model.train()(x, t, y)
    assert (seen[0], seen[1], seen[3]) == (64, 16, 32)
    reference = converted("dit", factor=2)
    with torch.no_grad():
        expected = reference(x, t, y)
        for radius, same in ((100.0, True), (1.0, False)):
            local = apply_local_attention(converted("dit", factor=2),
                                          LocalAttentionConfig(radius=radius, blocks=[1, 2], backend="sdpa"))
            assert torch.allclose(local(x, t, y), expected, atol=1e-5) == same
