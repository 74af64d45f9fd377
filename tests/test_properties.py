"""Properties of routed forwards on the repo's backbones and a user model, over random routes, ratios,
batch sizes, token counts and seeds."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, strategies as st

import tokenroute
from tokenroute.core.tokens import gather_tokens
from tokenroute.training import flop_counter
from handwritten import dit_forward_handrouted

from helpers import ToyTransformer, backbone_inputs, make_backbone, randomize, traced_examples

BACKBONES = ["dit", "uvit", "mamba"]


@st.composite
def routes_for(draw, depth: int, max_routes: int = 2):
    """Non-overlapping (start, end, ratio) routes over a stack of ``depth`` blocks."""
    cuts = sorted(draw(st.lists(st.integers(0, depth - 1), min_size=2, max_size=2 * max_routes, unique=True)))
    routes = []
    for start, end in zip(cuts[::2], cuts[1::2]):
        routes.append((start, end, draw(st.sampled_from([0.0, 0.25, 0.5, 0.7, 0.9]))))
    return routes


def run(model, inputs, train=True):
    model.train(train)
    return model(*inputs)


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKBONES)
@given(data=st.data(), batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_eval_is_bitwise_unwrapped(name, data, batch, seed):
    model = make_backbone(name, depth=5, seed=seed % 7)
    inputs = backbone_inputs(batch, seed)
    expected = run(model, inputs, train=False)
    tokenroute.wrap(model, data.draw(routes_for(5)), seed=seed)
    assert torch.equal(run(model, inputs, train=False), expected)
    assert tokenroute.routing_masks(model) == []


@pytest.mark.parametrize("name", BACKBONES)
@traced_examples
@given(data=st.data(), batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_ratio_zero_training_is_bitwise_unwrapped(name, data, batch, seed):
    model = make_backbone(name, depth=5)
    inputs = backbone_inputs(batch, seed)
    expected = run(model, inputs)
    routes = [(s, e, 0.0) for s, e, _ in data.draw(routes_for(5))]
    tokenroute.wrap(model, routes, seed=seed)
    assert torch.equal(run(model, inputs), expected)
    masks = tokenroute.routing_masks(model)
    assert len(masks) == len(routes) and not any(m.any() for m in masks)


@traced_examples
@given(data=st.data(), batch=st.integers(1, 3), size=st.sampled_from([4, 6, 8]), seed=st.integers(0, 2**16))
def test_dit_matches_handwritten_tread(data, batch, size, seed):
    """The splice computes exactly what TREAD's hand-written loop computes with the same kept tokens."""
    model = make_backbone("dit", depth=6, size=size)
    inputs = backbone_inputs(batch, seed, size=size)
    routes = data.draw(routes_for(6))
    tokenroute.wrap(model, routes, seed=seed)
    out = run(model, inputs)
    masks = tokenroute.routing_masks(model)
    n = (size // 2) ** 2
    assert [m.shape for m in masks] == [(batch, n)] * len(routes)
    for (s, e, ratio), mask in zip(routes, masks):
        assert (mask.sum(1) == int(n * ratio)).all()
    keeps = [(s, e, (~m).nonzero()[:, 1].view(batch, -1)) for (s, e, _), m in zip(routes, masks)]
    reference = dit_forward_handrouted(model, *inputs, keeps)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", BACKBONES)
@traced_examples
@given(data=st.data(), batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_skipped_tokens_leave_with_route_start_values(name, data, batch, seed):
    """Capture the stream entering and leaving one route: skipped tokens come back unchanged, kept
    tokens enter in their original order, prefix tokens are never dropped."""
    model = make_backbone(name, depth=5)
    stack = tokenroute.core.find_stack(model)
    start = data.draw(st.integers(1, 3))
    end = data.draw(st.integers(start, 3))
    ratio = data.draw(st.sampled_from([0.25, 0.5, 0.75]))
    tokenroute.wrap(model, [(start, end, ratio)], seed=seed)
    prefix = model.num_prefix_tokens
    seen = {}
    stack.blocks[start - 1].register_forward_hook(lambda m, a, out: seen.__setitem__("before", out))
    stack.blocks[start].register_forward_pre_hook(lambda m, a: seen.__setitem__("entering", a[0]))
    stack.blocks[end + 1].register_forward_pre_hook(lambda m, a: seen.__setitem__("after", a[0]))
    run(model, backbone_inputs(batch, seed))
    (mask,) = tokenroute.routing_masks(model)
    before, after = seen["before"], seen["after"]
    routable_before, routable_after = before[:, prefix:], after[:, prefix:]
    assert torch.equal(routable_after[mask], routable_before[mask])
    assert seen["entering"].shape[1] == prefix + int((~mask[0]).sum())
    if prefix:  # prefix tokens are never set aside: the route's blocks process them
        assert not torch.equal(after[:, :prefix], before[:, :prefix])
    keep = (~mask).nonzero()[:, 1].view(batch, -1)
    assert torch.equal(seen["entering"][:, :prefix], before[:, :prefix])
    assert torch.equal(seen["entering"][:, prefix:], gather_tokens(routable_before, keep))
    assert not torch.equal(routable_after[~mask], routable_before[~mask])  # kept ones were processed


@pytest.mark.parametrize("name", BACKBONES)
@traced_examples
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_graph_splice_equals_hook_splice(name, data, seed):
    """The two mechanisms are independent implementations of one semantics: same seed, same output."""
    routes = data.draw(routes_for(5))
    model = make_backbone(name, depth=5)
    other = copy.deepcopy(model)
    inputs = backbone_inputs(2, seed)
    tokenroute.wrap(model, routes, seed=seed, mechanism="fx")
    tokenroute.wrap(other, routes, seed=seed, mechanism="hooks")
    out_fx, out_hooks = run(model, inputs), run(other, inputs)
    for a, b in zip(tokenroute.routing_masks(model), tokenroute.routing_masks(other)):
        assert torch.equal(a, b)
    torch.testing.assert_close(out_fx, out_hooks, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", BACKBONES)
@traced_examples
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_gradients_reach_every_trained_parameter(name, data, seed):
    model = make_backbone(name, depth=5)
    inputs = backbone_inputs(2, seed)
    run(model, inputs).square().mean().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    model.zero_grad(set_to_none=True)
    tokenroute.wrap(model, [(s, e, min(r, 0.5)) for s, e, r in data.draw(routes_for(5))], seed=seed)
    run(model, inputs).square().mean().backward()
    routed = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert routed == trained


@pytest.mark.parametrize("name", BACKBONES)
@traced_examples
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_same_seed_same_masks(name, data, seed):
    routes = data.draw(routes_for(5))
    a, b = make_backbone(name, depth=5), make_backbone(name, depth=5)
    inputs = backbone_inputs(3, seed)
    tokenroute.wrap(a, routes, seed=seed)
    tokenroute.wrap(b, routes, seed=seed)
    for _ in range(2):
        out_a, out_b = run(a, inputs), run(b, inputs)
        assert torch.equal(out_a, out_b)
        for ma, mb in zip(tokenroute.routing_masks(a), tokenroute.routing_masks(b)):
            assert torch.equal(ma, mb)


def test_masks_change_between_steps_and_seeds():
    model = tokenroute.wrap(make_backbone("dit"), [(1, 3, 0.5)], seed=1)
    other = tokenroute.wrap(make_backbone("dit"), [(1, 3, 0.5)], seed=2)
    inputs = backbone_inputs(4)
    run(model, inputs)
    first = tokenroute.routing_masks(model)[0]
    run(model, inputs)
    run(other, inputs)
    assert not torch.equal(first, tokenroute.routing_masks(model)[0])
    assert not torch.equal(tokenroute.routing_masks(model)[0], tokenroute.routing_masks(other)[0])


@pytest.mark.parametrize("name", BACKBONES)
@traced_examples
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_unwrap_restores_bitwise(name, data, seed):
    model = make_backbone(name, depth=5)
    inputs = backbone_inputs(2, seed)
    expected = run(model, inputs)
    keys, params = list(model.state_dict()), list(model.parameters())
    cls = type(model)
    tokenroute.wrap(model, data.draw(routes_for(5)), seed=seed)
    assert type(model) is cls and list(model.state_dict()) == keys
    assert all(a is b for a, b in zip(model.parameters(), params))
    run(model, inputs)
    tokenroute.unwrap(model)
    assert "forward" not in model.__dict__ and not tokenroute.is_wrapped(model)
    assert torch.equal(run(model, inputs), expected)


def _flops(fn) -> int:
    with flop_counter() as counter:  # attention counted on the CPU too
        fn()
    return counter.get_total_flops()


@traced_examples
@given(data=st.data(), batch=st.integers(1, 3))
def test_flops_fall_as_the_routes_imply(data, batch):
    """A routed forward costs what the hand-written loop on the kept tokens costs, and less than the
    unrouted forward by each routed block's cost on the skipped tokens."""
    model = make_backbone("dit", depth=6)
    inputs = backbone_inputs(batch)
    routes = data.draw(routes_for(6))
    full = _flops(lambda: run(model, inputs))
    tokenroute.wrap(model, routes, seed=0)
    run(model, inputs)  # the first routed forward also traces the graph
    routed = _flops(lambda: run(model, inputs))
    keeps = [(s, e, (~m).nonzero()[:, 1].view(batch, -1)) for (s, e, _), m in zip(routes, tokenroute.routing_masks(model))]
    assert routed == _flops(lambda: dit_forward_handrouted(model, *inputs, keeps))
    # each routed block run on K instead of N tokens
    n, dim = 16, model.hidden_size
    block = model.blocks[0]
    c = torch.randn(batch, dim)
    saved = sum((e - s + 1) * (_flops(lambda: block(torch.randn(batch, n, dim), c))
                               - _flops(lambda: block(torch.randn(batch, n - int(n * r), dim), c)))
                for s, e, r in routes)
    assert full - routed == saved


@pytest.mark.parametrize("name", BACKBONES)
def test_the_first_routed_step_costs_what_later_ones_cost(name):
    """Tracing runs on fake tensors: the first routed forward and backward (which trace the graph) count the
    same FLOPs as every later one, and no more than the FLOPs of the routed graph itself."""
    model = tokenroute.wrap(make_backbone(name, depth=5), [(1, 3, 0.5)], seed=0)
    inputs = backbone_inputs(2)
    first = _flops(lambda: run(model, inputs).square().mean().backward())
    later = _flops(lambda: run(model, inputs).square().mean().backward())
    assert first == later
    tokenroute.unwrap(model)
    assert first < _flops(lambda: run(model, inputs).square().mean().backward())


def test_tracing_under_autocast_leaves_the_real_forward_real():
    """Autocast caches each weight's low-precision copy for its whole region; the trace's copies are fake."""
    model = tokenroute.wrap(make_backbone("dit", depth=4), [(1, 2, 0.5)], seed=0)
    inputs = backbone_inputs(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = run(model, inputs)
        second = run(model, inputs)
    assert type(first) is torch.Tensor and type(second) is torch.Tensor
    assert torch.isfinite(first).all() and first.float().abs().sum() > 0


class CachingBlock(torch.nn.Module):
    """Builds a table on its first call and keeps it, as lazily cached rotary embeddings do."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim)
        self.table = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.table is None or self.table.shape[0] != x.shape[1]:
            self.table = torch.linspace(0, 1, x.shape[1], device=x.device)[:, None]
        return x + self.lin(x) * self.table[: x.shape[1]]


def test_caches_that_modules_fill_while_tracing_stay_real():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([CachingBlock() for _ in range(4)])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    model = tokenroute.wrap(Net(), [(1, 2, 0.5)], seed=0)
    x = torch.randn(2, 10, 8)
    first = model.train()(x)
    assert type(first) is torch.Tensor and type(model(x)) is torch.Tensor
    assert all(block.table is None or type(block.table) is torch.Tensor for block in model.blocks)


# ----------------------------------------------------------------------------------------------
def test_user_module_found_automatically_with_shape_assert():
    model = randomize(ToyTransformer(depth=6))
    x, c = torch.randn(2, 10, 3), torch.randn(2, 8)
    expected = model(x, c)
    tokenroute.wrap(model, [(1, 3, 0.5), (-2, -1, 0.3)], seed=0)
    assert tokenroute.core.find_stack(model).paths[0] == "layers.0"
    model.eval()
    assert torch.equal(model(x, c), expected)
    model.train()
    model(x, c)
    assert [int(m.sum(1)[0]) for m in tokenroute.routing_masks(model)] == [5, 3]
    assert "torch.fx" in tokenroute.explain(model)


def test_sequential_stack_named_with_blocks():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(4, 8)
            self.trunk = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)) for _ in range(4)])
            self.aux = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(6)])

        def forward(self, x):
            return self.trunk(self.inp(x)) + self.aux[0](x.new_zeros(*x.shape[:2], 8))

    model = randomize(Net())
    tokenroute.wrap(model, [(1, 2, 0.5)], blocks="trunk", seed=0)
    out = model(torch.randn(3, 6, 4))
    assert out.shape == (3, 6, 8) and tokenroute.routing_masks(model)[0].shape == (3, 6)


def test_routing_context_forces_and_overrides():
    model = tokenroute.wrap(make_backbone("dit"), [(1, 3, 0.5)], seed=0)
    inputs = backbone_inputs(2)
    model.eval()
    with tokenroute.routing(model, enabled=True, ratio=0.25):
        run(model, inputs, train=False)
        assert tokenroute.routing_masks(model)[0].sum(1).tolist() == [4, 4]
    run(model, inputs, train=False)
    assert tokenroute.routing_masks(model) == []
    with tokenroute.routing(model, enabled=False):
        run(model, inputs, train=True)
        assert tokenroute.routing_masks(model) == []
    run(model, inputs, train=True)
    assert tokenroute.routing_masks(model)[0].sum(1).tolist() == [8, 8]


def test_protected_tokens_and_custom_selector():
    protect = torch.zeros(16, dtype=torch.bool)
    protect[:3] = True
    model = tokenroute.wrap(make_backbone("dit"), [(1, 3, 0.5)], seed=0, protect=protect)
    for _ in range(5):
        run(model, backbone_inputs(4))
        assert not tokenroute.routing_masks(model)[0][:, :3].any()

    def keep_first(tokens, num_keep, generator):
        return torch.arange(num_keep).expand(tokens.shape[0], -1)

    model = tokenroute.wrap(make_backbone("dit"), [tokenroute.Route(1, 3, 0.25, selector=keep_first)])
    run(model, backbone_inputs(2))
    mask = tokenroute.routing_masks(model)[0]
    assert mask[:, 12:].all() and not mask[:, :12].any()


def test_ranks_draw_different_masks(monkeypatch):
    masks = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        model = tokenroute.wrap(make_backbone("dit"), [(1, 3, 0.5)], seed=7)
        run(model, backbone_inputs(4))
        masks.append(tokenroute.routing_masks(model)[0])
    assert not torch.equal(*masks)


def test_routing_state_dict_resumes_masks():
    model = tokenroute.wrap(make_backbone("dit"), [(1, 3, 0.5)], seed=3)
    inputs = backbone_inputs(2)
    run(model, inputs)
    saved = tokenroute.routing_state_dict(model)
    run(model, inputs)
    expected = tokenroute.routing_masks(model)[0]
    resumed = tokenroute.wrap(make_backbone("dit"), [(1, 3, 0.5)], seed=99)
    tokenroute.load_routing_state_dict(resumed, saved)
    run(resumed, inputs)
    assert torch.equal(tokenroute.routing_masks(resumed)[0], expected)


def test_deep_copy_after_a_training_step_routes_itself():
    """An EMA copy made from a wrapped model after training steps routes with its own state."""
    model = tokenroute.wrap(make_backbone("dit"), [(1, 3, 0.5)], seed=0)
    inputs = backbone_inputs(2)
    run(model, inputs).square().mean().backward()
    twin = copy.deepcopy(model)
    run(twin, inputs)
    assert tokenroute.routing_masks(twin)[0].shape == (2, 16)
    twin_record, record = twin.__dict__["_tokenroute"], model.__dict__["_tokenroute"]
    assert twin_record is not record and twin_record.stack.owner is twin


class _ValueBranching(ToyTransformer):
    """A forward that branches on a tensor's value: torch.fx cannot specialise it."""

    def forward(self, x, c):
        x = self.embed(x)
        if x.mean() > 100:  # never true, but only a real run can tell
            x = x * 0
        for layer in self.layers:
            x = layer(x, c)
        return self.out(x)


def test_untraceable_forward_falls_back_to_hooks_with_the_same_routing():
    """An untraceable forward's layout cannot be read: refused until declared, then routed with hooks."""
    x, c = torch.randn(2, 10, 3), torch.randn(2, 8)
    model = randomize(_ValueBranching(depth=6))
    reference = copy.deepcopy(model)
    undeclared = tokenroute.wrap(copy.deepcopy(model), [(1, 3, 0.5)], seed=4)
    with pytest.raises(tokenroute.RouteError, match=r"could not trace .* Declare it .*prefix_tokens=0 if every token"):
        undeclared.train()(x, c)
    tokenroute.wrap(model, [(1, 3, 0.5)], seed=4, prefix_tokens=0)
    tokenroute.wrap(reference, [(1, 3, 0.5)], seed=4, mechanism="hooks")
    torch.testing.assert_close(model(x, c), reference(x, c), rtol=0, atol=1e-6)
    assert torch.equal(tokenroute.routing_masks(model)[0], tokenroute.routing_masks(reference)[0])
    assert "module hooks on the blocks (tracing failed: TraceError" in tokenroute.explain(model)
    assert "0 leading tokens never routed (declared)" in tokenroute.explain(model)
    strict = tokenroute.wrap(randomize(_ValueBranching(depth=6)), [(1, 3, 0.5)], mechanism="fx")
    with pytest.raises(tokenroute.RouteError, match="could not trace"):
        strict(x, c)


@given(depth=st.integers(1, 12), data=st.data())
def test_an_optional_segment_takes_exactly_the_free_blocks(depth, data):
    """A reordering route (optional) gives way: its pieces cover exactly the blocks of its span that no other
    route holds, never span a stage, and every route keeps its own span."""
    from tokenroute.core.operations import OrderTokens
    from tokenroute.core.patches import _clipped
    from tokenroute.core.plan import Segment, Stage
    from tokenroute.core.route import Route

    cuts = sorted(data.draw(st.sets(st.integers(0, depth - 1), max_size=4)))
    taken = []
    for a, b in zip([0, *cuts], [*cuts, depth]):  # disjoint required routes from random cut points
        if b > a and data.draw(st.booleans()):
            taken.append(Segment(Route(a, b - 1, 0.5), None, "tread"))
    stages = [Stage(s, torch.nn.Identity(), "masking") for s in data.draw(st.sets(st.integers(0, depth - 1), max_size=3))]
    first = data.draw(st.integers(0, depth - 1))
    span = Route(first, data.draw(st.integers(first, depth - 1)), 0.0)
    optional = Segment(span, OrderTokens(lambda layout, device: None, "tile order"), "local_attention", optional=True)
    pieces = _clipped(optional, taken, stages)
    busy = {b for s in taken for b in range(s.route.start, s.route.end + 1)}
    covered = [b for p in pieces for b in range(p.route.start, p.route.end + 1)]
    assert sorted(covered) == covered and len(set(covered)) == len(covered)
    assert set(covered) == {b for b in range(span.start, span.end + 1) if b not in busy}
    assert not any(p.route.start <= s.after < p.route.end for p in pieces for s in stages)
    assert all(p.optional and p.operation is optional.operation and p.route.ratio == 0.0 for p in pieces)


@given(seed=st.integers(0, 2**40), stream=st.sampled_from(["", "tread", "masking"]), tokens=st.sampled_from([64, 256]))
def test_the_routing_draw_is_uniform_and_independent(seed, stream, tokens):
    """The counter-hash draw, over 2,000 rows in four calls: every token is kept at the expected rate, and two
    rows share as many kept tokens as independent uniform draws would (a hypergeometric mean)."""
    from tokenroute.core.selection import RoutingGenerator, draw_keep

    generator, keep_count, rows = RoutingGenerator(seed, stream), tokens // 4, 500
    keeps = torch.cat([draw_keep(torch.zeros(rows, tokens, 1), keep_count, generator) for _ in range(4)])
    kept = torch.zeros(len(keeps), tokens).scatter_(1, keeps, 1.0)
    expected = len(keeps) * keep_count / tokens  # 500 per token
    deviation = (kept.sum(0) - expected).abs().max().item()
    assert deviation < 6 * (expected * (1 - keep_count / tokens)) ** 0.5  # binomial, far out in the tail
    overlap = (kept[0::2] * kept[1::2]).sum(1).mean().item()  # pairs of rows, from within and across calls
    assert abs(overlap - keep_count**2 / tokens) < 0.15 * keep_count**2 / tokens


@given(seeds=st.tuples(st.integers(0, 2**62), st.integers(0, 2**62)), draws=st.integers(0, 3))
def test_a_loaded_routing_state_draws_on_as_the_saved_one(seeds, draws):
    """A generator that has drawn with its own seed and loads another's state (seed and counter: a resumed
    checkpoint) draws what the other draws next, also where its state already existed on the device and where the
    saved one had not drawn yet."""
    from tokenroute.core.selection import RoutingGenerator

    # one that has not drawn has not fixed its seed (the rank may not be known yet): its state holds no seed, so
    # only a generator configured alike draws on as it does
    saved, loaded = RoutingGenerator(seeds[0], "tread"), RoutingGenerator(seeds[1] if draws else seeds[0], "tread")
    for _ in range(draws):
        saved.scores(2, 16, torch.device("cpu"))
    loaded.scores(3, 16, torch.device("cpu"))
    loaded.load_state_dict(saved.state_dict())
    assert torch.equal(loaded.scores(4, 16, torch.device("cpu")), saved.scores(4, 16, torch.device("cpu")))
