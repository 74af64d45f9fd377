"""diffusers transformers on tiny random configs: DiT, PixArt, SD3, Flux."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import tokenroute

diffusers = pytest.importorskip("diffusers")

from family.cases_core import B, dit, flux  # noqa: E402
from helpers import randomize  # noqa: E402


def pixart():
    model = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                               out_channels=4, num_layers=4, sample_size=8, patch_size=2,
                                               cross_attention_dim=16, caption_channels=12, norm_num_groups=1)
    return model, dict(hidden_states=torch.randn(B, 4, 8, 8), encoder_hidden_states=torch.randn(B, 5, 12),
                       timestep=torch.tensor([3, 5]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def sd3():
    model = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=4,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                            caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
                                            pos_embed_max_size=16)
    return model, dict(hidden_states=torch.randn(B, 4, 8, 8), encoder_hidden_states=torch.randn(B, 5, 12),
                       pooled_projections=torch.randn(B, 10), timestep=torch.tensor([3, 5]))


MODELS = {"dit": dit, "pixart": pixart, "sd3": sd3, "flux": functools.partial(flux, layers=2)}


def build(name, seed=0):
    torch.manual_seed(seed)
    model, inputs = MODELS[name]()
    return randomize(model, seed), inputs


@pytest.mark.parametrize("name", MODELS)
def test_eval_bitwise_train_routes_with_fx(name):
    model, inputs = build(name)
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).sample
    tokenroute.wrap(model, [(1, 2, 0.5)], seed=0)
    with torch.no_grad():
        assert torch.equal(model(**inputs).sample, expected)
    model.train()
    out = model(**inputs, return_dict=False)[0]
    assert out.shape == expected.shape
    (mask,) = tokenroute.routing_masks(model)
    assert mask.shape == (B, 16) and (mask.sum(1) == 8).all()
    out.square().mean().backward()
    plan = tokenroute.explain(model)
    assert "torch.fx graph rewrite" in plan
    stack = tokenroute.core.find_stack(model)
    out_index = stack.specs[2].stream_output
    stream_out = f"{stack.paths[2]} output" + ("" if out_index is None else f"[{out_index}]")
    assert f"scatters back {stream_out}" in plan


@pytest.mark.parametrize("name", MODELS)
def test_ratio_zero_is_bitwise_and_mechanisms_agree(name):
    model, inputs = build(name)
    model.train()

    def forward(m):  # seeded: DiT drops class labels at random in training
        torch.manual_seed(1)
        return m(**inputs).sample

    expected = forward(model)
    other = copy.deepcopy(model)
    tokenroute.wrap(model, [(1, 2, 0.0)], seed=0)
    assert torch.equal(forward(model), expected)
    tokenroute.unwrap(model)
    tokenroute.wrap(model, [(1, 2, 0.5)], seed=0, mechanism="fx")
    tokenroute.wrap(other, [(1, 2, 0.5)], seed=0, mechanism="hooks")
    torch.testing.assert_close(forward(model), forward(other), rtol=0, atol=1e-6)
    assert "module hooks" in tokenroute.explain(other)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_text_tokens_never_routed_and_rotary_rows_follow(name):
    model, inputs = build(name)
    tokenroute.wrap(model, [(1, 2, 0.5)], seed=0)
    seen = {}
    block = model.transformer_blocks[1]
    block.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    if name == "flux":
        model.pos_embed.register_forward_hook(lambda m, a, out: seen.__setitem__("rope", out))
    model.train()
    model(**inputs)
    (mask,) = tokenroute.routing_masks(model)
    assert seen["hidden_states"].shape[1] == 8
    assert seen["encoder_hidden_states"].shape[1] == 5  # all text tokens
    if name == "flux":
        keep = (~mask[0]).nonzero()[:, 0]
        assert torch.equal(mask[0], mask[1])  # one draw for the batch: the rotary table has no batch axis
        for full, got in zip(seen["rope"], seen["image_rotary_emb"]):
            assert torch.equal(got, torch.cat([full[:5], full[5 + keep]]))


def test_save_and_load_pretrained_while_wrapped(tmp_path):
    model, inputs = build("dit")
    keys = set(model.state_dict())
    tokenroute.wrap(model, [(1, 2, 0.5)])
    model.train()
    model(**inputs).sample.mean().backward()
    assert set(model.state_dict()) == keys
    model.save_pretrained(tmp_path)
    loaded = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path).eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).sample, model(**inputs).sample)


def test_accelerate_prepare_keeps_routing():
    accelerate = pytest.importorskip("accelerate")
    model, inputs = build("dit")
    tokenroute.wrap(model, [(1, 2, 0.5)], seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    accelerator = accelerate.Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    loss = model(**inputs).sample.square().mean()
    accelerator.backward(loss)
    optimizer.step()
    assert tokenroute.routing_masks(accelerator.unwrap_model(model))[0].shape == (B, 16)


def test_torch_compile_routes_like_eager():
    from helpers import backbone_inputs, make_backbone

    eager = make_backbone("dit", depth=4)
    compiled_model = copy.deepcopy(eager)
    inputs = backbone_inputs(2)
    tokenroute.wrap(eager, [(1, 2, 0.5)], seed=5)
    tokenroute.wrap(compiled_model, [(1, 2, 0.5)], seed=5)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    torch.testing.assert_close(compiled(*inputs), eager(*inputs), rtol=1e-5, atol=1e-5)
    assert torch.equal(tokenroute.routing_masks(compiled_model)[0], tokenroute.routing_masks(eager)[0])


@pytest.mark.parametrize("name", MODELS)
def test_branch_outputs_stand_before_their_gates(name):
    """Every block whose branches are known adds nothing to its image stream once the outputs the facts
    point at are zeroed: they are the block's whole residual contribution, before gates and projections."""
    from helpers import zero_branch_outputs

    model, inputs = build(name)
    seen = {}
    stack = tokenroute.core.find_stack(model)
    handles = [block.register_forward_pre_hook(lambda m, a, kw, p=path: seen.__setitem__(p, (a, kw)), with_kwargs=True)
               for path, block in zip(stack.paths, stack.blocks)]
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    checked = 0
    for path, block, spec in zip(stack.paths, stack.blocks, stack.specs):
        if not tokenroute.block_branches(block):
            assert type(block).__name__ == "FluxSingleTransformerBlock"  # parallel branches, gated together
            continue
        args, kwargs = seen[path]
        stream = kwargs.get(spec.stream, args[0] if args else None)
        handles = zero_branch_outputs(block)
        with torch.no_grad():
            out = block(*args, **kwargs)
        for handle in handles:
            handle.remove()
        out = out if spec.stream_output is None else out[spec.stream_output]
        assert torch.equal(out, stream), path
        checked += 1
        with torch.no_grad():
            full = block(*args, **kwargs)
        assert not torch.equal(full if spec.stream_output is None else full[spec.stream_output], stream)
    assert checked >= 2
