"""Guidance at sampling time: TREAD's routing guidance, composable with classifier-free guidance.

Routing guidance runs the same wrapped model twice, routing a fraction g1 and a larger fraction g2 of the
tokens, and extrapolates from the weaker (more routed) prediction towards the stronger one:
`v = v(g2) + w * (v(g1) - v(g2))` (TREAD defaults g1 0.3, g2 0.7, w 1.5). Any prediction works: noise,
velocity or an EDM denoised estimate, since the combination is linear.

Example, in a diffusers scheduler loop::

    model = tokenroute.wrap(DiT(...), routes=[(2, 8, 0.5)]).eval()
    scheduler.set_timesteps(50)
    for t in scheduler.timesteps:
        eps = guided_prediction(model, x, t, y, null_label=1000, cfg_scale=4.0, routing=(0.3, 0.7, 1.5))
        x = scheduler.step(eps, t, x).prev_sample
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import Tensor

from . import core
from .utils import output_tensor


def routing_guidance(
    model: torch.nn.Module,
    model_fn: Callable[..., Any] | None = None,
    g1: float = 0.3,
    g2: float = 0.7,
    w: float = 1.5,
) -> Callable[..., Tensor]:
    """Wrap a prediction function so each call returns `v(g2) + w * (v(g1) - v(g2))`.

    Args:
        model: the model passed to `tokenroute.wrap`; its routing is forced on (also in eval mode), with
            every route's ratio set to g2, then to g1, for one call each.
        model_fn: what to call, with the guided function's arguments; default `model`. Pass e.g. an EDM
            preconditioned denoiser built around `model`.
        g1, g2: fractions of tokens that skip each route in the strong and the weak call, 0 <= g1 < g2 < 1.
        w: guidance weight; 1 gives the plain prediction at g1, 0 the one at g2.

    The paper runs both calls unconditionally; pass the null label as the class to do the same.
    """
    if not 0 <= g1 < g2 < 1:
        raise ValueError(
            f"Routing guidance needs 0 <= g1 < g2 < 1 (g1 routes fewer tokens: the stronger prediction), "
            f"got g1={g1}, g2={g2}."
        )
    fn = model if model_fn is None else model_fn

    def guided(*args: Any, **kwargs: Any) -> Tensor:
        with core.routing(model, ratio=g2, enabled=True), _cache_context(model, "routing_weak"):
            weak = output_tensor(fn(*args, **kwargs))
        with core.routing(model, ratio=g1, enabled=True), _cache_context(model, "routing_strong"):
            strong = output_tensor(fn(*args, **kwargs))
        return weak + w * (strong - weak)

    return guided


def _cache_context(model: torch.nn.Module, name: str) -> Any:
    """Each of routing guidance's two calls per step keeps its own feature cache, where one is applied."""
    from .methods.caching import NAME, caching_context

    registry = core.patches.PatchRegistry.of(model)
    return caching_context(model, name) if registry is not None and NAME in registry else contextlib.nullcontext()


def _batch_time(t: Tensor | float, x: Tensor) -> Tensor:
    """A scalar time (as diffusers' `scheduler.timesteps` yields) -> one per sample, (B,)."""
    t = torch.as_tensor(t, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def classifier_free_guidance(
    model_fn: Callable[..., Any], null_label: int | Tensor, scale: float
) -> Callable[[Tensor, Tensor | float, Tensor], Tensor]:
    """Wrap `model_fn(x, t, y)` so each call returns `v(null) + scale * (v(y) - v(null))`.

    Conditional and unconditional halves run as one batch of 2B; `null_label` is the label (or
    embedding, broadcast to y's shape) that means "no condition".
    """

    def guided(x: Tensor, t: Tensor | float, y: Tensor) -> Tensor:
        t = _batch_time(t, x)
        null = torch.as_tensor(null_label, dtype=y.dtype, device=y.device).expand_as(y)
        out = output_tensor(model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])))
        cond, uncond = out.chunk(2)
        return uncond + scale * (cond - uncond)

    return guided


def guided_prediction(
    model: torch.nn.Module,
    x: Tensor,
    t: Tensor | float,
    y: Tensor,
    *,
    null_label: int | Tensor | None = None,
    cfg_scale: float = 1.0,
    routing: tuple[float, float, float] | None = None,
    model_fn: Callable[..., Any] | None = None,
) -> Tensor:
    """One guided prediction for a sampler step: routing guidance and/or classifier-free guidance.

    Args:
        model: the wrapped model (routing guidance switches its routing).
        x, t, y: noisy sample (B, ...), time (scalar or (B,)), condition (B, ...).
        null_label: the unconditional label; needed when `cfg_scale != 1`.
        cfg_scale: classifier-free guidance scale; 1 turns it off.
        routing: `(g1, g2, w)` for `routing_guidance`, or None for none.
        model_fn: called as `model_fn(x, t, y)`; default `model`.

    With both, routing guidance is applied to the conditional and the unconditional halves alike (the
    two commute); that costs two forwards of a 2B batch. Without either, it is one plain forward.
    """
    fn = model if model_fn is None else model_fn
    if routing is not None:
        fn = routing_guidance(model, fn, *routing)
    if cfg_scale != 1.0:
        if null_label is None:
            raise ValueError(f"cfg_scale={cfg_scale} needs null_label (the class id that means unconditional).")
        fn = classifier_free_guidance(fn, null_label, cfg_scale)
    return output_tensor(fn(x, _batch_time(t, x), y))
