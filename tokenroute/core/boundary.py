"""What happens at a route's boundaries, shared by the graph splice and the module-level splice.

At the start: draw the kept tokens, remember the full stream, gather every token-aligned value that
enters the route. At the end: every routed value that leaves the route is scattered back into the
route-start stream, so a skipped token leaves with exactly the value it had when the route began
(the route acts as the identity on skipped tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_map

from .route import Route, RouteError
from .selection import RoutingGenerator, check_protect, draw_keep
from .tokens import gather_table, gather_tokens, scatter_tokens, with_prefix


@dataclass
class RouteRun:
    """One route's state during one forward."""

    keep: torch.Tensor  # (B, K) kept routable tokens, ascending
    index: torch.Tensor | None  # (B, P + K) kept positions in the stream, prefix tokens included
    base: torch.Tensor | None  # what skipped tokens come back as: the route-start stream (TREAD), or a fill
    length: int  # L, full stream length
    kept_length: int  # P + K
    num_tokens: int  # N routable tokens


class RoutingState:
    """Everything a wrapped model carries: routes, options, the generator and the last forward's draws."""

    def __init__(self, routes: list[Route], *, seed: int | None, prefix_tokens: int,
                 protect: Any = None, fills: list[Any] | None = None):
        self.routes = routes
        # per route: None (skipped tokens return with their route-start values) or a function of the
        # route-start stream giving what they return as (masked training: a learnable mask token)
        self.fills = fills or [None] * len(routes)
        self.prefix_tokens = prefix_tokens
        self.protect = protect
        self.generator = RoutingGenerator(seed)
        self.force: bool | None = None  # True: route in eval too; False: never route
        self.ratio_override: list[float] | None = None
        self.runs: list[RouteRun | None] = [None] * len(routes)
        self.routed_last_forward = False

    # -- per forward --------------------------------------------------------------------------
    def active(self, training: bool) -> bool:
        return training if self.force is None else self.force

    def begin_forward(self, routing: bool) -> None:
        self.runs = [None] * len(self.routes)
        self.routed_last_forward = routing

    def ratio(self, i: int) -> float:
        return self.routes[i].ratio if self.ratio_override is None else self.ratio_override[i]

    # -- boundaries ---------------------------------------------------------------------------
    def start(self, i: int, stream: torch.Tensor, shared: bool = False) -> RouteRun:
        """Draw the kept tokens of route ``i`` for this forward's stream (B, L, ...)."""
        if stream.dim() < 2:
            raise RouteError(f"route {i}: the token stream has shape {tuple(stream.shape)}; expected (B, L, ...)")
        batch, length = stream.shape[0], stream.shape[1]
        prefix = self.prefix_tokens
        num_tokens = length - prefix
        if num_tokens <= 0:
            raise RouteError(f"route {i}: {length} tokens with {prefix} prefix tokens leave none to route")
        route = self.routes[i]
        num_keep = num_tokens - route.num_skip(num_tokens, self.ratio(i))
        routable = stream[:, prefix:] if prefix else stream
        protect = self.protect(routable) if callable(self.protect) else self.protect
        if protect is not None:
            protect = check_protect(protect, batch, num_tokens, num_keep)
        keep = draw_keep(routable, num_keep, self.generator.get(stream.device), shared=shared,
                         protect=protect, selector=route.selector)
        index = with_prefix(keep, prefix)
        fill = self.fills[i]
        base = stream if fill is None else fill(stream)
        run = RouteRun(keep, index, base, length, prefix + num_keep, num_tokens)
        self.runs[i] = run
        return run

    def end_forward(self) -> None:
        """Keep only what routing_masks needs: the route-start tensors would pin activations and make
        the model impossible to deep-copy (an EMA copy) while they hang on to the autograd graph."""
        self.runs = [None if run is None else RouteRun(run.keep.detach(), None, None, run.length, run.kept_length,
                                                       run.num_tokens) for run in self.runs]

    def masks(self) -> list[torch.Tensor]:
        """(B, N) per route, True where the token skipped the route."""
        if not self.routed_last_forward or any(run is None for run in self.runs):
            return []
        out = []
        for run in self.runs:
            mask = torch.ones(run.keep.shape[0], run.num_tokens, dtype=torch.bool, device=run.keep.device)
            out.append(mask.scatter(1, run.keep, False))
        return out


def is_token_aligned(value: Any, batch: int, length: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == length \
        and value.shape[0] in (batch, 1)


def gather_value(run: RouteRun, value: Any, role: str) -> Any:
    """The part of ``value`` that enters the route, by role ('tokens', 'table', 'auto', 'pass')."""
    if role == "pass" or value is None:
        return value
    batch = run.base.shape[0]
    if role == "table":
        return tree_map(lambda t: gather_table(t, run.index, run.length) if isinstance(t, torch.Tensor) else t, value)
    if role == "tokens" and isinstance(value, torch.Tensor) and not is_token_aligned(value, batch, run.length):
        raise RouteError(
            f"a token-aligned argument has shape {tuple(value.shape)} but the stream has {run.length} tokens "
            f"in a batch of {batch}; register the block's arguments with tokenroute.register_block"
        )
    return tree_map(lambda t: gather_tokens(t, run.index) if is_token_aligned(t, batch, run.length) else t, value)


def scatter_value(run: RouteRun, value: Any) -> Any:
    """``value`` leaving the route: kept-length token tensors return to full length around the base."""
    batch = run.base.shape[0]

    def back(t: Any) -> Any:
        if not (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[0] == batch and t.shape[1] == run.kept_length):
            return t
        if t.shape[2:] != run.base.shape[2:]:
            raise RouteError(
                f"a tensor of shape {tuple(t.shape)} leaves the route but the stream at the route's start had "
                f"shape {tuple(run.base.shape)}; skipped tokens cannot be restored into it"
            )
        return scatter_tokens(run.base, run.index, t)

    return tree_map(back, value)
