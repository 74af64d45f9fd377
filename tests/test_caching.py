"""The feature cache at inference (tokenroute.methods.caching), checked from outside: outputs against the uncached
model in a sampling loop, branch outputs with hooks on the branch modules, the step count refused when wrong."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensor

import tokenroute
from tokenroute import RouteError
from tokenroute.methods.caching import (CacheRouter, CachingConfig, apply_caching, cache_slots, caching_context,
                                        remove_caching)
from tokenroute.training.samplers import flow_euler_sampler

from helpers import backbone_inputs, make_backbone

STEPS = 5
MODELS = {name: make_backbone(name, depth=4) for name in ("dit", "uvit", "mamba")}


def sample(model, seed: int = 0):
    x, _, y = backbone_inputs(2, seed=seed)
    return flow_euler_sampler(lambda x, t, y: model(x, torch.full((x.shape[0],), t * 1000.0), y), x, y, steps=STEPS)


def cached(name: str, router_of) -> torch.nn.Module:
    model = copy.deepcopy(MODELS[name]).eval()
    return apply_caching(model, CachingConfig(router=router_of(len(cache_slots(model)))))


@pytest.mark.parametrize("name", MODELS)
def test_a_plan_that_computes_everything_is_bitwise_the_uncached_model(name):
    model = cached(name, lambda slots: CacheRouter(STEPS, slots, init=5.0))
    assert torch.equal(sample(model), sample(MODELS[name].eval()))


def _real_outputs(model, slots):
    """Forward hooks on each slot's module, keeping the outputs of real calls (not a trace's fake ones)."""
    seen = {slot: [] for slot in slots}
    for slot in slots:
        block = model.get_submodule(slot.path)
        module = block.get_submodule(slot.branch.path) if slot.branch else block
        module.register_forward_hook(
            lambda m, a, out, s=slot: None if isinstance(out, FakeTensor) else seen[s].append(out))
    return seen


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("skip_inputs", [True, False])
def test_reusing_everything_after_the_first_step_returns_the_first_steps_outputs(name, skip_inputs):
    """Every branch module, hooked from outside, computes at the first step only: with its inputs skipped it is not
    called again; with them computed it returns at every later step what it computed at the first."""
    model = copy.deepcopy(MODELS[name]).eval()
    slots = cache_slots(model)
    apply_caching(model, CachingConfig(router=CacheRouter(STEPS, len(slots), init=-5.0), skip_inputs=skip_inputs))
    seen = _real_outputs(model, slots)
    sample(model)
    tokenroute.reset_state(model)
    for slot, outputs in seen.items():
        if not slot.branch:
            assert len(outputs) == STEPS  # a residual slot runs its block (the change is reused)
        elif skip_inputs:
            assert len(outputs) == 1, slot
        else:
            assert len(outputs) == STEPS and all(torch.equal(out, outputs[0]) for out in outputs[1:])


@settings(max_examples=12, deadline=None)
@given(plan=st.lists(st.lists(st.booleans(), min_size=12, max_size=12), min_size=STEPS - 1, max_size=STEPS - 1),
       name=st.sampled_from(["dit", "uvit"]))
def test_skipping_a_reused_branchs_inputs_changes_nothing_but_the_work(plan, name):
    """For any plan, a block run with its reused branches supplied gives bitwise what its own forward gives with
    the cached values returned by the branches; the branches' input norms run only at the steps that compute."""
    outputs, norm_calls = [], []
    for skip_inputs in (True, False):
        model = copy.deepcopy(MODELS[name]).eval()
        slots = cache_slots(model)
        router = CacheRouter(STEPS, len(slots), init=-5.0)
        with torch.no_grad():
            router.logits[1:] = torch.tensor(plan, dtype=torch.float32)[:, : len(slots)] * 10 - 5
        apply_caching(model, CachingConfig(router=router, skip_inputs=skip_inputs))
        calls = []
        norm = model.get_submodule(slots[0].path).norm1
        norm.register_forward_hook(lambda m, a, out: None if isinstance(out, FakeTensor) else calls.append(1))
        outputs.append(sample(model))
        tokenroute.reset_state(model)
        norm_calls.append(len(calls))
    assert torch.equal(outputs[0], outputs[1])
    assert norm_calls == [1 + sum(row[0] for row in plan), STEPS]


def test_reused_residual_blocks_add_the_first_steps_change():
    """A block without known branches (Mamba) reuses its change to the stream, not its output."""
    model = cached("mamba", lambda slots: CacheRouter(STEPS, slots, init=-5.0))
    block = model.get_submodule(cache_slots(model)[1].path)
    changes = []
    block.register_forward_hook(lambda m, a, out: changes.append(out - a[0]))
    sample(model)
    tokenroute.reset_state(model)
    for change in changes[1:]:
        torch.testing.assert_close(change, changes[0], rtol=0, atol=1e-5)


def test_generations_are_counted_and_reset():
    model = cached("dit", lambda slots: CacheRouter.every(2, STEPS, slots))
    first = sample(model)
    tokenroute.reset_state(model)
    assert torch.equal(sample(model), first)  # the same plan again: nothing leaks between generations
    with pytest.raises(RouteError, match=r"call 6 of the generation .* past the 5 steps"):
        sample(model)  # no reset: a sixth call
    model2 = cached("dit", lambda slots: CacheRouter(STEPS, slots))
    x, t, y = backbone_inputs(2)
    model2(x, t, y)
    with pytest.raises(RouteError, match=r"ran \{'default': 1\} steps .* made for 5"):
        tokenroute.reset_state(model2)


def test_separate_guidance_calls_keep_a_cache_each():
    model = cached("dit", lambda slots: CacheRouter.every(2, STEPS, slots))
    x, t, y = backbone_inputs(2)
    for _ in range(STEPS):
        cond = model(x, t, y)
        with caching_context(model, "uncond"):
            uncond = model(x, t, torch.full_like(y, 10))
    assert not torch.equal(cond, uncond)
    tokenroute.reset_state(model)


def test_remove_restores_the_model_bitwise_and_bad_configs_are_refused():
    model = cached("uvit", lambda slots: CacheRouter(STEPS, slots, init=-5.0))
    keys = set(MODELS["uvit"].state_dict())
    assert set(model.state_dict()) == keys  # the router is not part of the model
    sample(model)
    remove_caching(model)
    assert torch.equal(sample(model), sample(MODELS["uvit"].eval()))
    with pytest.raises(RouteError, match="router has 3 slots but"):
        apply_caching(model, CachingConfig(router=CacheRouter(STEPS, 3)))
    assert not tokenroute.is_wrapped(model)


def test_the_plan_is_explained_and_training_forwards_compute_everything():
    model = cached("dit", lambda slots: CacheRouter.every(2, STEPS, slots))
    plan = tokenroute.explain(model)
    assert "feature cache: 8 slots over 5 steps" in plan and "step   1: ........" in plan
    model.train()
    x, t, y = backbone_inputs(2)
    torch.manual_seed(0)
    out = model(x, t, y)
    torch.manual_seed(0)
    assert torch.equal(out, MODELS["dit"].train()(x, t, y))
    MODELS["dit"].eval()


def test_a_diffusers_pipelines_cache_context_and_reset_drive_the_steps():
    """As a pipeline does: each call inside transformer.cache_context("cond" / "uncond", num_inference_steps=...),
    then the transformer's stateful hooks reset at the end of the pipeline call."""
    pytest.importorskip("diffusers")
    from family.cases_core import flux

    torch.manual_seed(0)
    model, inputs = flux()
    model.eval()
    plain = copy.deepcopy(model)
    apply_caching(model, CachingConfig(router=CacheRouter.every(2, STEPS, len(cache_slots(model)))))

    def generation(m, steps=STEPS):
        outs = []
        for _ in range(steps):
            for name in ("cond", "uncond"):
                with m.cache_context(name, num_inference_steps=steps):
                    outs.append(m(**inputs).sample)
        m._reset_stateful_cache()
        return outs

    first = generation(model)
    assert torch.equal(first[0], plain(**inputs).sample)  # the first step computes everything
    assert all(torch.equal(a, b) for a, b in zip(generation(model), first))  # reset by the pipeline's call
    with pytest.raises(RouteError, match="samples with 4 steps but the cache router was made for 5"):
        generation(model, steps=4)
    remove_caching(model)
    assert torch.equal(model(**inputs).sample, plain(**inputs).sample)


@pytest.mark.parametrize("sparsity, computed", [(1e-2, "none"), (1e-6, "some"), (0.0, "all")])
def test_router_training_trades_error_for_reuse(sparsity, computed):
    """Step-wise training on the sampler's trajectory: only the router moves; a heavy sparsity weight lowers the
    loss by reusing everything after the first step, none computes everything, a light one keeps what matters."""
    from tokenroute.methods.caching import RouterTrainingConfig, Sampler, generate, train_router

    model = cached("dit", lambda slots: CacheRouter(4, slots, init=1.0))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    sampler = Sampler.flow_euler(4, lambda m, x, t, y: m(x, torch.full((x.shape[0],), t * 1000.0), y))

    def inputs(generator):
        return torch.randn(4, 1, 8, 8, generator=generator), torch.randint(0, 10, (4,), generator=generator)

    config = RouterTrainingConfig(iterations=30, lr=0.2, sparsity=sparsity, refresh_every=10)
    router = train_router(model, sampler, inputs, config)
    later = sum(map(sum, router.plan(0.1)[1:]))
    slots = len(cache_slots(model))
    assert {"none": later == 0, "some": 0 < later < 3 * slots, "all": later == 3 * slots}[computed], later
    if sparsity > 0.001:
        assert sum(config.history[-5:]) < sum(config.history[:5])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    x, y = inputs(torch.Generator().manual_seed(1))
    assert torch.isfinite(generate(model, sampler, x, y)).all()


def test_a_router_that_cannot_reach_the_threshold_is_refused():
    """Logits starting at 5 cannot fall below logit(0.1) in 10 steps of lr 0.01: refused before any work."""
    from tokenroute.methods.caching import RouterTrainingConfig, Sampler, train_router

    model = cached("dit", lambda slots: CacheRouter(4, slots, init=5.0))
    sampler = Sampler.flow_euler(4, lambda m, x, t, y: m(x, torch.full((x.shape[0],), t * 1000.0), y))
    with pytest.raises(RouteError, match=r"none can fall below the threshold's logit .* init=0.0"):
        train_router(model, sampler, lambda g: None, RouterTrainingConfig(iterations=10, lr=0.01))


@pytest.mark.parametrize("init", [5.0, -5.0])
def test_it_composes_with_tread_routes_and_routing_guidance(init):
    """On a TREAD-wrapped model, sampling with routing guidance: each guidance call keeps its own cache, and
    slots whose block runs on a routed subset of the tokens always compute (another draw's outputs cannot be
    reused). Computing everything is bitwise the uncached guided sampler; reusing the rest runs to the end."""
    from tokenroute.sampling import routing_guidance

    def guided_sample(model):
        guided = routing_guidance(model, g1=0.25, g2=0.5, w=1.5)
        return sample_with(lambda x, t, y: guided(x, t, y))

    def sample_with(fn):
        x, _, y = backbone_inputs(2)
        return flow_euler_sampler(lambda x, t, y: fn(x, torch.full((x.shape[0],), t * 1000.0), y), x, y, steps=STEPS)

    plain = tokenroute.wrap(copy.deepcopy(MODELS["dit"]).eval(), [(1, 2, 0.5)], seed=3)
    model = copy.deepcopy(plain)
    apply_caching(model, CachingConfig(router=CacheRouter(STEPS, len(cache_slots(model)), init=init)))
    out = guided_sample(model)
    if init > 0:
        assert torch.equal(out, guided_sample(plain))
    assert torch.isfinite(out).all()
    tokenroute.reset_state(model)
    x, t, y = backbone_inputs(2)
    unrouted = copy.deepcopy(model)
    tokenroute.remove_tread(unrouted)  # the cache stays; eval forwards do not route
    assert torch.isfinite(sample_with(unrouted)).all()


@pytest.mark.parametrize("name", ["dit", "pixart", "sd3"])
def test_it_runs_in_a_diffusers_scheduler_loop_on_diffusers_models(name):
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler
    from test_diffusers import build

    from tokenroute.methods.caching import Sampler, generate

    model, inputs = build(name)
    model.eval()
    plain = copy.deepcopy(model)
    noise = inputs.pop("hidden_states")
    inputs.pop("timestep")

    def call(m, x, timestep, _):
        return m(hidden_states=x, timestep=timestep.expand(x.shape[0]), **inputs).sample[:, :x.shape[1]]

    sampler = Sampler.from_scheduler(DDIMScheduler(num_train_timesteps=100), STEPS, call)
    apply_caching(model, CachingConfig(router=CacheRouter(STEPS, len(cache_slots(model)), init=5.0)))
    assert torch.equal(generate(model, sampler, noise, None), generate(plain, sampler, noise, None))
    reused = CacheRouter.every(2, STEPS, len(cache_slots(model)))
    remove_caching(model)
    apply_caching(model, CachingConfig(router=reused))
    assert torch.isfinite(generate(model, sampler, noise, None)).all()


def test_a_router_saves_and_loads_as_safetensors(tmp_path):
    router = CacheRouter.every(3, STEPS, 8)
    router.save(tmp_path / "router.safetensors")
    loaded = CacheRouter.load(tmp_path / "router.safetensors")
    assert torch.equal(loaded.logits, router.logits) and loaded.plan(0.1) == router.plan(0.1)


def test_the_cached_model_compiles():
    """The plan is a fixed table read on the host: the compiled model samples as the eager one does."""
    eager = cached("dit", lambda slots: CacheRouter.every(2, STEPS, slots))
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    expected = sample(eager)
    got = sample(compiled)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    tokenroute.reset_state(eager), tokenroute.reset_state(compiled_model)


@pytest.mark.parametrize("name", MODELS)
def test_first_block_cache_rule(name):
    """Threshold 0 never skips (bitwise the uncached model); a huge one skips the rest of the stack at every
    step after the first, so the stack's output moves only by the first block's change."""
    from tokenroute.methods.caching import FirstBlockCacheConfig, apply_first_block_cache, remove_first_block_cache

    model = apply_first_block_cache(copy.deepcopy(MODELS[name]).eval(), FirstBlockCacheConfig(threshold=0.0))
    assert torch.equal(sample(model), sample(MODELS[name].eval()))
    remove_first_block_cache(model)
    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=1e9))
    stack = tokenroute.core.find_stack(model)
    seen = []
    stack.blocks[0].register_forward_hook(lambda m, a, out: seen.append(("first", a[0], out)))
    stack.blocks[-1].register_forward_hook(lambda m, a, out: seen.append(("last", a[0], out)))
    sample(model)
    assert "skipped the rest of the stack in 4 of 5" in tokenroute.explain(model)
    (_, _, first0), (_, _, last0) = seen[0], seen[1]
    for (_, _, first), (_, _, last) in zip(seen[2::2], seen[3::2]):
        torch.testing.assert_close(last - first, last0 - first0, rtol=0, atol=1e-5)
