"""Token operations: what a route does to the token stream at its two boundaries, defined once.

A route's entry turns the full stream into the reduced one the route's blocks run on (``enter``), and
its exit turns the reduced stream back into a full one (``exit``), using what the entry set aside. Every
token-aligned value that crosses the boundary (skips, attention masks, rotary rows) goes through the same
run, so both splice mechanisms (graph and hooks) only decide *which* values cross, never *how*.

``SkipTokens`` is TREAD (skipped tokens return with their route-start values); ``MaskTokens`` is MaskDiT
(dropped tokens return as a learnable mask token); ``PoolTokens`` is token density (the route runs on the image
grid pooled, its change comes back upsampled); ``OrderTokens`` is local attention's tile order (every token runs
the route, the image tokens reordered, the stream's own order back at the exit).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_leaves, tree_map

from .layout import StreamTokens, TokenLayout
from .route import Route, RouteError
from .selection import RoutingGenerator, check_protect, draw_keep
from .tokens import gather_axes, gather_tokens, scatter_tokens, with_context


@dataclass
class DropRun:
    """One route's draw in one forward: which tokens were kept and what the others come back as."""

    keep: torch.Tensor  # (B, K) kept routable tokens, ascending
    index: torch.Tensor | None  # (B, L - N + K) kept positions in the stream, other tokens included; None: all
    base: torch.Tensor | None  # what skipped tokens come back as (None after the forward ends)
    batch: int
    length: int  # L, full stream length
    kept_length: int  # L - N + K
    num_tokens: int  # N routable (image) tokens
    layout: TokenLayout | None = None

    @property
    def identity(self) -> bool:
        return self.index is None

    def mask(self) -> torch.Tensor:
        """(B, N), True where the token skipped the route."""
        mask = torch.ones(self.batch, self.num_tokens, dtype=torch.bool, device=self.keep.device)
        return mask.scatter(1, self.keep, False)

    def released(self) -> "DropRun":
        """What outlives the forward: the draw, not the route-start tensors (they would pin activations
        and make a deep copy of the model, an EMA twin, impossible while they hold the autograd graph)."""
        return DropRun(self.keep.detach(), None, None, self.batch, self.length, self.kept_length, self.num_tokens,
                       self.layout)


def is_token_aligned(value: Any, batch: int, length: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == length \
        and value.shape[0] in (batch, 1)


def token_axes(value: torch.Tensor, run: DropRun) -> tuple[int, ...]:
    """The axes of a value entering a route that run along the stream's tokens, read from its shape. Axis 1, as
    for the stream (a skip (B, L, D), a mask (B, L)); for an attention mask (bool, or 4-D), also its query and
    key axes, the last two ((B, 1, 1, L), (B, H, L, L), (B, L, L) bool), and, where the blocks join other tokens
    to the stream's in their attention (``joint``), the axes longer than the stream that span that joined
    sequence. Refuses a float (B, L, L), where the shape cannot tell a square mask from hidden states as wide
    as the sequence is long."""
    if value.dim() < 2 or value.shape[0] not in (run.batch, 1):
        return ()
    length, last = run.length, value.dim() - 1
    joint = run.layout is not None and run.layout.joint is not None
    if value.dtype == torch.bool or value.dim() >= 4:
        return tuple(a for a in sorted({1, last - 1, last}) if a >= 1 and
                     (value.shape[a] == length or joint and value.shape[a] > length))
    if value.dim() == 3 and value.shape[1] == length == value.shape[2]:
        raise RouteError(
            f"a {value.dtype} tensor of shape {tuple(value.shape)} enters the route: a square attention mask or "
            f"hidden states {length} wide? tokenroute cannot tell which axes to reduce. Declare the block argument "
            "it feeds with tokenroute.register_block(cls, tokenroute.BlockSpec(stream, token_args=(name,))) if only "
            "axis 1 runs along the tokens, or pass the mask as bool")
    return (1,) if value.shape[1] == length else ()


def table_axis(table: torch.Tensor, batch: int, length: int, joint: str | None = None) -> tuple[int, bool] | None:
    """Where a token table (a rotary embedding) holds its rows for the stream's ``length`` tokens: ``(axis,
    True)`` for a table with a batch axis of ``batch`` or 1 and one token axis ((B, N, D), (1, N, 1, D),
    (B, 1, N, D)), or, where the blocks join other tokens to the stream's (``joint``), axis 1 longer than the
    stream; ``(0, False)`` for a batch-free table (S, ...) whose rows beyond the stream's are the other
    tokens' (text rows in joint attention, never routed; first unless ``joint`` says last); None for a table of
    other tokens (a text table), which passes."""
    if table.dim() >= 2 and table.shape[0] in (batch, 1):
        axes = [a for a in range(1, table.dim()) if table.shape[a] == length]
        if len(axes) == 1:
            return axes[0], True
        if len(axes) > 1:
            raise RouteError(f"a token table of shape {tuple(table.shape)} has several axes of the stream's {length} "
                             "tokens; tokenroute cannot tell which to reduce")
        if joint is not None and table.shape[1] > length:
            return 1, True
    if table.dim() >= 1 and table.shape[0] >= length:
        return 0, False
    return None


def check_table_group(leaves: list[Any], batch: int, length: int) -> None:
    """The tables one block argument takes together must be told apart: several that could hold the stream's
    rows are fine when they share a shape ((cos, sin) pairs), refused when they do not (an image table and a
    text table with at least as many rows)."""
    tables = [t for t in leaves if isinstance(t, torch.Tensor)]
    aligned = [t for t in tables if table_axis(t, batch, length) is not None]
    if len({tuple(t.shape) for t in aligned}) > 1:
        raise RouteError(
            f"a group of token tables {[tuple(t.shape) for t in tables]} enters the route and {len(aligned)} of them, "
            f"of different shapes, could hold rows for the stream's {length} tokens (an image and a text table?); "
            "tokenroute cannot tell which follows the routed tokens. Register the block with that argument in "
            "context_args and keep the route off the blocks that take it")


def is_row_table(value: Any, batch: int, length: int) -> bool:
    """A batch-free tensor with one row per token on axis 0 ((L, ...), a rotary table handed over in an
    argument not named as one): read from its shape where the token count cannot be the batch."""
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == length \
        and length not in (batch, 1)


def needs_shared_selection(values: Any, roles: list[str], batch: int, length: int) -> bool:
    """A batch-free table crosses the boundary: one selection must then serve the whole batch."""
    leaves = [(t, role) for v, role in zip(values, roles) if role in ("table", "auto") for t in tree_leaves(v)
              if isinstance(t, torch.Tensor)]
    return any(table_axis(t, batch, length) == (0, False) if role == "table" else is_row_table(t, batch, length)
               for t, role in leaves)


def check_layout(route: Route, stream: torch.Tensor, layout: TokenLayout) -> None:
    """A route begins on a stream as long as the layout it was read for."""
    if layout.length != stream.shape[1]:
        raise RouteError(f"route {route.start}..{route.end}: the stream has {stream.shape[1]} tokens but its layout "
                         f"was read for {layout.length}")


class TokenOperation:
    """Base class of what a route does at its boundaries. Subclasses define ``begin``, ``enter``, ``exit``
    and ``describe``; a run is whatever ``begin`` returns, handed back to ``enter`` and ``exit``."""

    def begin(self, route: Route, stream: torch.Tensor, *, layout: TokenLayout, ratio: float, shared: bool) -> Any:
        """Start a run on ``stream``, whose image tokens ``layout`` places (the others pass untouched)."""
        raise NotImplementedError

    def enter(self, run: Any, value: Any, role: str) -> Any:
        raise NotImplementedError

    def exit(self, run: Any, value: Any) -> Any:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def mask(self, run: Any) -> torch.Tensor | None:
        """(B, N) bool, True where a token was left out of the route; None when the operation drops none."""
        return None

    def release(self, run: Any) -> Any:
        """What of ``run`` outlives the forward (for ``mask``): nothing that pins the forward's activations."""
        return run

    def reduction(self, run: Any) -> str | None:
        """What the route's blocks run on in this ``run`` ('8 of 16 tokens'), for errors; None: the stream as is."""
        return None

    def span(self, route: Route) -> str:
        """The route as explain names it."""
        return str(route)

    def inner_tokens(self, run: Any, layout: TokenLayout) -> StreamTokens:
        """The tokens the route's blocks run on, given the full stream's ``layout``: for methods that read where
        they sit (local attention). Default: a subset of the stream's tokens, at ``run.index`` (None: all)."""
        return StreamTokens(layout, getattr(run, "index", None))


class DropTokens(TokenOperation):
    """Run the route on a subset of the tokens, chosen per sample; what the others return as is ``returns``.

    Drawing uses this operation's own generator, so each method's masks are reproducible on their own,
    and a route that drops nothing (ratio 0, or routing off) never touches it.
    """

    def __init__(self, generator: RoutingGenerator, protect: Any = None):
        self.generator = generator
        self.protect = protect

    def returns(self, base: torch.Tensor) -> torch.Tensor:
        """What the skipped tokens come back as, given the stream at the route's start."""
        raise NotImplementedError

    def begin(self, route: Route, stream: torch.Tensor, *, layout: TokenLayout, ratio: float,
              shared: bool) -> DropRun:
        if stream.dim() < 2:
            raise RouteError(f"route {route.start}..{route.end}: the token stream has shape {tuple(stream.shape)}; "
                             "expected (B, L, ...)")
        batch, length = stream.shape[0], stream.shape[1]
        check_layout(route, stream, layout)
        num_tokens = layout.image
        if num_tokens <= 0:
            raise RouteError(f"route {route.start}..{route.end}: {length} tokens with {layout.lead} prefix tokens "
                             f"leave none to route ({layout.describe()})")
        num_keep = num_tokens - route.num_skip(num_tokens, ratio)
        if num_keep == num_tokens:  # nothing dropped: no draw, no gather, the route runs on the stream as is
            keep = torch.arange(num_tokens, device=stream.device).expand(batch, -1)
            return DropRun(keep, None, None, batch, length, length, num_tokens, layout)
        routable = stream[:, layout.image_slice] if num_tokens != length else stream
        protect = self.protect(routable) if callable(self.protect) else self.protect
        if protect is not None:
            protect = check_protect(protect, batch, num_tokens, num_keep)
        keep = draw_keep(routable, num_keep, self.generator, shared=shared, protect=protect,
                         selector=route.selector)
        index = with_context(keep, layout.lead, layout.image, length)
        return DropRun(keep, index, self.returns(stream), batch, length, length - num_tokens + num_keep, num_tokens,
                       layout)

    def enter(self, run: DropRun, value: Any, role: str) -> Any:
        """The part of ``value`` that enters the route, by role ('tokens', 'table', 'modulation', 'auto', 'pass')."""
        if role == "pass" or value is None or run.identity:
            return value
        layout = run.layout if run.layout is not None else TokenLayout(run.length, 0, run.length)
        if role == "table":
            def gather(t: Any) -> Any:
                found = table_axis(t, run.batch, run.length, layout.joint) if isinstance(t, torch.Tensor) else None
                if found is None:
                    return t
                axis, batched = found
                if batched:
                    return gather_axes(t, layout.positions(run.index, t.shape[axis]), (axis,))
                rows = layout if layout.joint else dataclasses.replace(layout, joint="text_first")  # as Flux's
                return t.index_select(0, rows.positions(run.index[:1], t.shape[0])[0])

            check_table_group(tree_leaves(value), run.batch, run.length)
            return tree_map(gather, value)
        if role == "tokens" and isinstance(value, torch.Tensor) and not is_token_aligned(value, run.batch, run.length):
            raise RouteError(
                f"a token-aligned argument has shape {tuple(value.shape)} but the stream has {run.length} tokens "
                f"in a batch of {run.batch}; register the block's arguments with tokenroute.register_block")
        if role in ("tokens", "modulation"):
            return tree_map(lambda t: gather_tokens(t, run.index) if is_token_aligned(t, run.batch, run.length) else t,
                            value)
        def gather_mask(t: torch.Tensor) -> torch.Tensor:
            if is_row_table(t, run.batch, run.length):
                return t.index_select(0, run.index[0])
            for axis in token_axes(t, run):
                t = gather_axes(t, layout.positions(run.index, t.shape[axis]), (axis,))
            return t

        return tree_map(lambda t: gather_mask(t) if isinstance(t, torch.Tensor) else t, value)

    def exit(self, run: DropRun, value: Any) -> Any:
        """``value`` leaving the route: kept-length token tensors return to full length around the base."""
        if run.identity:
            return value

        def back(t: Any) -> Any:
            if not (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[0] == run.batch):
                return t
            if t.shape[1] != run.kept_length:
                if t.dim() == run.base.dim() and t.shape[2:] == run.base.shape[2:]:
                    raise RouteError(
                        f"a tensor of shape {tuple(t.shape)} leaves the route with the stream's layout but "
                        f"{t.shape[1]} tokens, where the route kept {run.kept_length} of {run.length}: the stream's "
                        "length changed inside the route (tokens joined or split off, e.g. text joined between two "
                        "stacks). End the route before the change, or start it after")
                return t
            if t.shape[2:] != run.base.shape[2:]:
                raise RouteError(
                    f"a tensor of shape {tuple(t.shape)} leaves the route but the stream at the route's start had "
                    f"shape {tuple(run.base.shape)}; skipped tokens cannot be restored into it")
            return scatter_tokens(run.base, run.index, t)

        return tree_map(back, value)

    def mask(self, run: DropRun) -> torch.Tensor:
        return run.mask()

    def release(self, run: DropRun) -> DropRun:
        return run.released()

    def reduction(self, run: DropRun) -> str | None:
        return None if run.identity else f"{run.kept_length} of {run.length} tokens"


class SkipTokens(DropTokens):
    """TREAD: skipped tokens wait outside the route and come back with their route-start values."""

    def returns(self, base: torch.Tensor) -> torch.Tensor:
        return base

    def describe(self) -> str:
        return "skipped tokens come back with their route-start values"


class MaskTokens(DropTokens):
    """MaskDiT: dropped tokens come back as ``fill(stream)`` (a learnable mask token)."""

    def __init__(self, generator: RoutingGenerator, fill: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(generator)
        self.fill = fill

    def returns(self, base: torch.Tensor) -> torch.Tensor:
        return self.fill(base)

    def describe(self) -> str:
        return "skipped tokens come back as the mask token"


class OrderTokens(DropTokens):
    """The route's blocks run on every token, the image tokens in another order, the same for every sample and
    every forward (local attention's tile order, so that each attention kernel block holds a patch of the grid
    and no attention reorders on its own); at the exit the stream returns to its own order. A reordering is the
    draw that keeps every token: tables, masks and skips follow it as they follow a TREAD route.

    ``order(layout, device)`` gives the image tokens' order (N,), or None where the blocks run on the stream as
    it is (a backend that does not gain from it); ``name`` names the order (what is cached under it)."""

    def __init__(self, order: Callable[[TokenLayout, torch.device], torch.Tensor | None], name: str):
        super().__init__(generator=None)
        self.order, self.name = order, name

    def begin(self, route: Route, stream: torch.Tensor, *, layout: TokenLayout, ratio: float,
              shared: bool) -> DropRun:
        batch, length = stream.shape[0], stream.shape[1]
        check_layout(route, stream, layout)
        order = self.order(layout, stream.device)
        keep = torch.arange(layout.image, device=stream.device) if order is None else order
        keep = keep.expand(batch, -1)
        if order is None:
            return DropRun(keep, None, None, batch, length, length, layout.image, layout)
        index = with_context(keep, layout.lead, layout.image, length)
        return DropRun(keep, index, stream, batch, length, length, layout.image, layout)

    def inner_tokens(self, run: DropRun, layout: TokenLayout) -> StreamTokens:
        return StreamTokens(layout) if run.identity else StreamTokens(layout, run.index[:1], self.name)

    def mask(self, run: DropRun) -> None:
        return None  # every token runs the blocks

    def reduction(self, run: DropRun) -> str | None:
        return None  # the whole stream, in another order: what a block computes per token is unchanged

    def describe(self) -> str:
        return f"every token, the image tokens in {self.name}; the stream's own order back at the exit"

    def span(self, route: Route) -> str:
        return f"blocks {route.start}..{route.end}, reordered (no token skips)"


@dataclass
class PoolRun:
    """One pooled route in one forward: the stream as it entered, its pooled image grid, and the factor."""

    base: torch.Tensor  # (B, L, D) the stream at the route's start
    pooled: torch.Tensor | None  # (B, L', D) the stream with its image grid pooled; None: factor 1
    layout: TokenLayout
    factor: int

    @property
    def identity(self) -> bool:
        return self.pooled is None


class PoolTokens(TokenOperation):
    """Token density (FlexDiT): the route's blocks run on the image grid average-pooled by ``factor()`` (chosen per
    forward, a temporal schedule), the other tokens as they are; at the exit the dense stream is the one that
    entered plus the change the blocks made to the pooled tokens, upsampled (nearest). A route whose blocks change
    nothing gives back the stream exactly, whatever the factor; factor 1 runs the route on the stream as is."""

    def __init__(self, factor: Callable[[], int],
                 merge: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 recover: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        """``merge(pooled, dense)``: the pooled image tokens the route starts from (default: the average pool);
        ``recover(dense, change, sparse)``: the dense image tokens at the exit from the ones that entered, the
        route's change upsampled, and the pooled tokens that left the route (default: dense + change)."""
        self.factor, self.merge, self.recover = factor, merge, recover

    def begin(self, route: Route, stream: torch.Tensor, *, layout: TokenLayout, ratio: float, shared: bool) -> PoolRun:
        factor = int(self.factor())
        grid = layout.grid
        if grid is None or len(grid) != 2:
            raise RouteError(f"route {route.start}..{route.end}: pooling needs the image tokens' 2D grid, and the "
                             f"layout has {'none' if grid is None else 'x'.join(map(str, grid))} ({layout.describe()})")
        if factor < 1 or grid[0] % factor or grid[1] % factor:
            raise RouteError(f"route {route.start}..{route.end}: a pooling factor of {factor} does not divide the "
                             f"{grid[0]}x{grid[1]} grid; choose a factor that divides both sides")
        check_layout(route, stream, layout)
        run = PoolRun(stream, None, layout, factor)
        if factor > 1:
            run.pooled = self._pool(run, stream)
            if self.merge is not None:
                image = slice(layout.lead, run.pooled.shape[1] - layout.trail)
                merged = self.merge(run.pooled[:, image], stream[:, layout.image_slice])
                run.pooled = torch.cat([run.pooled[:, : layout.lead], merged, run.pooled[:, image.stop:]], dim=1)
        return run

    def _pool(self, run: PoolRun, t: torch.Tensor) -> torch.Tensor:
        layout, f = run.layout, run.factor
        (h, w), b = layout.grid, t.shape[0]
        image = t[:, layout.image_slice].reshape(b, h // f, f, w // f, f, *t.shape[2:])
        pooled = image.mean(dim=(2, 4)).reshape(b, (h // f) * (w // f), *t.shape[2:])
        return torch.cat([t[:, : layout.lead], pooled, t[:, layout.lead + layout.image:]], dim=1)

    def _upsample(self, run: PoolRun, t: torch.Tensor) -> torch.Tensor:
        layout, f = run.layout, run.factor
        (h, w), b = layout.grid, t.shape[0]
        grid = t.reshape(b, h // f, 1, w // f, 1, *t.shape[2:])
        return grid.expand(b, h // f, f, w // f, f, *t.shape[2:]).reshape(b, h * w, *t.shape[2:])

    def enter(self, run: PoolRun, value: Any, role: str) -> Any:
        if role == "pass" or value is None or run.identity:
            return value
        if value is run.base:
            return run.pooled
        length, batch = run.layout.length, run.base.shape[0]

        def pool(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            if is_token_aligned(t, batch, length) and t.shape[0] == batch and role in ("tokens", "modulation"):
                return self._pool(run, t)
            if role in ("table", "auto") and (t.shape[0] >= length or (t.dim() >= 2 and length in t.shape[1:])):
                raise RouteError(
                    f"a tensor of shape {tuple(t.shape)} ({role}) enters a pooled route over a stream of {length} "
                    "tokens: a per-token table or mask has no pooled counterpart yet; end the route before the "
                    "blocks that take it")
            return t

        return tree_map(pool, value)

    def exit(self, run: PoolRun, value: Any) -> Any:
        if run.identity:
            return value
        layout, pooled_length = run.layout, run.pooled.shape[1]

        def back(t: Any) -> Any:
            if not (isinstance(t, torch.Tensor) and t.shape[:1] == run.base.shape[:1] and t.dim() == run.base.dim()
                    and t.shape[1] == pooled_length and t.shape[2:] == run.base.shape[2:]):
                return t
            image = slice(layout.lead, pooled_length - layout.trail)
            change = self._upsample(run, t[:, image] - run.pooled[:, image])
            entered = run.base[:, layout.image_slice]
            dense = entered + change if self.recover is None else self.recover(entered, change, t[:, image])
            return torch.cat([t[:, : layout.lead], dense, t[:, image.stop:]], dim=1)

        return tree_map(back, value)

    def inner_tokens(self, run: PoolRun, layout: TokenLayout) -> StreamTokens:
        """The pooled stream: the same leading and trailing tokens around the coarser grid."""
        if run.identity:
            return StreamTokens(layout)
        (h, w), f = layout.grid, run.factor
        pooled = (h // f) * (w // f)
        return StreamTokens(TokenLayout(layout.length - layout.image + pooled, layout.lead, pooled, (h // f, w // f),
                                        {"grid": f"pooled {f}x{f} from {h}x{w}"}, layout.joint))

    def release(self, run: PoolRun) -> PoolRun:
        return PoolRun(run.base[:0], None, run.layout, run.factor)

    def reduction(self, run: PoolRun) -> str | None:
        return None if run.identity else \
            f"{run.pooled.shape[1]} of {run.layout.length} tokens (the grid pooled {run.factor}x{run.factor})"

    def describe(self) -> str:
        return "the image grid pooled, the blocks' change upsampled back onto the dense stream"

    def span(self, route: Route) -> str:
        return f"blocks {route.start}..{route.end}, pooled (no token skips)"
