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

from ..core.plan import Segment
from ..core.operations import SkipTokens
from ..core.patches import Patch, PatchRegistry, SpliceOptions, remove_patch
from ..core.route import RouteError, normalize_routes

NAME = "tread"


@dataclass
class TreadConfig(SpliceOptions):
    """TREAD's routes and how tokens are chosen (and ``seed``, ``prefix_tokens``, ``mechanism``, ``blocks``:
    see ``SpliceOptions``).

    routes: ``(start, end, ratio)`` tuples or ``Route`` objects; ``end`` inclusive, negative indices count
        from the end of the stack, ``ratio`` is the fraction of tokens that skip the route.
    protect: bool (N,) or (B, N) tensor, or a callable of the routable tokens returning one: True marks
        tokens that are never routed.
    """

    routes: Sequence[Any]
    protect: torch.Tensor | Any = None


class TreadPatch(Patch):
    name = NAME
    order = 20
    title = "TREAD"

    def __init__(self, config: TreadConfig, depth: int):
        super().__init__()
        if config.protect is not None and not (callable(config.protect) or isinstance(config.protect, torch.Tensor)):
            raise RouteError("protect must be a bool tensor (N,) or (B, N), or a callable returning one")
        self.take_options(config)
        operation = SkipTokens(self.generator, protect=config.protect)
        self.segments = [Segment(route, operation, NAME) for route in normalize_routes(config.routes, depth)]


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
