"""Methods on one model: composed, applied and removed in any order, eval between training steps, a method
written outside the package, and the per-block facts methods build on. Checked from outside: hooks on the
blocks, state dicts and outputs, not the library's own records."""

from __future__ import annotations

import copy
import itertools
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import tokenroute
from tokenroute import RouteError
from tokenroute.core import Patch, PatchRegistry, Stage, find_stack
from tokenroute.core.tokens import gather_tokens

from helpers import ToyTransformer, backbone_inputs, make_backbone, randomize, zero_branch_outputs

BACKBONES = ["dit", "uvit", "mamba"]
MODELS = {name: make_backbone(name, depth=6) for name in BACKBONES}  # built once; every test leaves them as found
INPUTS = backbone_inputs(2, seed=11)


def snapshot(model: nn.Module) -> dict:
    """Everything removing the methods must give back: forward outputs, state dict, parameters, no hooks."""
    with torch.no_grad():
        torch.manual_seed(0)
        train_out = model.train()(*INPUTS)
        eval_out = model.eval()(*INPUTS)
    return dict(train=train_out, eval=eval_out, state={k: v.clone() for k, v in model.state_dict().items()},
                params=[id(p) for p in model.parameters()])


def assert_as_before(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert torch.equal(after["train"], before["train"]) and torch.equal(after["eval"], before["eval"])
    assert list(after["state"]) == list(before["state"])
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    assert after["params"] == before["params"]
    assert not tokenroute.is_wrapped(model)
    assert all("forward" not in m.__dict__ and "_tokenroute" not in m.__dict__ for m in model.modules())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


APPLY = {
    "tread": lambda m, seed: tokenroute.apply_tread(m, tokenroute.TreadConfig([(-2, -2, 0.5)], seed=seed)),
    "masking": lambda m, seed: tokenroute.apply_masking(m, tokenroute.MaskingConfig(0.5, decoder=3, seed=seed)),
}


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKBONES)
@settings(max_examples=8)
@given(apply_order=st.permutations(list(APPLY)), remove_order=st.permutations(list(APPLY)), seed=st.integers(0, 99))
def test_apply_and_remove_in_any_order_leaves_the_model_bitwise_as_before(name, apply_order, remove_order, seed):
    model = MODELS[name]
    before = snapshot(model)
    for method in apply_order:
        APPLY[method](model, seed)
    model.train()(*INPUTS).square().mean().backward()
    model.zero_grad(set_to_none=True)
    for method in remove_order:
        getattr(tokenroute, f"remove_{method}")(model)
    assert_as_before(model, before)


@pytest.mark.parametrize("name", BACKBONES)
@settings(max_examples=4)
@given(seed=st.integers(0, 2**16))
def test_apply_order_does_not_change_what_a_forward_computes(name, seed):
    model = MODELS[name]
    results = []
    for order in itertools.permutations(APPLY):
        torch.manual_seed(seed)  # the mask token's initial value
        for method in order:
            APPLY[method](model, seed)
        out = model.train()(*INPUTS)
        results.append((out, tokenroute.routing_masks(model), tokenroute.explain(model).splitlines()[1]))
        tokenroute.unwrap(model)
    (out_a, masks_a, methods_a), (out_b, masks_b, methods_b) = results
    assert torch.equal(out_a, out_b) and all(torch.equal(a, b) for a, b in zip(masks_a, masks_b))
    assert methods_a == methods_b == "  methods: masked training (masking), TREAD (tread)"


@pytest.mark.parametrize("name", BACKBONES)
@settings(max_examples=10)
@given(ratio=st.sampled_from([0.25, 0.5, 0.75]), seed=st.integers(0, 2**16))
def test_tread_routes_inside_a_maskdit_decoder(name, ratio, seed):
    """The decoder (the last 3 blocks) gets the mask token at dropped positions; inside it a TREAD route (the
    second-to-last block) runs on a subset of that stream and its skipped tokens come back with their
    route-start values."""
    model = MODELS[name]
    stack = find_stack(model)
    last = len(stack) - 1
    prefix = model.num_prefix_tokens
    tokenroute.mask(model, 0.5, decoder=3, routes=[(-2, -2, ratio)], seed=seed)
    seen = {}
    handles = [
        stack.blocks[last - 3].register_forward_hook(lambda m, a, out: seen.__setitem__("encoder_out", out)),
        stack.blocks[last - 2].register_forward_pre_hook(lambda m, a: seen.__setitem__("decoder_in", a[0])),
        stack.blocks[last - 2].register_forward_hook(lambda m, a, out: seen.__setitem__("route_start", out)),
        stack.blocks[last - 1].register_forward_pre_hook(lambda m, a: seen.__setitem__("route_in", a[0])),
        stack.blocks[last].register_forward_pre_hook(lambda m, a: seen.__setitem__("after_route", a[0])),
    ]
    try:
        model.train()(*INPUTS)
        dropped, skipped = tokenroute.routing_masks(model)
        assert [m.shape for m in tokenroute.routing_masks(model, "masking")] == [dropped.shape]
        token = model.tokenroute_masking.mask_token
        decoder_in = seen["decoder_in"][:, prefix:]
        assert torch.equal(decoder_in[dropped], token.expand(int(dropped.sum()), -1))
        assert torch.equal(decoder_in[~dropped], seen["encoder_out"][:, prefix:].reshape(-1, token.shape[0]))
        start = seen["route_start"]
        keep = (~skipped).nonzero()[:, 1].view(2, -1)
        assert torch.equal(seen["route_in"][:, prefix:], gather_tokens(start[:, prefix:], keep))
        assert torch.equal(seen["after_route"][:, prefix:][skipped], start[:, prefix:][skipped])
        assert int(skipped.sum(1)[0]) == int(skipped.shape[1] * ratio)
    finally:
        for handle in handles:
            handle.remove()
        tokenroute.unwrap(model)


@pytest.mark.parametrize("name", BACKBONES)
def test_composed_methods_splice_alike_with_either_mechanism(name):
    model = MODELS[name]
    outputs = []
    for mechanism in ("fx", "hooks"):
        torch.manual_seed(0)  # the mask token's initial value
        tokenroute.mask(model, 0.5, decoder=3, routes=[(-3, -2, 0.5)], seed=4, mechanism=mechanism)
        outputs.append((model.train()(*INPUTS), tokenroute.routing_masks(model)))
        tokenroute.unwrap(model)
    (fx_out, fx_masks), (hook_out, hook_masks) = outputs
    torch.testing.assert_close(fx_out, hook_out, rtol=0, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(fx_masks, hook_masks))


# ----------------------------------------------------------------------------------------------
DECODERS = {"stack": lambda: 2, "added": lambda: tokenroute.Decoder(depth=1)}


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("mechanism", ["fx", "hooks"])
@settings(max_examples=5)
@given(seed=st.integers(0, 2**16))
def test_an_eval_forward_between_training_steps_leaves_the_next_masks_unchanged(decoder, mechanism, seed):
    base = make_backbone("dit", depth=4)
    plain, evaluated = copy.deepcopy(base), copy.deepcopy(base)
    for model in (plain, evaluated):
        tokenroute.mask(model, 0.5, decoder=DECODERS[decoder](), routes=[(3, 3, 0.5)] if decoder == "stack" else (),
                        seed=seed, mechanism=mechanism)
    for model in (plain, evaluated):
        model.train()(*INPUTS)
    state = tokenroute.routing_state_dict(evaluated)
    with torch.no_grad():
        evaluated.eval()(*INPUTS)
    assert tokenroute.routing_masks(evaluated) == []
    after = tokenroute.routing_state_dict(evaluated)
    assert all(torch.equal(state[m][d], after[m][d]) for m in state for d in state[m])
    for model in (plain, evaluated):
        model.train()(*INPUTS)
    for a, b in zip(tokenroute.routing_masks(plain), tokenroute.routing_masks(evaluated), strict=True):
        assert torch.equal(a, b)


def test_a_route_that_drops_nothing_never_draws():
    model = tokenroute.wrap(make_backbone("dit", depth=4), [(1, 2, 0.5)], seed=0)
    model.train()(*INPUTS)
    state = tokenroute.routing_state_dict(model)["tread"]
    tokenroute.set_ratio(model, 0.0)
    model(*INPUTS)
    assert not tokenroute.routing_masks(model)[0].any()
    assert all(torch.equal(v, tokenroute.routing_state_dict(model)["tread"][k]) for k, v in state.items())


def test_two_methods_with_one_seed_draw_independent_masks():
    model = tokenroute.mask(make_backbone("dit", depth=6), 0.5, decoder=3, routes=[(3, 5, 0.5)], seed=0)
    model.train()(*backbone_inputs(8))
    dropped, skipped = tokenroute.routing_masks(model)
    assert not torch.equal(dropped, skipped)


# ----------------------------------------------------------------------------------------------
class AddAfter(Patch):
    """A method written outside the package: a stage (a module) runs on the stream after block ``after``."""

    name = "add_after"
    title = "a test stage"

    def __init__(self, after: int, module: nn.Module):
        super().__init__()
        self.stages = [Stage(after, module, self.name)]
        self.resets = 0

    def reset_state(self) -> None:
        self.resets += 1


class Project(nn.Module):
    """A stage: called like the block before it, on its stream and with its other arguments."""

    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * c[:, None]


@settings(max_examples=10)
@given(after=st.integers(0, 3), routed=st.booleans(), seed=st.integers(0, 2**16))
def test_a_method_from_outside_adds_a_stage_that_composes_with_tread(after, routed, seed):
    model = randomize(ToyTransformer(depth=6), seed=1)
    x, c = torch.randn(2, 10, 3), torch.randn(2, 8)
    stage = randomize(Project(8), seed=seed)
    reference = copy.deepcopy(model)
    reference.layers[after].register_forward_hook(lambda m, a, out: stage(out, a[1]))
    tokenroute.core.apply_patch(model, AddAfter(after, stage))
    if routed:
        tokenroute.wrap(model, [(4, 5, 0.5)], seed=seed)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, c), reference.eval()(x, c))  # eval runs the stage, nothing dropped
    assert "add_after" in PatchRegistry.of(model) and "a test stage (add_after)" in tokenroute.explain(model)
    tokenroute.reset_state(model)
    assert PatchRegistry.of(model).get("add_after").resets == 1
    tokenroute.core.remove_patch(model, "add_after")
    assert tokenroute.is_wrapped(model) == routed
    with pytest.raises(RouteError, match="no method 'add_after' applied" if routed else "not wrapped"):
        tokenroute.core.remove_patch(model, "add_after")


def test_conflicting_methods_are_refused_and_nothing_is_half_applied():
    model = MODELS["dit"]
    before = snapshot(model)
    tokenroute.mask(model, 0.5, decoder=2, mechanism="fx")
    with pytest.raises(RouteError, match=r"routes 0\.\.3 \(masking\) and 2\.\.4 \(tread\) overlap"):
        tokenroute.wrap(model, [(2, 4, 0.5)])
    with pytest.raises(RouteError, match="different prefix_tokens"):
        tokenroute.wrap(model, [(4, 5, 0.5)], prefix_tokens=3)
    with pytest.raises(RouteError, match="different mechanisms"):
        tokenroute.wrap(model, [(4, 5, 0.5)], mechanism="hooks")
    with pytest.raises(RouteError, match="stage after block 1, inside the route 0..3"):
        tokenroute.core.apply_patch(model, AddAfter(1, nn.Identity()))
    assert [p.name for p in PatchRegistry.of(model)] == ["masking"]
    tokenroute.unwrap(model)
    assert_as_before(model, before)


# ----------------------------------------------------------------------------------------------
class RotaryBlock(nn.Module):
    """A block taking a batch-free token table, as Flux's rotary embedding."""

    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rotary_emb: torch.Tensor) -> torch.Tensor:
        return x + self.lin(x * rotary_emb)


class RotaryModel(nn.Module):
    def __init__(self, dim: int = 4, depth: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList([RotaryBlock(dim) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = torch.linspace(0, 1, x.shape[1])[:, None].expand(-1, x.shape[2])
        for block in self.blocks:
            x = block(x, table)
        return x


def per_sample(tokens, num_keep, generator):
    return torch.stack([torch.randperm(tokens.shape[1], generator=generator)[:num_keep] for _ in tokens])


def drop_first(tokens, num_keep, generator):
    return torch.arange(tokens.shape[1] - num_keep, tokens.shape[1]).expand(tokens.shape[0], -1)


def test_a_selector_that_cannot_honour_the_route_is_refused():
    x = torch.randn(3, 8, 4)
    model = tokenroute.wrap(RotaryModel(), [tokenroute.Route(1, 1, 0.5, selector=per_sample)], seed=0)
    with pytest.raises(RouteError, match="batch-free token table"):
        model.train()(x)
    tokenroute.unwrap(model)
    shared = lambda tokens, k, g: per_sample(tokens[:1], k, g).expand(tokens.shape[0], -1)  # noqa: E731
    tokenroute.wrap(model, [tokenroute.Route(1, 1, 0.5, selector=shared)], seed=0)
    model(x)
    mask = tokenroute.routing_masks(model)[0]
    assert torch.equal(mask[0], mask[1])
    tokenroute.unwrap(model)
    protect = torch.zeros(8, dtype=torch.bool)
    protect[0] = True
    toy = tokenroute.wrap(ToyTransformer(), [tokenroute.Route(1, 2, 0.5, selector=drop_first)], protect=protect)
    with pytest.raises(RouteError, match="dropped protected tokens"):
        toy.train()(torch.randn(2, 8, 3), torch.randn(2, 8))


# ----------------------------------------------------------------------------------------------
@dataclass
class Options:  # unhashable (eq without frozen): a fresh but equal one must find the same graph
    gain: float


class WithOptions(ToyTransformer):
    def forward(self, x, c, options: Options, scale: float = 1.0):
        x = self.embed(x) * options.gain * scale
        for layer in self.layers:
            x = layer(x, c)
        return self.out(x)


def test_the_graph_cache_is_keyed_by_value_and_bounded():
    model = tokenroute.wrap(randomize(WithOptions(depth=4)), [(1, 2, 0.5)], seed=0)
    x, c = torch.randn(2, 6, 3), torch.randn(2, 8)
    splice = PatchRegistry.of(model).splice
    for _ in range(3):
        model.train()(x, c, Options(2.0))
    assert len(splice.signatures) == 1 and "1 of at most 8 input signatures cached" in tokenroute.explain(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k in range(12):
            model(x, c, Options(2.0), scale=1.0 + k)
    assert len(splice.signatures) == 8 and splice.signatures.evictions == 5
    assert "(13 traced, 5 evicted)" in tokenroute.explain(model)
    messages = [str(w.message) for w in caught if "tokenroute traced" in str(w.message)]
    assert len(messages) == 1 and "['scale'] changed" in messages[0]


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, kinds", [("dit", ["attention", "mlp"]), ("uvit", ["attention", "mlp"]),
                                         ("mamba", [])])
def test_branch_outputs_stand_before_their_gates(name, kinds):
    """With every branch's output zeroed, a block adds nothing to its stream: the outputs the facts point
    at are the whole residual contribution, before any gate or projection."""
    block = find_stack(MODELS[name]).blocks[1]
    assert [b.kind for b in tokenroute.block_branches(block)] == kinds
    if not kinds:
        return
    x = torch.randn(2, 5, 16)
    args = (x, torch.randn(2, 16)) if name == "dit" else (x,)
    handles = zero_branch_outputs(block)
    try:
        assert torch.equal(block(*args), x)
    finally:
        for handle in handles:
            handle.remove()
    assert not torch.equal(block(*args), x)


def test_registered_branches_are_checked():
    tokenroute.register_block("BranchlessBlock", tokenroute.BlockSpec("x", branches=(tokenroute.Branch("attention", "attn"),)))

    class BranchlessBlock(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(RouteError, match="no such submodule"):
        tokenroute.block_branches(BranchlessBlock())
