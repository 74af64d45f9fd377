"""TREAD token routing (arXiv 2501.04765): a fraction of the tokens skips a span of blocks and rejoins the
stream after it with the values it had when it left.

    apply_tread(model, TreadConfig(routes=[(2, 8, 0.5)]))   # or tokenroute.wrap(model, [(2, 8, 0.5)])
    remove_tread(model)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..core.boundary import Segment
from ..core.operations import SkipTokens
from ..core.patches import Patch, PatchRegistry, remove_patch
from ..core.route import RouteError, normalize_routes
from ..core.selection import RoutingGenerator

NAME = "tread"


@dataclass
class TreadConfig:
    """TREAD's routes and how tokens are chosen.

    routes: ``(start, end, ratio)`` tuples or ``Route`` objects; ``end`` inclusive, negative indices count
        from the end of the stack, ``ratio`` is the fraction of tokens that skip the route.
    seed: seed of the routing generator (default: torch's initial seed); offset by the distributed rank.
    prefix_tokens: leading tokens never routed (time/label/class tokens); default: the owner's or the
        model's ``num_prefix_tokens`` attribute (timm's convention), else 0.
    protect: bool (N,) or (B, N) tensor, or a callable of the routable tokens returning one: True marks
        tokens that are never routed.
    mechanism: "auto" (graph rewrite, falling back to module hooks where the forward cannot be traced),
        "fx" (graph rewrite or error) or "hooks".
    blocks: dotted path(s) of the block container(s) when the stack is not found automatically.
    """

    routes: Sequence[Any]
    seed: int | None = None
    prefix_tokens: int | None = None
    protect: torch.Tensor | Any = None
    mechanism: str = "auto"
    blocks: str | Sequence[str] | None = None


class TreadPatch(Patch):
    name = NAME
    order = 20
    title = "TREAD"

    def __init__(self, config: TreadConfig, depth: int):
        super().__init__()
        if config.protect is not None and not (callable(config.protect) or isinstance(config.protect, torch.Tensor)):
            raise RouteError("protect must be a bool tensor (N,) or (B, N), or a callable returning one")
        self.generator = RoutingGenerator(config.seed)
        operation = SkipTokens(self.generator, protect=config.protect)
        self.segments = [Segment(route, operation, NAME) for route in normalize_routes(config.routes, depth)]
        self.prefix_tokens = config.prefix_tokens
        self.mechanism = config.mechanism


def apply_tread(model: nn.Module, config: TreadConfig) -> nn.Module:
    """Turn on TREAD routing for ``model`` in place (training forwards route) and return it."""
    registry = PatchRegistry.for_model(model, config.blocks)
    if NAME in registry:
        raise RouteError(f"{type(model).__name__} is already wrapped with TREAD routes; call tokenroute.unwrap(model) "
                         "(or tokenroute.remove_tread(model)) first")
    registry.apply(TreadPatch(config, len(registry.stack)))
    return model


def remove_tread(model: nn.Module) -> nn.Module:
    """Take TREAD's routes off ``model``; other methods stay."""
    remove_patch(model, NAME)
    return model
