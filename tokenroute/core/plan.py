"""The plan: what every applied method contributes to the block stack, merged in block order.

Segments are routes of the stack with the token operation each applies (``operations``); stages are modules
run on the stream after a block (an added decoder); taps are blocks whose stream's token layout a method reads
while the block runs (local attention needs each token's place on the grid). ``splice`` carries a plan out, one forward at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from .operations import TokenOperation
from .route import Route


@dataclass
class Segment:
    """A route of the stack and the token operation it applies; ``method`` names the patch it came from."""

    route: Route
    operation: TokenOperation
    method: str
    needed_in_eval: bool = False  # the operation runs in eval forwards too (token density at sampling)
    optional: bool = False  # gives way: clipped around other methods' routes and stages (a reordering for speed)


@dataclass
class Stage:
    """A module run on the stream right after block ``after`` (and after a route ending there), called with
    that block's other arguments as they were before any route reduced them. ``needed_in_eval``: eval
    forwards run the splice too (with nothing dropped) so the stage runs."""

    after: int
    module: nn.Module
    method: str
    needed_in_eval: bool = True


@dataclass(frozen=True)
class Tap:
    """Block ``block``'s stream layout is read (from the graph, at the trace) for method ``method``; eval forwards
    run the splice so that it is known there too."""

    block: int
    method: str


@dataclass
class Plan:
    """Every segment and stage on the stack, in block order; the prefix tokens no segment routes, and whether
    they were declared (by a method's ``prefix_tokens`` or the model's ``num_prefix_tokens``) or assumed 0."""

    segments: list[Segment] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)
    taps: list[Tap] = field(default_factory=list)
    prefix_tokens: int = 0
    prefix_declared: bool = False

    @property
    def routes(self) -> list[Route]:
        return [s.route for s in self.segments]

    @property
    def routed(self) -> list[int]:
        """The segments that take a ratio (every one but the optional reorderings), in block order: what a
        ratio per route counts."""
        return [i for i, s in enumerate(self.segments) if not s.optional]

    @property
    def needed_in_eval(self) -> bool:
        return bool(self.taps) or any(part.needed_in_eval for part in [*self.segments, *self.stages])

    def route_of(self) -> dict[int, int]:
        """Block position -> index of the segment containing it."""
        return {b: i for i, s in enumerate(self.segments) for b in range(s.route.start, s.route.end + 1)}
