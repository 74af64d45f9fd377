"""tokenroute.sampling: routing guidance on a real wrapped model, classifier-free guidance, scheduler loops."""

import pytest
import torch
from diffusers import DDIMScheduler

import tokenroute
from tokenroute.models.dit import DiT
from tokenroute.sampling import classifier_free_guidance, guided_prediction, routing_guidance

NULL = 10  # the tiny DiT has 10 classes; label 10 is its null label
G1, G2, W = 0.3, 0.7, 1.5


@pytest.fixture
def model():
    torch.manual_seed(0)
    dit = DiT.from_preset("tiny")  # 8x8x1 input, patch 2: 16 tokens, 4 blocks
    with torch.no_grad():  # adaLN-zero starts as the zero function; give every block something to do
        for p in dit.parameters():
            p.normal_(0, 0.3)
    wrapped = tokenroute.wrap(dit, routes=[(1, 2, 0.5)], seed=0).eval()
    # One routed forward creates the routing generator, so routing_state_dict has a state to return to.
    at_ratio(wrapped, 0.5, torch.zeros(1, 1, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    return wrapped


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 1, 8, 8, generator=g), torch.full((3,), 0.4), torch.tensor([1, 2, 3])


def at_ratio(model, ratio, *args):
    with tokenroute.routing(model, ratio=ratio, enabled=True):
        return model(*args)


def test_routing_guidance_extrapolates_between_two_ratios(model, inputs):
    start = tokenroute.routing_state_dict(model)
    guided = routing_guidance(model, g1=G1, g2=G2, w=W)(*inputs)
    tokenroute.load_routing_state_dict(model, start)  # same masks again: the weak call (g2) draws first
    weak, strong = at_ratio(model, G2, *inputs), at_ratio(model, G1, *inputs)
    assert not torch.allclose(weak, strong)  # routing changes the prediction, so the test can tell
    assert torch.equal(guided, weak + W * (strong - weak))


def test_routing_guidance_routes_in_eval_and_restores_the_model(model, inputs):
    routing_guidance(model, g1=0.25, g2=0.5)(*inputs)
    masks = tokenroute.routing_masks(model)
    assert len(masks) == 1 and masks[0].sum(1).tolist() == [4, 4, 4]  # int(16 * 0.25), from the last call
    model(*inputs)  # eval mode outside the block: no routing
    assert tokenroute.routing_masks(model) == []
    model.train()(*inputs)  # training uses the route's own ratio again
    assert tokenroute.routing_masks(model)[0].sum(1).tolist() == [8, 8, 8]


def test_guided_prediction_composes_routing_and_classifier_free_guidance(model, inputs):
    x, t, y = inputs
    start = tokenroute.routing_state_dict(model)
    guided = guided_prediction(model, x, t, y, null_label=NULL, cfg_scale=4.0, routing=(G1, G2, W))
    tokenroute.load_routing_state_dict(model, start)
    both = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL)]))
    weak, strong = at_ratio(model, G2, *both), at_ratio(model, G1, *both)
    cond, uncond = (weak + W * (strong - weak)).chunk(2)
    assert torch.equal(guided, uncond + 4.0 * (cond - uncond))


def test_guided_prediction_without_guidance_is_one_plain_forward(model, inputs):
    x, t, y = inputs
    assert torch.equal(guided_prediction(model, x, torch.tensor(0.4), y), model(x, t, y))
    assert tokenroute.routing_masks(model) == []


def test_guided_prediction_in_a_diffusers_scheduler_loop(model, inputs):
    x, _, y = inputs
    scheduler = DDIMScheduler(num_train_timesteps=100)
    scheduler.set_timesteps(3)
    start = tokenroute.routing_state_dict(model)

    def sample(predict):
        sample = x
        for t in scheduler.timesteps:
            sample = scheduler.step(predict(sample, t), t, sample).prev_sample
        return sample

    with torch.no_grad():
        guided = sample(lambda s, t: guided_prediction(model, s, t, y, null_label=NULL, cfg_scale=2.0,
                                                       routing=(G1, G2, W)))
        tokenroute.load_routing_state_dict(model, start)

        def by_hand(s, t):
            both = (torch.cat([s, s]), t.expand(6), torch.cat([y, torch.full_like(y, NULL)]))
            weak, strong = at_ratio(model, G2, *both), at_ratio(model, G1, *both)
            cond, uncond = (weak + W * (strong - weak)).chunk(2)
            return uncond + 2.0 * (cond - uncond)

        expected = sample(by_hand)
    assert torch.isfinite(guided).all() and not torch.equal(guided, x)
    assert torch.equal(guided, expected)


def test_classifier_free_guidance_hand_computed():
    calls = []

    def model_fn(x, t, y):  # prediction = x * label + t
        calls.append(x.shape[0])
        return x * y.view(-1, 1, 1, 1).float() + t.view(-1, 1, 1, 1)

    x, y = torch.ones(2, 1, 1, 1), torch.tensor([2, 5])
    out = classifier_free_guidance(model_fn, null_label=0, scale=3.0)(x, 0.5, y)
    # cond = label + 0.5, uncond = 0 + 0.5: 0.5 + 3 * label
    assert out.flatten().tolist() == [6.5, 15.5]
    assert calls == [4]  # conditional and unconditional halves in one batch


def test_guidance_rejects_bad_input(model, inputs):
    with pytest.raises(ValueError, match="0 <= g1 < g2 < 1"):
        routing_guidance(model, g1=0.7, g2=0.3)
    with pytest.raises(ValueError, match="0 <= g1 < g2 < 1"):
        routing_guidance(model, g1=0.3, g2=1.0)
    with pytest.raises(ValueError, match="needs null_label"):
        guided_prediction(model, *inputs, cfg_scale=2.0)
    with pytest.raises(tokenroute.RouteError, match="not wrapped"):
        routing_guidance(torch.nn.Identity())(*inputs)
