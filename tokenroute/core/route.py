"""Routes: which blocks a route spans and what fraction of tokens skips it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

# A selector gets the routable tokens (B, N, ...) of the stream at the route's start, the number of
# tokens to keep and the routing generator; it returns the kept indices (B, K) or a keep mask (B, N).
Selector = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]


class RouteError(ValueError):
    """A route, or the model it is applied to, cannot be routed as asked."""


@dataclass(frozen=True)
class Route:
    """Blocks ``start..end`` (inclusive) run on a subset of the tokens.

    ``ratio`` is the fraction of the routable tokens that SKIP the route (TREAD's convention):
    ``int(N * ratio)`` tokens per sample. ``selector`` replaces the uniform random choice.
    """

    start: int
    end: int
    ratio: float = 0.5
    selector: Selector | None = None

    def num_skip(self, num_tokens: int, ratio: float | None = None) -> int:
        return int(num_tokens * (self.ratio if ratio is None else ratio))

    def __str__(self) -> str:
        chooser = "uniform random" if self.selector is None else getattr(self.selector, "__name__", "custom")
        return f"blocks {self.start}..{self.end}, {self.ratio:g} of tokens skip ({chooser})"


def _as_route(spec: Any) -> Route:
    if isinstance(spec, Route):
        return spec
    if isinstance(spec, (tuple, list)) and len(spec) == 3:
        start, end, ratio = spec
        return Route(start, end, ratio)
    raise RouteError(
        f"route {spec!r} is not a Route or a (start, end, ratio) tuple; "
        "write it as (2, 8, 0.5) or tokenroute.Route(2, 8, 0.5)"
    )


def check_ratio(ratio: Any, what: str = "ratio") -> float:
    """Return ``ratio`` as a float in [0, 1), or raise a RouteError that says how to fix it."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise RouteError(f"{what} {ratio!r} is not a number; give the fraction of tokens that skip, e.g. 0.5")
    if not 0.0 <= float(ratio) < 1.0:
        raise RouteError(
            f"{what} {ratio} is outside [0, 1): it is the fraction of tokens that SKIP the route "
            "(0 routes nothing, 0.5 drops half; 1 would leave no token to process)"
        )
    return float(ratio)


def normalize_routes(routes: Sequence[Any], depth: int) -> list[Route]:
    """Validate ``routes`` against a stack of ``depth`` blocks: resolve negative indices, sort, reject
    out-of-range, reversed or overlapping routes. Returns new Route objects with absolute indices."""
    if isinstance(routes, (Route, tuple)) and not (isinstance(routes, tuple) and routes and isinstance(routes[0], (tuple, list, Route))):
        routes = [routes]
    if not isinstance(routes, (list, tuple)) or len(routes) == 0:
        raise RouteError("routes is empty; give at least one, e.g. routes=[(2, 8, 0.5)]")
    resolved = []
    for spec in routes:
        route = _as_route(spec)
        for name in ("start", "end"):
            value = getattr(route, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise RouteError(f"route {route.start}..{route.end}: {name} {value!r} is not an integer block index")
        start = route.start + depth if route.start < 0 else route.start
        end = route.end + depth if route.end < 0 else route.end
        if not (0 <= start < depth and 0 <= end < depth):
            raise RouteError(
                f"route ({route.start}, {route.end}) is out of range for a stack of {depth} blocks; "
                f"indices must lie in [-{depth}, {depth - 1}] (end is inclusive)"
            )
        if start > end:
            raise RouteError(f"route ({route.start}, {route.end}) starts after it ends; give start <= end")
        check_ratio(route.ratio, f"route ({route.start}, {route.end}) ratio")
        if route.selector is not None and not callable(route.selector):
            raise RouteError(f"route ({route.start}, {route.end}) selector {route.selector!r} is not callable")
        resolved.append(Route(start, end, float(route.ratio), route.selector))
    resolved.sort(key=lambda r: r.start)
    for a, b in zip(resolved, resolved[1:]):
        if b.start <= a.end:
            raise RouteError(
                f"routes {a.start}..{a.end} and {b.start}..{b.end} overlap; routes apply one after the "
                "other, so each block may belong to one route at most"
            )
    return resolved
