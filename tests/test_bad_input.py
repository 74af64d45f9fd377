"""Every kind of bad input gets a clear error, and the model is left untouched."""

import pytest
import torch
import torch.nn as nn

import tokenroute
from tokenroute import RouteError

from helpers import ToyTransformer, make_backbone


def assert_untouched(model: nn.Module) -> None:
    assert not tokenroute.is_wrapped(model)
    assert "forward" not in model.__dict__
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("routes, message", [
    ([(2, 9, 0.5)], "out of range"),
    ([(-9, 2, 0.5)], "out of range"),
    ([(3, 1, 0.5)], "starts after it ends"),
    ([(1, 2, 1.0)], "outside [0, 1)"),
    ([(1, 2, -0.1)], "outside [0, 1)"),
    ([(1, 2, "half")], "not a number"),
    ([(0, 3, 0.5), (3, 5, 0.5)], "overlap"),
    ([(4, 5, 0.5), (1, -2, 0.5)], "overlap"),
    ([], "empty"),
    ([(1, 2)], "(start, end, ratio)"),
    ([(1.5, 2, 0.5)], "not an integer"),
])
def test_bad_routes(routes, message):
    model = ToyTransformer(depth=6)
    with pytest.raises(RouteError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        tokenroute.wrap(model, routes)
    assert_untouched(model)


def test_no_block_stack():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with pytest.raises(RouteError, match="no block stack found"):
        tokenroute.wrap(nn.Linear(3, 3), [(0, 0, 0.5)])
    with pytest.raises(RouteError, match="blocks="):
        tokenroute.wrap(model, [(0, 0, 0.5)], blocks="missing")
    assert_untouched(model)


def test_block_token_axis_unknown():
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, *args, **kwargs):
            return self.lin(args[0])

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Opaque(), Opaque()])

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    model = Model()
    with pytest.raises(RouteError, match="register_block"):
        tokenroute.wrap(model, [(0, 1, 0.5)])
    assert_untouched(model)


def test_already_wrapped():
    model = make_backbone("dit", depth=4)
    tokenroute.wrap(model, [(1, 2, 0.5)])
    before = model.forward
    with pytest.raises(RouteError, match="already wrapped"):
        tokenroute.wrap(model, [(1, 2, 0.5)])
    assert model.forward == before
    tokenroute.unwrap(model)
    assert_untouched(model)


def test_not_wrapped_and_bad_options():
    model = ToyTransformer()
    with pytest.raises(RouteError, match="not wrapped"):
        tokenroute.routing_masks(model)
    with pytest.raises(RouteError, match="mechanism"):
        tokenroute.wrap(model, [(1, 2, 0.5)], mechanism="magic")
    with pytest.raises(RouteError, match="prefix_tokens"):
        tokenroute.wrap(model, [(1, 2, 0.5)], prefix_tokens=-1)
    with pytest.raises(RouteError, match="protect"):
        tokenroute.wrap(model, [(1, 2, 0.5)], protect=[0, 1])
    with pytest.raises(TypeError, match="nn.Module"):
        tokenroute.wrap(lambda x: x, [(1, 2, 0.5)])
    assert_untouched(model)


def test_routing_override_errors():
    model = tokenroute.wrap(ToyTransformer(), [(1, 2, 0.5)])
    with pytest.raises(RouteError, match="2 ratios given for 1 routes"):
        with tokenroute.routing(model, ratio=[0.1, 0.2]):
            pass
    with pytest.raises(RouteError, match=r"outside \[0, 1\)"):
        with tokenroute.routing(model, ratio=1.5):
            pass


def test_protect_more_than_kept():
    model = tokenroute.wrap(ToyTransformer(), [(1, 2, 0.5)], protect=torch.ones(10, dtype=torch.bool))
    with pytest.raises(RouteError, match="protected"):
        model(torch.randn(2, 10, 3), torch.randn(2, 8))
