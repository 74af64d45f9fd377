"""Controls over the routes of whatever methods are applied: the last forward's masks, overrides for a
block of calls, ratio schedules, and the routing generators' states for exact resume."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Sequence

import torch
import torch.nn as nn

from .patches import PatchRegistry, registry_of
from .route import RouteError
from .splice.boundaries import Boundaries


def _boundaries(model: nn.Module) -> Boundaries:
    splice = registry_of(model).splice
    if splice is None:
        raise RouteError(f"{type(model).__name__} has no routes: the methods applied do not route tokens")
    return splice.boundaries


def is_wrapped(model: nn.Module) -> bool:
    """Whether any tokenroute method is applied to ``model``."""
    return PatchRegistry.of(model) is not None


def routing_masks(model: nn.Module, method: str | None = None) -> list[torch.Tensor]:
    """After a routed forward: one bool (B, N) tensor per route (of ``method``, e.g. "tread" or "masking", or
    of every method, in block order), True where the token skipped it. Empty when the last forward did not
    route."""
    if method is not None:
        registry_of(model).get(method)
    return _boundaries(model).masks(method)


def routing(model: nn.Module, *, ratio: float | Sequence[float] | None = None,
            enabled: bool | None = None) -> contextlib.AbstractContextManager[None]:
    """Override routing for the calls inside the block: ``enabled=True`` routes in eval mode too (routing
    guidance at sampling), ``False`` never routes, ``ratio`` replaces every route's ratio (a float, or
    one per route in block order)."""
    boundaries = _boundaries(model)
    return boundaries.override(ratios=None if ratio is None else boundaries.checked_ratios(ratio), enabled=enabled)


def set_ratio(model: nn.Module, ratio: float | Sequence[float]) -> None:
    """Change every route's ratio (a float, or one per route in block order) from now on; e.g. 0.0 to finish
    masked training unmasked (MaskDiT's unmasking tuning) or to anneal TREAD's ratio with a schedule."""
    boundaries = _boundaries(model)
    plan = boundaries.plan
    for i, value in zip(plan.routed, boundaries.checked_ratios(ratio)):
        segment = plan.segments[i]
        segment.route = dataclasses.replace(segment.route, ratio=value)


def routing_state_dict(model: nn.Module) -> dict[str, Any]:
    """The routing generators' states, by method, to save with a checkpoint so that a resumed run draws the
    same masks."""
    return {patch.name: patch.generator.state_dict() for patch in registry_of(model) if patch.generator is not None}


def load_routing_state_dict(model: nn.Module, state: dict[str, Any]) -> None:
    """Restore what ``routing_state_dict`` saved; every method in ``state`` must be applied."""
    registry = registry_of(model)
    for name, generator_state in state.items():
        generator = registry.get(name).generator
        if generator is None:
            raise RouteError(f"method {name!r} draws no routes; the state does not belong to this model")
        generator.load_state_dict(generator_state)
