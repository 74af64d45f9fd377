"""What happens at a plan's boundaries, shared by the graph splice and the module-level splice.

``Boundaries`` carries out a plan for one forward at a time: at a segment's start it begins the operation
and passes every value entering the segment through it; at its end every routed value leaving goes back
through it; after a stage's block it runs the stage. Both mechanisms call these and nothing else, so a
boundary behaviour is written once; they differ only in how they find which values cross.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..layout import StreamTokens, TokenLayout
from ..operations import needs_shared_selection
from ..plan import Plan
from ..route import RouteError, check_ratio


def _flagged(fn: Any, value: Any, flag: Any) -> Any:
    """``fn`` applied to the parts of ``value`` that ``flag`` marks: True, False, or a tuple of flags for a tuple's
    items. A module-level function, not a closure calling itself: that closure would be a reference cycle holding
    the route's start tensors (and the autograd graph behind them) until Python's cycle collector ran."""
    if isinstance(flag, tuple):
        return type(value)(_flagged(fn, v, f) for v, f in zip(value, flag))
    return fn(value) if flag else value


@dataclass
class Overrides:
    """What ``tokenroute.routing(...)`` changes for the calls inside its block."""

    enabled: bool | None = None  # True: route in eval too; False: never route
    ratios: list[float] | None = None


class Boundaries:
    """Carries out a plan, one forward at a time. Holds the per-forward runs and the last forward's draws."""

    def __init__(self, plan: Plan, joints: list[str | None] | None = None):
        self.plan = plan
        self.joints = joints or [None] * len(plan.segments)  # per segment: its blocks' joint attention order
        self.overrides = Overrides()
        self.runs: list[Any] = [None] * len(plan.segments)
        self.routing = False  # this (or the last) forward drops tokens
        self.open: int | None = None  # the segment whose blocks are running
        self.tapped: dict[int, TokenLayout] = {}  # tapped block -> its stream's layout, for the graph running now
        self.segment_of = plan.route_of()

    # -- per forward ---------------------------------------------------------------------------------------
    def active(self, training: bool) -> bool:
        return training if self.overrides.enabled is None else self.overrides.enabled

    def begin_forward(self, routing: bool) -> None:
        self.runs = [None] * len(self.plan.segments)
        self.routing = routing
        self.open = None
        self.tapped = {}

    def end_forward(self) -> None:
        """Keep only what ``masks`` needs, not the route-start tensors."""
        self.runs = [None if run is None else segment.operation.release(run)
                     for segment, run in zip(self.plan.segments, self.runs)]

    def ratio(self, i: int) -> float:
        if not self.routing or self.plan.segments[i].optional:
            return 0.0
        ratios = self.overrides.ratios
        return self.plan.segments[i].route.ratio if ratios is None else ratios[self.plan.routed.index(i)]

    # -- boundaries ----------------------------------------------------------------------------------------
    def layout(self, stream: torch.Tensor) -> TokenLayout:
        """The layout a declared prefix gives, where the splice could not read one from the graph."""
        length = stream.shape[1] if stream.dim() >= 2 else 0
        return TokenLayout.declared(length, self.plan.prefix_tokens, self.plan.prefix_declared)

    def enter(self, i: int, stream: torch.Tensor, values: tuple[Any, ...], roles: list[str],
              layout: TokenLayout | None = None) -> tuple[Any, ...]:
        """Segment ``i`` starts on ``stream`` laid out as ``layout`` (read from the graph; None: the declared
        prefix): begin its operation, pass each entering value through it."""
        segment = self.plan.segments[i]
        shared = stream.dim() >= 2 and needs_shared_selection(values, roles, stream.shape[0], stream.shape[1])
        layout = layout if layout is not None else self.layout(stream)
        if layout.joint is None and self.joints[i] is not None:
            layout = dataclasses.replace(layout, joint=self.joints[i])
        run = segment.operation.begin(segment.route, stream, layout=layout, ratio=self.ratio(i), shared=shared)
        self.runs[i] = run
        self.open = i
        return self.reduce(i, values, roles)

    def reduce(self, i: int, values: tuple[Any, ...], roles: list[str]) -> tuple[Any, ...]:
        """Pass values made before segment ``i`` through its running operation, as they enter it."""
        operation, run = self.plan.segments[i].operation, self.runs[i]
        return tuple(operation.enter(run, v, role) for v, role in zip(values, roles))

    def exit(self, i: int, values: tuple[Any, ...], routed: list[Any]) -> tuple[Any, ...]:
        """Segment ``i`` ends: every routed value leaving it goes back through its operation. A flag is True,
        False, or a tuple of flags for the items of a tuple value."""
        operation, run = self.plan.segments[i].operation, self.runs[i]
        if self.open == i:
            self.open = None

        leave = functools.partial(operation.exit, run)
        return tuple(_flagged(leave, v, r) for v, r in zip(values, routed))

    def tokens_at(self, block: int) -> StreamTokens | None:
        """The tokens of block ``block``'s stream as it runs now: its layout (read from the graph where a method
        taps the block, else the running route's) and, inside a route that keeps a subset, their positions in
        the full stream. None where no layout is known (a forward the hooks splice runs, an untapped block)."""
        i = self.segment_of.get(block)
        run = self.runs[i] if i is not None and self.open == i else None
        # a reordering lends no layout: under module hooks its run holds only the declared one, never read from a graph
        own = run is not None and not self.plan.segments[i].optional
        layout = self.tapped.get(block, run.layout if own else None)
        if layout is None:
            return None
        if run is None:
            return StreamTokens(layout)
        return self.plan.segments[i].operation.inner_tokens(run, layout)

    def reducing(self) -> str | None:
        """What the blocks running now run on ('8 of 16 tokens'), where a segment reduces the stream; else None.
        Other methods read it (a cache must not reuse outputs computed on another subset of the tokens)."""
        i = self.open
        if i is None or self.runs[i] is None:
            return None
        return self.plan.segments[i].operation.reduction(self.runs[i])

    def explain_failure(self, err: Exception, paths: list[str]) -> RouteError | None:
        """An error raised while a segment's blocks ran on a subset of the tokens, as a RouteError that says
        why; None where no segment was reducing the stream or the error is no shape error (the model's own
        error stands: running out of memory says so, and a caller that catches it still can)."""
        reduction = self.reducing()
        if reduction is None or isinstance(err, torch.OutOfMemoryError):
            return None
        i = self.open
        segment = self.plan.segments[i]
        route = segment.route
        return RouteError(
            f"{type(err).__name__} while route {i} ({segment.method}, {paths[route.start]} .. "
            f"{paths[route.end]}) ran on {reduction}: {err}. Either a block reshapes its tokens to the image grid "
            "or a fixed token count (it takes the grid's height and width, or a reshape bakes the count in), and "
            "cannot run on a subset of the tokens: end the route before it (tokenroute.explain lists the blocks); "
            "or a per-token tensor reaches the blocks as an argument tokenroute passes untouched (a per-token "
            "timestep embedding named as conditioning): declare it with tokenroute.register_block(cls, "
            "tokenroute.BlockSpec(stream, token_args=(name,)))")

    def after_block(self, stage: int, stream: torch.Tensor, arguments: dict[str, Any]) -> torch.Tensor:
        return self.plan.stages[stage].module(stream, **arguments)

    # -- after a forward -----------------------------------------------------------------------------------
    def masks(self, method: str | None = None) -> list[torch.Tensor]:
        """(B, N) per segment (of ``method``, or all), True where the token skipped it; [] when the last
        forward did not route."""
        if not self.routing or any(run is None for run in self.runs):
            return []
        out = []
        for segment, run in zip(self.plan.segments, self.runs):
            mask = segment.operation.mask(run)
            if mask is not None and (method is None or segment.method == method):
                out.append(mask)
        return out

    def checked_ratios(self, ratio: float | list[float] | tuple[float, ...]) -> list[float]:
        """One ratio per route (segment that takes a ratio) from a float or a sequence, each checked."""
        count = len(self.plan.routed)
        ratios = [ratio] * count if isinstance(ratio, (int, float)) else list(ratio)
        if len(ratios) != count:
            raise RouteError(f"{len(ratios)} ratios given for {count} routes")
        return [check_ratio(r) for r in ratios]

    @contextlib.contextmanager
    def override(self, *, ratios: list[float] | None = None, enabled: bool | None = None) -> Iterator[None]:
        saved = self.overrides
        self.overrides = Overrides(saved.enabled if enabled is None else enabled,
                                   saved.ratios if ratios is None else ratios)
        try:
            yield
        finally:
            self.overrides = saved
