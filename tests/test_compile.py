"""torch.compile on routed models: routing adds no graph break (the draw is tensor arithmetic on a counter, the
graph lookup is traceable), and the compiled model routes and computes as the eager one does."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo as dynamo

import tokenroute

from helpers import backbone_inputs, make_backbone

APPLY = {
    "tread": lambda model: tokenroute.wrap(model, [(1, 3, 0.5)], seed=0),
    "maskdit": lambda model: tokenroute.mask(model, 0.5, decoder=2, seed=0),
}


def graphs(model: torch.nn.Module, *args: torch.Tensor, **kwargs: torch.Tensor) -> tuple[int, int]:
    """The graphs and graph breaks torch.compile makes of one forward."""
    dynamo.reset()
    explained = dynamo.explain(model)(*args, **kwargs)
    dynamo.reset()
    return explained.graph_count, explained.graph_break_count


@pytest.mark.parametrize("method", APPLY)
@pytest.mark.parametrize("backbone", ["dit", "uvit", "mamba"])
def test_routing_adds_no_graph_break(backbone, method):
    inputs = backbone_inputs(2)
    plain = make_backbone(backbone).train()
    routed = APPLY[method](copy.deepcopy(plain)).train()
    routed(*inputs)  # the first routed forward traces its graph (eagerly, outside torch.compile)
    assert graphs(routed, *inputs) == graphs(plain, *inputs)
    assert tokenroute.routing_masks(routed)  # the explained forward routed


@pytest.mark.parametrize("method", APPLY)
def test_the_compiled_model_routes_and_trains_as_the_eager_one(method):
    """Step by step, from the first call on: the same masks (the draw's counter advances inside the compiled
    graph), outputs and gradients, also when the input's signature changes."""
    applied = APPLY[method](make_backbone("dit"))  # once: MaskDiT's mask token is drawn when it is applied
    eager, compiled_model = copy.deepcopy(applied).train(), copy.deepcopy(applied).train()
    dynamo.reset()
    compiled = torch.compile(compiled_model, backend="aot_eager")
    for step, batch in enumerate((2, 2, 3)):  # a new batch size: a new signature, traced and compiled anew
        inputs = backbone_inputs(batch, seed=step)
        out_eager, out_compiled = eager(*inputs), compiled(*inputs)
        masks = tokenroute.routing_masks(eager)
        assert masks and all(m.any() for m in masks)
        assert all(torch.equal(a, b) for a, b in zip(masks, tokenroute.routing_masks(compiled_model), strict=True))
        torch.testing.assert_close(out_compiled, out_eager)
        out_eager.square().mean().backward()
        out_compiled.square().mean().backward()
        for a, b in zip(eager.parameters(), compiled_model.parameters(), strict=True):
            torch.testing.assert_close(b.grad, a.grad)
            a.grad = b.grad = None
    dynamo.reset()


def test_fullgraph_compiles_after_one_eager_forward():
    """The first routed forward traces its graph eagerly (outside torch.compile); after it, fullgraph=True
    compiles the routed model whole."""
    model = APPLY["tread"](make_backbone("dit")).train()
    model(*backbone_inputs(2, seed=9))
    eager = copy.deepcopy(model)
    dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    for step in range(2):
        inputs = backbone_inputs(2, seed=step)
        torch.testing.assert_close(compiled(*inputs), eager(*inputs))
        assert torch.equal(tokenroute.routing_masks(model)[0], tokenroute.routing_masks(eager)[0])
    dynamo.reset()


@pytest.mark.parametrize("name", ["dit", "pixart", "sd3", "flux"])
def test_routed_diffusers_transformers_compile_into_the_graphs_of_the_unwrapped(name):
    pytest.importorskip("diffusers")
    import test_diffusers

    model, inputs = test_diffusers.build(name)
    model.train()
    routed = tokenroute.wrap(copy.deepcopy(model), [(1, 2, 0.5)], seed=0).train()
    routed(**inputs)
    assert graphs(routed, **inputs) == graphs(model, **inputs)
    assert tokenroute.routing_masks(routed)


def test_signature_keys_tell_apart_what_the_pytree_spec_tells_apart():
    """The graph cache's key (hashable under torch.compile) separates calls whose arguments nest differently,
    whose dict keys differ, or whose registered pytree nodes differ in context, and matches equal calls."""
    from collections import OrderedDict, deque

    from tokenroute.core.splice import signature_key

    a, b = torch.zeros(2, 3), torch.ones(2, 3)

    def key(*args, **kwargs):
        return signature_key(True, args, kwargs)[0]

    assert key(a, (b,)) == key(b, (a,))  # values do not count, metadata and nesting do
    distinct = [key(a, (b,)), key(a, [b]), key(a, b), key(a, {"x": b}), key(a, {"y": b}), key(a, OrderedDict(x=b)),
                key(a, y=b), key(a, deque([b], maxlen=2)), key(a, deque([b], maxlen=3))]
    assert len(set(distinct)) == len(distinct)


@pytest.mark.parametrize("seed", [0, None])
def test_after_the_first_call_each_step_reuses_one_graph(seed):
    """Compiled from the first call: that call traces the routed graph and makes the draw's state outside
    torch.compile, the second compiles the routed forward whole; every later step of the same signature runs
    that graph, with no new graph, break or recompile."""
    from torch._dynamo.utils import counters

    model = tokenroute.wrap(make_backbone("dit"), [(1, 3, 0.5)], seed=seed).train()
    dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(2):
        compiled(*backbone_inputs(2)).square().mean().backward()
    counters.clear()
    for step in range(3):
        compiled(*backbone_inputs(2, seed=step)).square().mean().backward()
    assert not counters["stats"]["unique_graphs"] and not counters["graph_break"] and not counters["recompiles"]
    dynamo.reset()


def test_the_seed_enters_compiled_graphs_as_data():
    """Models routed with other seeds or by other methods, compiled in one process (as a benchmark comparing
    them does), share the code torch.compile recompiles; the seed must reach their graphs as a tensor, never as
    an integer symbol (whose arithmetic overflows int64 in generated kernels) or a burnt-in constant."""
    symbols: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
        symbols.extend(n.name for n, x in zip(placeholders, example_inputs, strict=True) if isinstance(x, torch.SymInt))
        return gm.forward

    plain = make_backbone("dit")
    dynamo.reset()
    masks = []
    for apply in (APPLY["tread"], APPLY["maskdit"], lambda m: tokenroute.wrap(m, [(1, 3, 0.5)], seed=1)):
        model = apply(copy.deepcopy(plain)).train()
        compiled = torch.compile(model, backend=backend)
        for step in range(2):
            compiled(*backbone_inputs(2, seed=step)).square().mean().backward()
        masks.append(tokenroute.routing_masks(model)[0])
    dynamo.reset()
    assert not symbols
    assert not torch.equal(masks[0], masks[2])  # the seed still counts
