"""Local attention (tokenroute.methods.local_attention), checked from outside: outputs against the unwrapped model,
and which tokens' attention outputs change when one token's attention input is perturbed (hooks on the branch)."""

from __future__ import annotations

import copy

import pytest
import torch

import tokenroute
from tokenroute import RouteError
from tokenroute.core.splice.tracer import tracing
from tokenroute.methods.local_attention import LocalAttentionConfig, apply_local_attention, remove_local_attention

from helpers import backbone_inputs, make_backbone

SIZE = 16  # 8 x 8 tokens
MODELS = {name: make_backbone(name, depth=3, size=SIZE).eval() for name in ("dit", "uvit")}


def local(name: str, **config) -> torch.nn.Module:
    return apply_local_attention(copy.deepcopy(MODELS[name]), LocalAttentionConfig(backend="sdpa", **config))


@pytest.mark.parametrize("name", MODELS)
def test_a_radius_that_covers_the_grid_is_dense_attention(name):
    x, t, y = backbone_inputs(2, size=SIZE)
    with torch.no_grad():
        torch.testing.assert_close(local(name, radius=100.0)(x, t, y), MODELS[name](x, t, y), rtol=0, atol=1e-5)


def _changed_rows(model: torch.nn.Module, token: int) -> torch.Tensor:
    """Rows of the first block's attention output that change when its input row ``token`` is perturbed."""
    attention = tokenroute.core.find_stack(model).blocks[0].attn
    outputs = []

    def perturb(module, args):
        if len(outputs) == 1:
            x = args[0].clone()
            x[:, token] += 1.0
            return (x, *args[1:])

    handles = [attention.register_forward_pre_hook(perturb),
               attention.register_forward_hook(lambda m, a, out: outputs.append(out))]
    x, t, y = backbone_inputs(1, size=SIZE)
    with torch.no_grad():
        model(x, t, y)
        model(x, t, y)
    for handle in handles:
        handle.remove()
    return ((outputs[-1] - outputs[-2]).abs().amax(-1) > 0)[0]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("radius", [1.0, 2.5, 4.0])
def test_a_query_sees_the_keys_within_the_radius_and_the_global_tokens(name, radius):
    """Perturb one image token's attention input: exactly the image tokens within the radius of it (and every
    non-image token, which sees all) change their attention output."""
    model = local(name, radius=radius)
    x, t, y = backbone_inputs(1, size=SIZE)
    with torch.no_grad():
        model(x, t, y)
    lead = _lead(model)
    side = SIZE // 2
    row, col = 3, 5
    changed = _changed_rows(model, lead + row * side + col)
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    near = ((ys - row) ** 2 + (xs - col) ** 2 < radius ** 2).flatten()
    expected = torch.cat([torch.ones(lead, dtype=torch.bool), near, torch.ones(len(changed) - lead - side * side,
                                                                                dtype=torch.bool)])
    assert torch.equal(changed, expected)


def _lead(model: torch.nn.Module) -> int:
    """The non-image tokens before the grid, as the model's own graph says (read through explain's layout)."""
    registry = tokenroute.core.patches.registry_of(model)
    return next(iter(registry.splice.signatures.graphs.values())).tapped[0].lead


def test_remove_restores_the_model_bitwise_and_bad_configs_are_refused():
    model = local("dit", radius=2.0)
    x, t, y = backbone_inputs(2, size=SIZE)
    remove_local_attention(model)
    assert not tokenroute.is_wrapped(model)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), MODELS["dit"](x, t, y))
    with pytest.raises(RouteError, match="radius below 1"):
        local("dit", radius=0.5)
    with pytest.raises(RouteError, match="stack has 3"):
        local("dit", blocks=[7])
    with pytest.raises(RouteError, match="reorder='tiles' is not one of 'stack'"):
        local("dit", reorder="tiles")


def test_it_composes_with_tread_routing():
    """Training with a TREAD route: with a radius that covers the grid the routed forward is the routed model's;
    with a small one it differs, and gradients reach the same parameters."""
    x, t, y = backbone_inputs(2, size=SIZE)
    outputs = []
    for config in (None, dict(radius=100.0), dict(radius=1.5)):
        model = tokenroute.wrap(copy.deepcopy(MODELS["dit"]), routes=[(1, 1, 0.5)], seed=3)
        if config:
            apply_local_attention(model, LocalAttentionConfig(backend="sdpa", **config))
        out = model.train()(x, t, y)
        out.square().mean().backward()
        outputs.append((out.detach(), {n for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=0, atol=1e-5)
    assert not torch.allclose(outputs[2][0], outputs[0][0], atol=1e-4)
    assert outputs[0][1] == outputs[1][1] == outputs[2][1]


def test_a_model_whose_grid_cannot_be_read_is_refused():
    """A DiT whose forward branches on a tensor's value cannot be traced: the grid is unknown, and refused."""
    model = copy.deepcopy(MODELS["dit"])

    class ValueBranchingDiT(type(model)):
        def forward(self, x, t, y):
            return super().forward(x, t, y) if float(x.mean()) > -1e9 else x

    model.__class__ = ValueBranchingDiT
    x, t, y = backbone_inputs(1, size=SIZE)
    for config in (dict(), dict(backend="flex", grid=(8, 8), tile=(4, 4), radius_tiles=0)):  # + a tile-order route
        apply_local_attention(model, LocalAttentionConfig(radius=2.0, **config))
        with pytest.raises(RouteError, match="not known"), torch.no_grad():
            model(x, t, y)
        remove_local_attention(model)


def test_joint_attention_with_a_declared_grid():
    """Flux packs its latents with a linear layer: the grid is declared and checked; text stays global, so a
    radius that covers the grid is Flux's own attention, a small one is not."""
    from family.cases_core import flux

    plain, inputs = flux(layers=1)
    plain.eval()
    with torch.no_grad():
        reference = plain(**inputs).sample
    model = apply_local_attention(copy.deepcopy(plain), LocalAttentionConfig(radius=2.0, backend="sdpa"))
    with pytest.raises(RouteError, match=r"grid=\(H, W\)"):
        model(**inputs)
    outputs = {}
    for radius in (100.0, 1.0):
        model = apply_local_attention(copy.deepcopy(plain), LocalAttentionConfig(radius=radius, grid=(4, 4),
                                                                                   backend="sdpa"))
        with torch.no_grad():
            outputs[radius] = model(**inputs).sample
    torch.testing.assert_close(outputs[100.0], reference, rtol=0, atol=1e-5)
    assert not torch.allclose(outputs[1.0], reference, atol=1e-4)
    wrong = apply_local_attention(copy.deepcopy(plain), LocalAttentionConfig(radius=2.0, grid=(2, 4), backend="sdpa"))
    with pytest.raises(RouteError, match="does not match"):
        wrong(**inputs)


def test_inside_a_route_the_kept_tokens_grid_places_decide_locality():
    """Training with a TREAD route over the first block: perturb one kept image token's attention input; exactly
    the kept tokens whose grid places lie within the radius of its place change their attention output."""
    model = tokenroute.wrap(copy.deepcopy(MODELS["dit"]), routes=[(0, 1, 0.5)], seed=5)
    apply_local_attention(model, LocalAttentionConfig(radius=2.5, backend="sdpa"))
    stack = tokenroute.core.find_stack(model)
    places, outputs = [], []

    def perturb(module, args):
        if len(outputs) == 1:
            x = args[0].clone()
            x[:, 7] += 1.0
            return (x, *args[1:])

    attention = stack.blocks[0].attn
    attention.register_forward_pre_hook(perturb)
    attention.register_forward_hook(lambda m, a, out: outputs.append(out))
    boundaries = tokenroute.core.patches.registry_of(model).splice.boundaries
    stack.blocks[0].register_forward_pre_hook(
        lambda m, a: None if tracing() else places.append(boundaries.tokens_at(0).grid_index()))
    x, t, y = backbone_inputs(1, size=SIZE)
    with torch.no_grad():
        model.train()(x, t, y)  # the first forward makes the route's generator
    outputs.clear()
    draws = tokenroute.routing_state_dict(model)
    with torch.no_grad():
        for _ in range(2):
            tokenroute.load_routing_state_dict(model, draws)  # the same draw both times
            model.train()(x, t, y)
    assert torch.equal(places[-1], places[-2])
    index = places[-1][0]
    side = SIZE // 2
    rows, cols = index // side, index % side
    near = (rows - rows[7]) ** 2 + (cols - cols[7]) ** 2 < 2.5 ** 2
    changed = ((outputs[-1] - outputs[-2]).abs().amax(-1) > 0)[0]
    assert index.numel() < side * side and torch.equal(changed, near)


def test_pooled_keys_and_values_train_and_are_explained():
    model = local("dit", radius=1.5, pooled=2)
    pools = dict(model.local_attention_pool.named_parameters())
    assert len(pools) == 3 and all(torch.equal(p, torch.full((4,), 0.25)) for p in pools.values())
    x, t, y = backbone_inputs(2, size=SIZE)
    model.train()(x, t, y).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pools.values())
    assert "pooled 2x2 keys and values" in tokenroute.explain(model)
    remove_local_attention(model)
    assert not hasattr(model, "local_attention_pool")


def test_distillation_trains_the_projections_only_and_lowers_its_loss():
    """The teacher is the same model with local attention off; only the attention projections and the pooling
    weights move, and the student's loss against the teacher falls."""
    from tokenroute.methods.local_attention import DistillationConfig, distillation_loss, distillation_parameters

    model = local("dit", radius=1.5, pooled=2).train()
    trained = distillation_parameters(model)
    names = {n for n, p in model.named_parameters() if any(p is q for q in trained)}
    assert names and all(".attn." in n or "local_attention_pool" in n for n in names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(trained, lr=3e-3)
    x, t, y = backbone_inputs(4, size=SIZE, seed=1)
    target = torch.randn_like(x)
    loss, parts = distillation_loss(model, lambda m: m(x, t, y), lambda p: (p - target).square().mean())
    assert loss.item() == pytest.approx(0.5 * parts["prediction"] + 0.5 * parts["attention"] + parts["objective"],
                                        rel=1e-5)
    history = []
    for _ in range(40):
        loss, parts = distillation_loss(model, lambda m: m(x, t, y), config=DistillationConfig(attention_every=2))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(parts["prediction"] + parts["attention"])
    assert sum(history[-5:]) < 0.5 * sum(history[:5])
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (name in names), name


def test_distillation_teacher_keeps_the_starting_weights():
    """The teacher's prediction inside the loss is the dense model with the weights it had before training (seen by
    a hook on the output), however far the student moves; without recorded weights the loss is refused."""
    from tokenroute.methods.local_attention import distillation_loss, distillation_parameters, local_attention_off

    model = local("dit", radius=1.5).train()
    x, t, y = backbone_inputs(2, size=SIZE, seed=2)
    with pytest.raises(RouteError, match="distillation_parameters"):
        distillation_loss(model, lambda m: m(x, t, y))
    with torch.no_grad(), local_attention_off(model):
        dense_before = model(x, t, y)
    optimizer = torch.optim.Adam(distillation_parameters(model), lr=1e-2)
    seen = []
    handle = model.register_forward_hook(lambda m, a, out: None if tracing() else seen.append(out.detach().clone()))
    for _ in range(5):
        seen.clear()
        loss, _ = distillation_loss(model, lambda m: m(x, t, y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        torch.testing.assert_close(seen[0], dense_before)  # the teacher's pass: the starting weights
    handle.remove()
    with torch.no_grad(), local_attention_off(model):
        assert not torch.allclose(model(x, t, y), dense_before)  # the model's own dense output has moved


@pytest.mark.parametrize("case", ["dit", "pixart", "sd3"])
def test_diffusers_attention_processors_run_locally(case):
    """diffusers' DiT and PixArt (AttnProcessor2_0, with PixArt's cross-attention left dense) and SD3's joint
    attention over [image, text]: a radius that covers the grid is the model's own attention, a radius of 1 is
    not; the grid comes from the graph."""
    from family import cases_core, cases_g1

    plain, inputs = {"dit": cases_core.dit, "pixart": cases_g1.pixart, "sd3": cases_g1.sd3}[case]()
    plain.eval()
    with torch.no_grad():
        reference = plain(**inputs).sample
        outputs = {r: apply_local_attention(copy.deepcopy(plain), LocalAttentionConfig(radius=r, backend="sdpa"))(
            **inputs).sample for r in (100.0, 1.0)}
    torch.testing.assert_close(outputs[100.0], reference, rtol=0, atol=1e-5)
    assert not torch.allclose(outputs[1.0], reference, atol=1e-4)


def test_video_windows_run_through_the_frames():
    """Wan's frames x 2D grid (read from its 3D patch embedding): a radius that covers each frame is Wan's own
    attention (the window runs through every frame); frame_radius=0 keeps each frame to itself."""
    from family.cases_g5 import wan

    plain, inputs = wan()
    plain.eval()
    with torch.no_grad():
        reference = plain(**inputs).sample
        outputs = {fr: apply_local_attention(copy.deepcopy(plain), LocalAttentionConfig(
            radius=100.0, frame_radius=fr, backend="sdpa"))(**inputs).sample for fr in (None, 0)}
    torch.testing.assert_close(outputs[None], reference, rtol=0, atol=1e-5)
    assert not torch.allclose(outputs[0], reference, atol=1e-4)


@pytest.mark.parametrize("name", ["timm ViT, class and 4 register tokens", "DiT", "U-ViT"])
def test_paper_code_runs_locally(name):
    """The backbones as their papers' code writes them (timm's ViT with class and register tokens, which stay
    global): a covering radius is their own attention, a radius of 1 is not."""
    from test_paper_models import CASES

    torch.manual_seed(0)
    plain, inputs = CASES[name].build()
    plain.eval()
    with torch.no_grad():
        reference = plain(**inputs)
        outputs = {r: apply_local_attention(copy.deepcopy(plain), LocalAttentionConfig(radius=r, backend="sdpa"))(
            **inputs) for r in (100.0, 1.0)}
    torch.testing.assert_close(outputs[100.0], reference, rtol=0, atol=1e-5)
    assert not torch.allclose(outputs[1.0], reference, atol=1e-5)


def _block_inputs(model: torch.nn.Module, block: int, *inputs) -> torch.Tensor:
    """The token stream block ``block`` receives, seen by a hook on the block (not read from the library)."""
    seen = []
    handle = tokenroute.core.find_stack(model).blocks[block].register_forward_pre_hook(
        lambda m, args: None if tracing() else seen.append(args[0]))
    with torch.no_grad():
        out = model(*inputs)
    handle.remove()
    return seen[-1], out


def _flex_or_skip(model: torch.nn.Module, *inputs) -> None:
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"FlexAttention does not run on this CPU build: {type(err).__name__}: {err}")


def test_the_stack_runs_in_tile_order_once_and_gives_the_same_attention():
    """FlexAttention's tile order made once around the local blocks: the blocks inside receive their image tokens
    tile by tile (4 x 4 tiles of the 8 x 8 grid), the model's output is the one made reordering around each
    attention, and the dense-mask path's."""
    rule = dict(tile=(4, 4), radius_tiles=0)
    x, t, y = backbone_inputs(2, size=SIZE)
    stack = apply_local_attention(copy.deepcopy(MODELS["dit"]), LocalAttentionConfig(backend="flex", **rule))
    _flex_or_skip(stack, x, t, y)
    each = apply_local_attention(copy.deepcopy(MODELS["dit"]), LocalAttentionConfig(backend="flex", reorder="attention",
                                                                                      **rule))
    inside, out = _block_inputs(stack, 1, x, t, y)
    row_major, reference = _block_inputs(each, 1, x, t, y)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, local("dit", **rule)(x, t, y), rtol=1e-5, atol=1e-5)
    lead = _lead(stack)
    order, _ = tokenroute.core.locality.tile_order((8, 8), (4, 4))
    assert not torch.equal(order, torch.arange(64))
    torch.testing.assert_close(inside[:, :lead], row_major[:, :lead], rtol=0, atol=0)
    torch.testing.assert_close(inside[:, lead: lead + 64], row_major[:, lead + order], rtol=1e-5, atol=1e-5)
    assert "reordered" in tokenroute.explain(stack, x, t, y)


def test_tile_order_gives_way_to_a_route_and_ratios_count_routes_only():
    """With a TREAD route over block 1 the tile order runs in blocks 0 and 2 only (block 1 reorders around its
    attention); the routed forward is the one reordering around each attention, and one ratio sets the one route."""
    rule = dict(tile=(4, 4), radius_tiles=0, backend="flex")
    x, t, y = backbone_inputs(2, size=SIZE)
    outputs = []
    for reorder in ("stack", "attention"):
        model = tokenroute.wrap(copy.deepcopy(MODELS["dit"]), routes=[(1, 1, 0.5)], seed=3)
        apply_local_attention(model, LocalAttentionConfig(reorder=reorder, **rule))
        _flex_or_skip(model.eval(), x, t, y)
        with torch.no_grad():
            outputs.append(model.train()(x, t, y))
        masks = tokenroute.routing_masks(model)
        assert len(masks) == 1 and masks[0].sum() == 2 * 32
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    plan = tokenroute.core.patches.registry_of(model).splice.boundaries.plan
    tokenroute.set_ratio(model, 0.25)
    assert [s.route.ratio for s in plan.segments] == [0.25]
    stacked = tokenroute.core.patches.registry_of(tokenroute.wrap(
        apply_local_attention(copy.deepcopy(MODELS["dit"]), LocalAttentionConfig(**rule)), routes=[(1, 1, 0.5)]))
    spans = [(s.route.start, s.route.end, s.optional) for s in stacked.splice.boundaries.plan.segments]
    assert spans == [(0, 0, True), (1, 1, False), (2, 2, True)]
    tokenroute.set_ratio(stacked.model, [0.25])
    with pytest.raises(RouteError, match="2 ratios given for 1 routes"):
        tokenroute.set_ratio(stacked.model, [0.25, 0.5])


@pytest.mark.parametrize("case", ["sd3", "flux"])
def test_joint_attention_keeps_text_where_the_processor_puts_it(case):
    """SD3's processor attends over [image, text], Flux's over [text, image]: perturb one image token's attention
    input in the first block, and exactly the image tokens within the radius change their attention output (a
    text side read wrongly would shift every window by the text's length)."""
    from family.cases_core import flux
    from family.cases_g1 import sd3

    plain, inputs = sd3() if case == "sd3" else flux(layers=1)
    side, radius, (row, col) = (16, 2.5, (5, 9)) if case == "sd3" else (4, 1.5, (1, 2))
    model = apply_local_attention(copy.deepcopy(plain).eval(), LocalAttentionConfig(
        radius=radius, backend="sdpa", grid=None if case == "sd3" else (side, side)))
    attention, outputs = tokenroute.core.find_stack(model).blocks[0].attn, []

    def perturb(module, args, kwargs):
        if len(outputs) == 1:
            hidden = kwargs["hidden_states"].clone()
            hidden[:, row * side + col] += 1.0
            return args, {**kwargs, "hidden_states": hidden}

    handles = [attention.register_forward_pre_hook(perturb, with_kwargs=True),
               attention.register_forward_hook(lambda m, a, out: None if tracing() else outputs.append(out[0]))]
    with torch.no_grad():
        model(**inputs)
        model(**inputs)
    for handle in handles:
        handle.remove()
    changed = ((outputs[-1] - outputs[-2]).abs().amax(-1) > 0)[0]
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    assert torch.equal(changed, ((ys - row) ** 2 + (xs - col) ** 2 < radius ** 2).flatten())
