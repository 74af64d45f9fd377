"""Token density (FlexDiT, arXiv 2412.06028): spans of blocks run on the image grid pooled to a coarser grid, at a
density that follows the noise level: coarser at noisy steps, denser near the data.

    apply_token_density(model, TokenDensityConfig(routes=[(2, 5)], factor=[(700, 4), (300, 2), (0, 1)]))
    remove_token_density(model)

Each route is a pooled route (``tokenroute.core.PoolTokens``): at its entry the image grid is average-pooled by
the factor and a merge layer lets each pooled token cross-attend to the dense tokens; the route's blocks run on the
pooled tokens (text and prefix tokens as they are); at its exit the dense stream is the one that entered plus the
route's change, upsampled, refined by a cross-attention from the dense tokens to the pooled ones. Both
cross-attentions start contributing nothing, so the converted model starts as the plain pooled route, and a factor
of 1 is the original model exactly. ``init="flexdit"`` starts as FlexDiT's code does instead: the exit keeps only
the dense tokens that entered (the route's change is dropped until the refine layer learns it) and the
cross-attentions have their default initialisation.

The factor is fixed, or a schedule of the timestep the model receives (its ``timestep`` or ``t`` argument, found
by name or declared): a table ``[(from_timestep, factor), ...]`` (each factor from its timestep up, the highest
first) or a function. A batch whose samples are at different timesteps runs at the densest factor any of them asks
for. Eval forwards pool too: this is a sampling-time method, fine-tuned for.

Optionally, ``pooling_attention`` blocks (FlexDiT's bottom blocks) attend to keys and values pooled by a factor:
the attention of every query is over the coarse grid (and the text tokens), O(N x N / f^2) instead of O(N^2);
pooled to one token it is FlexDiT's pooling attention, the mean of the values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.attention import PooledKeys
from ..core.context import ForwardArgument
from ..core.operations import PoolTokens
from ..core.patches import Patch, PatchRegistry, registry_of, remove_patch
from ..core.plan import Segment
from ..core.route import RouteError, normalize_routes
from ..core.stack import BlockStack

NAME = "token_density"
MODULE_NAME = "token_density"

Factor = int | Sequence[tuple[float, int]] | Callable[[float], int]


@dataclass(kw_only=True)
class TokenDensityConfig:
    """routes: ``(start, end)`` spans of blocks (inclusive; negative counts from the end) run pooled, or
    ``(start, end, factor)`` with a factor of their own; factor: the pooling factor (each side of the grid) of
    every route without one: an int, a table ``[(from_timestep, factor), ...]`` or a function of the timestep;
    timestep_range: the timesteps the model is called with (a schedule outside it is refused; 0..1000 as DiT,
    SD3 and Wan pipelines pass them; Flux's passes timestep / 1000: declare (0, 1) there); timestep_arg:
    the forward's argument carrying the timestep (default: found by name); merge, refine: the cross-attention
    layers at the entry and exit; heads: theirs (default: the most that keep 64 channels or more per head); init: "identity" (start as the plain
    pooled route) or "flexdit"; pooling_attention: ``{block: factor}``, blocks whose attention sees keys and values
    pooled by the factor; stack: the block container(s) where not found automatically."""

    routes: Sequence[Any]
    factor: Factor = 2
    timestep_range: tuple[float, float] = (0.0, 1000.0)
    timestep_arg: str | None = None
    merge: bool = True
    refine: bool = True
    heads: int | None = None
    init: str = "identity"
    pooling_attention: dict[int, int] | None = None
    stack: str | list[str] | None = None


class Schedule:
    """A pooling factor as a function of the timestep: fixed, a table, or a function; checked against the range."""

    def __init__(self, factor: Factor, timestep_range: tuple[float, float], where: str):
        self.where, self.low, self.high = where, *timestep_range
        if self.low >= self.high:
            raise RouteError(f"timestep_range={timestep_range}: give (lowest, highest) with lowest < highest")
        self.fixed = factor if isinstance(factor, int) and not isinstance(factor, bool) else None
        self.table: list[tuple[float, int]] | None = None
        self.function: Callable[[float], int] | None = None
        if self.fixed is not None:
            self._check_factor(self.fixed)
        elif callable(factor):
            self.function = factor
        elif isinstance(factor, Sequence) and factor and all(isinstance(e, (tuple, list)) and len(e) == 2 for e in factor):
            self.table = sorted(((float(t), int(f)) for t, f in factor), reverse=True)
            for t, f in self.table:
                if not self.low <= t <= self.high:
                    raise RouteError(f"{where}: the schedule's timestep {t:g} is outside the noise range "
                                     f"[{self.low:g}, {self.high:g}]; give timesteps inside it, or declare "
                                     "TokenDensityConfig(timestep_range=(lowest, highest))")
                self._check_factor(f)
            if self.table[-1][0] > self.low:
                raise RouteError(f"{where}: the schedule starts at timestep {self.table[-1][0]:g}, above the range's "
                                 f"lowest {self.low:g}: timesteps below it would have no factor; add ({self.low:g}, "
                                 "factor)")
        else:
            raise RouteError(f"{where}: factor={factor!r} is neither an int, a table [(from_timestep, factor), ...] nor "
                             "a function of the timestep")

    def _check_factor(self, factor: Any) -> int:
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise RouteError(f"{self.where}: pooling factor {factor!r} must be an int >= 1 (1: the dense grid)")
        return factor

    @property
    def needs_timestep(self) -> bool:
        return self.fixed is None

    def __call__(self, timestep: float) -> int:
        if self.fixed is not None:
            return self.fixed
        if not self.low <= timestep <= self.high:
            raise RouteError(f"{self.where}: the model was called at timestep {timestep:g}, outside the schedule's "
                             f"range [{self.low:g}, {self.high:g}]; declare TokenDensityConfig(timestep_range=...)")
        if self.table is not None:
            return next(f for t, f in self.table if timestep >= t)
        return self._check_factor(self.function(timestep))


class TokenCrossAttention(nn.Module):
    """``queries + out(attention(norm(queries), norm(context)))``: queries attend to a context of tokens of the same
    width. ``out`` starts at zero (``zero_init``), so the layer starts as the identity on its queries."""

    def __init__(self, dim: int, heads: int, zero_init: bool = True):
        super().__init__()
        if dim % heads:
            raise RouteError(f"token density's cross-attention: {heads} heads do not divide the width {dim}; give "
                             "TokenDensityConfig(heads=...) that divides it")
        self.heads = heads
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        if zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = queries.shape
        h = self.heads
        q = self.q(self.norm_q(queries)).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(self.norm_kv(context)).view(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return queries + self.out(attended)


class PooledRouteLayers(nn.Module):
    """The learnable layers of one pooled route: ``merge`` at its entry, ``refine`` at its exit (either may be
    absent), and how the exit recovers the dense tokens (``keep_change``: entered + change, else entered)."""

    def __init__(self, dim: int, heads: int, merge: bool, refine: bool, zero_init: bool, keep_change: bool):
        super().__init__()
        self.merge = TokenCrossAttention(dim, heads, zero_init) if merge else None
        self.refine = TokenCrossAttention(dim, heads, zero_init) if refine else None
        self.keep_change = keep_change

    def recovered(self, entered: torch.Tensor, change: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        dense = entered + change if self.keep_change else entered
        return dense if self.refine is None else self.refine(dense, sparse)


class TokenDensityPatch(Patch):
    """Pooled routes whose factor a schedule picks per forward from the timestep the model receives."""

    name = NAME
    order = 30
    title = "token density"

    def __init__(self, config: TokenDensityConfig, stack: BlockStack):
        super().__init__()
        if config.init not in ("identity", "flexdit"):
            raise RouteError(f"TokenDensityConfig.init={config.init!r} is not 'identity' or 'flexdit'")
        depth, dim = len(stack), stack.width()
        heads = config.heads or max(h for h in range(1, max(1, dim // 64) + 1) if dim % h == 0)  # heads of >= 64
        spans, schedules = [], []
        for entry in config.routes:
            if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
                raise RouteError(f"token density route {entry!r}: give (start, end) or (start, end, factor)")
            where = f"token density route {entry[0]}..{entry[1]}"
            spans.append((entry[0], entry[1], 0.0))
            schedules.append(Schedule(entry[2] if len(entry) == 3 else config.factor, config.timestep_range, where))
        if not spans and not config.pooling_attention:
            raise RouteError("token density needs routes=[(start, end), ...] to pool, or pooling_attention={block: d}")
        routes = normalize_routes(spans, depth) if spans else []
        self.schedules = schedules
        self.timestep = ForwardArgument(stack.owner, config.timestep_arg) \
            if any(s.needs_timestep for s in schedules) else None
        self.layers = nn.ModuleList(
            PooledRouteLayers(dim, heads, config.merge, config.refine, zero_init=config.init == "identity",
                              keep_change=config.init == "identity") for _ in routes)
        self.modules = {MODULE_NAME: self.layers}
        self.segments = [
            Segment(route, PoolTokens(lambda i=i: self.factor(i),
                                      merge=layers.merge,
                                      recover=layers.recovered), NAME, needed_in_eval=True)
            for i, (route, layers) in enumerate(zip(routes, self.layers))]
        self.pooling_attention = PooledKeys(config.pooling_attention, stack, NAME) if config.pooling_attention \
            else None
        if self.pooling_attention is not None:
            self.taps = list(self.pooling_attention.taps)
        self.config, self.last_factors = config, [None] * len(routes)

    def factor(self, route: int) -> int:
        """This forward's factor for a route: the densest any sample's timestep asks for."""
        schedule = self.schedules[route]
        if not schedule.needs_timestep:
            factor = schedule(0.0)
        else:
            factor = min(schedule(t) for t in self.timestep.values())
        self.last_factors[route] = factor
        return factor

    def attach(self, stack: BlockStack) -> None:
        if self.timestep is not None:
            self.timestep.attach()
        if self.pooling_attention is not None:
            self.pooling_attention.attach(stack, self.registry)

    def detach(self, stack: BlockStack) -> None:
        if self.timestep is not None:
            self.timestep.detach()
        if self.pooling_attention is not None:
            self.pooling_attention.detach()

    def describe(self, stack: BlockStack) -> list[str]:
        count = sum(p.numel() for p in self.layers.parameters())
        lines = [f"  token density adds {stack.owner_path or '<model>'}.{MODULE_NAME}: {count:,} parameters "
                 f"(merge {self.config.merge}, refine {self.config.refine}, init {self.config.init})"]
        for segment, schedule in zip(self.segments, self.schedules):
            rule = f"factor {schedule.fixed}" if schedule.fixed is not None else \
                f"factor by timestep {schedule.table}" if schedule.table else "factor by a function of the timestep"
            lines.append(f"  blocks {segment.route.start}..{segment.route.end} pooled: {rule}"
                         + (f" (timestep from argument {self.timestep.name!r})" if schedule.needs_timestep else ""))
        if self.pooling_attention is not None:
            lines.append(f"  pooling attention in blocks {dict(self.pooling_attention.factors)}")
        return lines


def apply_token_density(model: nn.Module, config: TokenDensityConfig) -> nn.Module:
    """Token density on ``model``'s block stack, in place; returns the model."""
    registry = PatchRegistry.for_model(model, config.stack)
    registry.apply(TokenDensityPatch(config, registry.stack))
    return model


def remove_token_density(model: nn.Module) -> nn.Module:
    """Take token density off ``model`` (its merge and refine layers go with it); other methods stay."""
    remove_patch(model, NAME)
    return model


def token_density_factors(model: nn.Module) -> list[int | None]:
    """The factor each pooled route ran at in the model's last forward (None: not run yet)."""
    return list(registry_of(model).get(NAME).last_factors)

