"""tokenroute.losses: the route-aware combinator, the patch layout and the objectives."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenroute
from tokenroute.losses import (
    EDM,
    MODES,
    EpsilonPrediction,
    FlowMatching,
    VPrediction,
    combine,
    from_scheduler,
    mae_loss,
    mae_target,
    patchify_pixels,
    per_token,
    unpatchify_pixels,
)
from tokenroute.models.dit import DiT
from tokenroute.models.layers import patchify as model_patchify

T, F_ = True, False

# A tiny example computed by hand. Two samples, four tokens, two routes (True = skipped the route).
LOSS = torch.tensor([[1.0, 2.0, 3.0, 6.0], [4.0, 8.0, 0.0, 2.0]], dtype=torch.float64)
MASKS = [
    torch.tensor([[T, F_, F_, F_], [F_, F_, T, F_]]),
    torch.tensor([[T, T, F_, F_], [F_, F_, F_, T]]),
]
MAE = torch.tensor([[10.0, 20.0, 30.0, 40.0], [1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
# all:      sample means 12/4 = 3 and 14/4 = 3.5                                    -> 3.25
# routes:   route 1 keeps {2,3,6} -> 11/3 and {4,8,2} -> 14/3, mean 25/6;
#           route 2 keeps {3,6} -> 4.5 and {4,8,0} -> 4, mean 4.25                  -> (25/6 + 17/4) / 2 = 101/24
# visible:  no route skipped {3,6} -> 4.5 and {4,8} -> 6                           -> 5.25
# mae:      some route skipped {10,20} -> 15 and {3,4} -> 3.5                       -> 9.25
EXPECTED = {"all": 3.25, "routes": 101 / 24, "visible": 5.25}


def random_case(seed, batch, tokens, routes, density=0.5):
    g = torch.Generator().manual_seed(seed)
    loss = torch.rand(batch, tokens, generator=g, dtype=torch.float64) + 0.1
    masks = [torch.rand(batch, tokens, generator=g) < density for _ in range(routes)]
    return loss, masks


cases = st.tuples(st.integers(0, 2**31), st.integers(1, 3), st.integers(1, 7), st.integers(0, 4))


# ---------------------------------------------------------------------------------------------- combine


@pytest.mark.parametrize("mode", MODES)
def test_combine_hand_computed(mode):
    total, parts = combine(LOSS, MASKS, mode=mode)
    assert total.item() == pytest.approx(EXPECTED[mode], rel=1e-12)
    assert set(parts) == {"denoise", "total"}
    assert parts["denoise"].item() == pytest.approx(EXPECTED[mode], rel=1e-12)


def test_combine_single_route_hand_computed():
    # One route: sample 0 keeps {2, 6} (mean 4), sample 1 keeps {4, 8, 0} (mean 4) -> 4.
    mask = torch.tensor([[T, F_, T, F_], [F_, F_, F_, T]])
    assert combine(LOSS, [mask], mode="routes")[0].item() == pytest.approx(4.0)
    assert combine(LOSS, [mask], mode="visible")[0].item() == pytest.approx(4.0)


def test_combine_mae_term_hand_computed():
    total, parts = combine(LOSS, MASKS, mode="visible", mae=MAE, mae_weight=0.1)
    assert parts["mae"].item() == pytest.approx(9.25)
    assert total.item() == pytest.approx(5.25 + 0.925)
    assert parts["total"].item() == pytest.approx(5.25 + 0.925)


def test_combine_mae_is_zero_without_skipped_tokens():
    mae = torch.rand(2, 4, dtype=torch.float64, requires_grad=True)
    total, parts = combine(LOSS, [], mode="routes", mae=mae, mae_weight=0.5)
    assert parts["mae"].item() == 0.0
    assert total.item() == pytest.approx(3.25)
    total.backward()
    assert torch.equal(mae.grad, torch.zeros_like(mae))


def test_combine_parts_are_detached():
    loss = LOSS.clone().requires_grad_()
    mae = MAE.clone().requires_grad_()
    total, parts = combine(loss, MASKS, mae=mae, mae_weight=0.1)
    assert total.requires_grad
    assert not any(part.requires_grad for part in parts.values())


@settings(max_examples=60, deadline=None)
@given(cases)
def test_routes_without_routed_tokens_is_the_plain_mean_exactly(case):
    seed, batch, tokens, routes = case
    loss, _ = random_case(seed, batch, tokens, routes)
    nothing_routed = [torch.zeros(batch, tokens, dtype=torch.bool) for _ in range(routes)]
    plain = combine(loss, [], mode="all")[0]
    assert torch.allclose(plain, loss.mean(), rtol=1e-12, atol=0)
    for mode in MODES:
        assert torch.equal(combine(loss, nothing_routed, mode=mode)[0], plain)


@settings(max_examples=60, deadline=None)
@given(cases)
def test_routes_and_visible_agree_with_a_direct_computation(case):
    seed, batch, tokens, routes = case
    loss, masks = random_case(seed, batch, tokens, routes)

    def masked_mean(keep):
        per_sample = [loss[b][keep[b]].mean() if keep[b].any() else torch.tensor(0.0, dtype=loss.dtype)
                      for b in range(batch)]
        return torch.stack(per_sample).mean()

    skipped = torch.zeros(batch, tokens, dtype=torch.bool)
    for mask in masks:
        skipped |= mask
    expected_routes = torch.stack([masked_mean(~m) for m in masks]).mean() if masks else loss.mean()
    assert torch.allclose(combine(loss, masks, mode="routes")[0], expected_routes, rtol=1e-12)
    assert torch.allclose(combine(loss, masks, mode="visible")[0], masked_mean(~skipped), rtol=1e-12)


@settings(max_examples=60, deadline=None)
@given(cases)
def test_gradient_reaches_exactly_the_counted_tokens(case):
    seed, batch, tokens, routes = case
    base, masks = random_case(seed, batch, tokens, routes)
    skipped = torch.zeros(batch, tokens, dtype=torch.bool)
    kept_by_some = torch.zeros(batch, tokens, dtype=torch.bool) if masks else ~skipped
    for mask in masks:
        skipped |= mask
        kept_by_some |= ~mask
    counted = {"all": torch.ones_like(skipped), "routes": kept_by_some, "visible": ~skipped}
    for mode in MODES:
        loss = base.clone().requires_grad_()
        mae = base.flip(1).clone().requires_grad_()
        combine(loss, masks, mode=mode, mae=mae, mae_weight=0.3)[0].backward()
        assert torch.equal(loss.grad != 0, counted[mode]), mode
        assert torch.equal(mae.grad != 0, skipped)


def test_excluded_tokens_may_hold_nan_without_poisoning_the_loss():
    loss = LOSS.clone()
    loss[0, 0] = float("nan")  # skipped by both routes
    assert combine(loss, MASKS, mode="visible")[0].item() == pytest.approx(5.25)


@settings(max_examples=40, deadline=None)
@given(cases, st.floats(0.0, 10.0), st.floats(0.1, 10.0))
def test_loss_and_weights_scale_linearly(case, mae_weight, scale):
    seed, batch, tokens, routes = case
    loss, masks = random_case(seed, batch, tokens, routes)
    mae = loss.flip(0) * 2
    for mode in MODES:
        total, parts = combine(loss, masks, mode=mode, mae=mae, mae_weight=mae_weight)
        base = combine(loss, masks, mode=mode, mae=mae, mae_weight=0.0)[0]
        assert torch.allclose(total, base + mae_weight * parts["mae"], rtol=1e-12)
        scaled = combine(scale * loss, masks, mode=mode, mae=scale * mae, mae_weight=mae_weight)[0]
        assert torch.allclose(scaled, scale * total, rtol=1e-10)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(per_token_loss=torch.rand(2, 4, 1)), ValueError, "batch, tokens"),
        (dict(per_token_loss=torch.ones(2, 4, dtype=torch.long)), ValueError, "float"),
        (dict(masks=[torch.zeros(3, 4, dtype=torch.bool)]), ValueError, "same forward pass"),
        (dict(masks=[torch.zeros(2, 4)]), TypeError, "bool"),
        (dict(masks=torch.zeros(2, 4, dtype=torch.bool)), TypeError, "wrap a single mask in a list"),
        (dict(mode="tokens"), ValueError, "'all', 'routes', 'visible'"),
        (dict(mae=torch.rand(2, 5)), ValueError, "mae is torch.float32 of shape \\(2, 5\\)"),
        (dict(mae=torch.rand(2, 4), mae_weight=-0.1), ValueError, ">= 0"),
        (dict(mae_weight=0.1), ValueError, "needs an mae tensor"),
    ],
)
def test_combine_rejects_bad_input(kwargs, error, match):
    args = dict(per_token_loss=torch.rand(2, 4), masks=[torch.zeros(2, 4, dtype=torch.bool)])
    args.update(kwargs)
    with pytest.raises(error, match=match):
        combine(**args)


def test_combine_follows_a_routed_forward():
    torch.manual_seed(0)
    model = tokenroute.wrap(DiT.from_preset("tiny"), routes=[(1, 2, 0.5)], seed=0).train()
    objective = FlowMatching()
    batch = objective.prepare(torch.randn(3, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    pred = objective.predict(model, batch, torch.tensor([0, 1, 2]))
    masks = tokenroute.routing_masks(model)
    assert [m.shape for m in masks] == [(3, 16)] and masks[0].sum(1).tolist() == [8, 8, 8]
    per_token_loss = objective.per_token_loss(pred, batch, patch_size=2)
    mae = mae_loss(patchify_pixels(pred, 2), mae_target(batch.model_input, 2))
    total, parts = combine(per_token_loss, masks, mode="routes", mae=mae, mae_weight=0.1)
    total.backward()
    assert torch.isfinite(total) and parts["mae"] > 0
    assert model.final_layer.linear.weight.grad is not None


# ---------------------------------------------------------------------------------------------- patches


def test_patchify_hand_computed():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    expected = torch.tensor([[[0.0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]])
    assert torch.equal(patchify_pixels(x, 2), expected)
    assert torch.equal(per_token(x, 2), torch.tensor([[2.5, 4.5, 10.5, 12.5]]))
    # Two channels: each patch lists (row, column, channel), channel fastest.
    x2 = torch.stack([x[0, 0], -x[0, 0]])[None]
    assert patchify_pixels(x2, 2)[0, 0].tolist() == [0.0, -0.0, 1, -1, 4, -4, 5, -5]


image_shapes = st.tuples(
    st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)
)


@settings(max_examples=40, deadline=None)
@given(image_shapes)
def test_patchify_inverts_and_matches_pooling(shape):
    b, c, gh, gw, ph, pw = shape
    x = torch.randn(b, c, gh * ph, gw * pw, dtype=torch.float64)
    tokens = patchify_pixels(x, (ph, pw))
    assert tokens.shape == (b, gh * gw, ph * pw * c)
    assert torch.equal(unpatchify_pixels(tokens, (ph, pw), x.shape[2:]), x)
    assert torch.equal(patchify_pixels(unpatchify_pixels(tokens, (ph, pw), x.shape[2:]), (ph, pw)), tokens)
    pooled = F.avg_pool2d(x.mean(1), (ph, pw)).flatten(1)  # MaskDiT's way
    assert torch.allclose(per_token(x, (ph, pw)), pooled, rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(image_shapes, st.integers(1, 3), st.integers(1, 2))
def test_video_patchify_is_frames_major_and_inverts(shape, grid_t, frames):
    b, c, gh, gw, ph, pw = shape
    x = torch.randn(b, c, grid_t * frames, gh * ph, gw * pw, dtype=torch.float64)
    tokens = patchify_pixels(x, (ph, pw), frames=frames)
    assert tokens.shape == (b, grid_t * gh * gw, frames * ph * pw * c)
    assert torch.equal(unpatchify_pixels(tokens, (ph, pw), x.shape[2:], frames=frames), x)
    pooled = F.avg_pool3d(x.mean(1), (frames, ph, pw)).flatten(1)  # (t, h, w) row-major: frames-major
    assert torch.allclose(per_token(x, (ph, pw), frames=frames), pooled, rtol=1e-12)


def test_patchify_matches_the_backbones_token_layout():
    x = torch.randn(2, 4, 8, 6)
    assert torch.equal(patchify_pixels(x, 2), model_patchify(x, 2))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: per_token(torch.rand(1, 1, 7, 8), 2), "H=7 is not divisible by patch_size=2.*6 or 8"),
        (lambda: per_token(torch.rand(1, 1, 8, 9), (2, 4)), "W=9 is not divisible by patch_size=4"),
        (lambda: per_token(torch.rand(1, 1, 3, 4, 4), 2, frames=2), "T=3 is not divisible by frames=2"),
        (lambda: per_token(torch.rand(1, 1, 4, 4), 2, frames=2), "video"),
        (lambda: per_token(torch.rand(1, 4, 4), 2), "add a channel axis"),
        (lambda: per_token(torch.rand(1, 1, 4, 4), 0), "positive int"),
        (lambda: per_token(torch.rand(1, 1, 4, 4, 4), (2, 2, 2)), "frames="),
        (lambda: unpatchify_pixels(torch.rand(1, 3, 4), 2, (4, 4)), "do not tile"),
    ],
)
def test_patch_helpers_reject_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------- objectives


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_epsilon_prediction_matches_the_scheduler():
    scheduler = DDPMScheduler(num_train_timesteps=50)
    x0 = torch.randn(4, 2, 4, 4)
    batch = EpsilonPrediction(scheduler).prepare(x0, generator=gen())
    assert batch.timestep.dtype == torch.long and ((0 <= batch.timestep) & (batch.timestep < 50)).all()
    abar = scheduler.alphas_cumprod[batch.timestep].view(-1, 1, 1, 1)
    assert torch.allclose(batch.model_input, abar.sqrt() * x0 + (1 - abar).sqrt() * batch.noise, atol=1e-6)
    assert torch.equal(batch.target, batch.noise)
    assert torch.equal(batch.weight, torch.ones(4, 1, 1, 1))


def test_v_prediction_target_is_the_schedulers_velocity():
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    x0 = torch.randn(4, 2, 4, 4)
    batch = VPrediction(scheduler).prepare(x0, generator=gen())
    assert torch.equal(batch.target, scheduler.get_velocity(x0, batch.noise, batch.timestep))
    abar = scheduler.alphas_cumprod[batch.timestep].view(-1, 1, 1, 1)
    assert torch.allclose(batch.target, abar.sqrt() * batch.noise - (1 - abar).sqrt() * x0, atol=1e-6)


def test_from_scheduler_follows_prediction_type():
    assert type(from_scheduler(DDPMScheduler())) is EpsilonPrediction
    assert type(from_scheduler(DDPMScheduler(prediction_type="v_prediction"))) is VPrediction
    with pytest.raises(ValueError, match="'epsilon', 'v_prediction'"):
        from_scheduler(DDPMScheduler(prediction_type="sample"))
    with pytest.raises(ValueError, match="use from_scheduler"):
        EpsilonPrediction(DDPMScheduler(prediction_type="v_prediction"))
    with pytest.raises(TypeError, match="add_noise"):
        VPrediction(object())


@pytest.mark.parametrize(
    "objective",
    [EpsilonPrediction(DDPMScheduler()), EDM(), FlowMatching(), FlowMatching("logit_normal")],
    ids=["epsilon", "edm", "flow", "flow-logit-normal"],
)
def test_prepare_is_reproducible_with_a_generator(objective):
    x0 = torch.randn(3, 1, 4, 4)
    first, again = objective.prepare(x0, generator=gen(1)), objective.prepare(x0, generator=gen(1))
    other = objective.prepare(x0, generator=gen(2))
    assert torch.equal(first.model_input, again.model_input) and torch.equal(first.timestep, again.timestep)
    assert not torch.equal(first.noise, other.noise)


def test_edm_noise_level_weight_and_target():
    edm = EDM()
    x0 = torch.randn(5, 2, 4, 4)
    batch = edm.prepare(x0, generator=gen(3))
    expected_sigma = (torch.randn(5, generator=gen(3)) * 1.2 - 1.2).exp()  # drawn first, then the noise
    assert torch.allclose(batch.timestep, expected_sigma)
    s = batch.timestep.view(-1, 1, 1, 1)
    assert torch.allclose(batch.model_input, x0 + s * batch.noise)
    assert torch.equal(batch.target, x0)
    assert torch.allclose(batch.weight, (s**2 + 0.25) / (s * 0.5) ** 2)
    # At sigma = sigma_data = 0.5: lambda = (0.25 + 0.25) / 0.25^2 = 8.
    assert edm.loss_weight(torch.tensor(0.5)).item() == pytest.approx(8.0)


def test_edm_precondition_hand_computed():
    edm = EDM()
    x = torch.randn(2, 1, 4, 4)
    # A model returning zeros leaves c_skip * x; at sigma = sigma_data = 0.5, c_skip = 0.25 / 0.5 = 0.5.
    zero = edm.precondition(lambda x, t, y: torch.zeros_like(x), x, 0.5, None)
    assert torch.allclose(zero, 0.5 * x)
    sigma = torch.tensor([0.5, 2.0])
    c_skip = torch.tensor([0.5, 0.25 / 4.25]).view(-1, 1, 1, 1)
    assert torch.allclose(edm.precondition(lambda x, t, y: torch.zeros_like(x), x, sigma, None), c_skip * x)
    # The model sees c_in * x and c_noise = ln(sigma) / 4; c_in = 1 / sqrt(0.5) at sigma 0.5.
    seen = {}

    def identity(x_in, t, y):
        seen.update(x=x_in, t=t, y=y)
        return x_in

    out = edm.precondition(identity, x, 0.5, "label")
    assert torch.allclose(seen["x"], x / math.sqrt(0.5))
    assert torch.allclose(seen["t"], torch.full((2,), math.log(0.5) / 4)) and seen["y"] == "label"
    # c_skip + c_out * c_in = 0.5 + (0.25 / sqrt(0.5)) / sqrt(0.5) = 1: the identity model returns x.
    assert torch.allclose(out, x)


def test_edm_predict_is_the_preconditioned_model_and_checks_its_output():
    edm = EDM()
    batch = edm.prepare(torch.randn(2, 1, 4, 4), generator=gen())
    model = lambda x, t, y: torch.ones_like(x)  # noqa: E731
    expected = edm.precondition(model, batch.model_input, batch.timestep, None)
    assert torch.equal(edm.predict(model, batch, None), expected)
    with pytest.raises(ValueError, match="learned-variance"):
        edm.precondition(lambda x, t, y: torch.cat([x, x], 1), batch.model_input, batch.timestep, None)


def test_flow_matching_interpolates_and_targets_the_velocity():
    x0 = torch.randn(6, 2, 4, 4)
    for objective in (FlowMatching(), FlowMatching("logit_normal", logit_mean=0.5)):
        batch = objective.prepare(x0, generator=gen(4))
        t = batch.timestep.view(-1, 1, 1, 1)
        assert ((0 <= t) & (t <= 1)).all()
        assert torch.allclose(batch.model_input, (1 - t) * x0 + t * batch.noise)
        assert torch.equal(batch.target, batch.noise - x0)
    logit_t = FlowMatching("logit_normal", logit_mean=0.5, logit_std=2.0).prepare(x0, generator=gen(5)).timestep
    assert torch.allclose(logit_t, (torch.randn(6, generator=gen(5)) * 2.0 + 0.5).sigmoid())
    with pytest.raises(ValueError, match="'uniform' or 'logit_normal'"):
        FlowMatching("cosine")


def test_per_token_loss_is_the_weighted_error_per_patch():
    edm = EDM()
    batch = edm.prepare(torch.zeros(2, 1, 4, 4), generator=gen())
    pred = batch.target.clone()
    pred[:, :, 0, 0] = 2.0  # one pixel off by 2 in the first patch: that patch's mean error is 4 / 4 = 1
    expected = torch.zeros(2, 4)
    expected[:, 0] = batch.weight.flatten()
    assert torch.allclose(edm.per_token_loss(pred, batch, patch_size=2), expected)
    with pytest.raises(ValueError, match="learn_sigma"):
        edm.per_token_loss(torch.cat([pred, pred], 1), batch, patch_size=2)


def test_predict_unwraps_diffusers_outputs():
    class Output:
        def __init__(self, sample):
            self.sample = sample

    objective = FlowMatching()
    batch = objective.prepare(torch.randn(2, 1, 4, 4), generator=gen())
    pred = objective.predict(lambda x, t, y: Output(x * 2), batch, None)
    assert torch.equal(pred, batch.model_input * 2)


def test_objectives_reject_bad_input():
    with pytest.raises(ValueError, match="float tensor"):
        FlowMatching().prepare(torch.ones(2, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="sigma_data"):
        EDM(sigma_data=0.0)


def test_mae_target_and_loss_hand_computed():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 2)
    # One patch: mean 2.5, unbiased variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3.
    target = mae_target(x, 2)
    expected = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / math.sqrt(5 / 3 + 1e-6)
    assert torch.allclose(target, expected.view(1, 1, 4))
    # Predicting zeros costs the mean squared target: 5 / (4 * (5/3 + 1e-6)) ~= 0.75.
    assert torch.allclose(mae_loss(torch.zeros(1, 1, 4), target), torch.tensor([[0.75]]), atol=1e-6)
    with pytest.raises(ValueError, match="single value"):
        mae_target(torch.rand(1, 1, 2, 2), 1)
    with pytest.raises(ValueError, match="patchify the prediction"):
        mae_loss(torch.zeros(1, 2, 4), target)
