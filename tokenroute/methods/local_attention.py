"""Local attention (CLEAR, arXiv 2412.16112): each image query attends only to the image keys within a radius on
the token grid (``dy^2 + dx^2 < r^2``, in tokens); text, class and other non-image tokens stay global both ways.
Optionally, every image query also sees the image keys and values pooled d x d with learnable weights.

    apply_local_attention(model, LocalAttentionConfig(radius=8))
    ...                                   # forwards run local attention in the blocks' attention branches
    remove_local_attention(model)

Where the image tokens sit, and their grid, come from the token layout read from the model's graph at each
block (a tap, ``Boundaries.tokens_at``), so joint attention ([text, image] or [image, text]) and routed
sequences (after TREAD routing, each kept token keeps its grid place) need nothing declared. The attention is
replaced where the model computes it: the attention branch's call of ``scaled_dot_product_attention`` (diffusers'
processors, their ``dispatch_attention_fn`` native backend, timm's ``Attention``, the project's models) runs
locally instead. An attention branch that computes attention otherwise is refused with the way to make it call
``scaled_dot_product_attention``. For FlexAttention the stack runs its image tokens in tile order from the first
block of each run of local blocks to the last (a route of this method's own, ``OrderTokens``, that gives way to
other methods' routes), so that the attentions inside need no reordering of their own.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.attention import AttentionBranches
from ..core.layout import StreamTokens, TokenLayout
from ..core.locality import (KERNEL_TILE, LocalMasks, in_tile_order, local_attention, pool_grid, tile_sorted,
                             uses_flex)
from ..core.operations import OrderTokens
from ..core.patches import Patch, PatchRegistry, registry_of, remove_patch
from ..core.plan import Segment
from ..core.route import Route, RouteError
from ..core.splice.tracer import tracing
from ..core.stack import BlockStack

NAME = "local_attention"


@dataclass(kw_only=True)
class LocalAttentionConfig:
    """radius: in tokens, a pair attends iff dy^2 + dx^2 < radius^2 (>= 1); tile and radius_tiles: the
    tile-aligned variant instead (windows of whole tiles, no kernel block partly masked; radius_tiles may be a pair,
    (up-down, left-right): 8 x 16 tiles, one FlexAttention block each, with (2, 1) make a 40 x 48 window); pooled: d, to add the
    image keys and values pooled d x d (learnable weights, initialised to 1/d^2) for image queries; blocks:
    positions in the stack to apply it to (default: every block with a known attention branch); grid: (H, W) or
    (F, H, W) of the image tokens where the graph does not show it (Flux packs its latents with a linear layer),
    checked against the graph where it does; backend: "auto"
    (FlexAttention on CUDA, SDPA with the dense mask elsewhere), "flex" or "sdpa"; reorder: where FlexAttention's
    sequence is put in tile order (each kernel block a patch of the grid): "stack", once where a run of local
    blocks starts and back where it ends (inside another method's route, around each attention), or "attention"."""

    radius: float | None = 8.0
    tile: tuple[int, int] | None = None
    radius_tiles: int | tuple[int, int] | None = None
    pooled: int | None = None
    blocks: list[int] | None = None
    grid: tuple[int, ...] | None = None  # the image tokens' grid, where the graph cannot show it (packed latents)
    frame_radius: int | None = None  # video: the frames a window spans each way (None: every frame)
    backend: str = "auto"
    reorder: str = "stack"  # FlexAttention's tile order: "stack" (once around runs of local blocks) or "attention"
    stack: str | list[str] | None = None  # the block container(s) when the stack is not found automatically

    def check(self) -> None:
        if self.tile is None and (self.radius is None or self.radius < 1):
            raise RouteError(f"LocalAttentionConfig.radius={self.radius}: a radius below 1 token lets an image query "
                             "see no image key; give radius >= 1 (CLEAR uses 8, 16, 32)")
        reach = (self.radius_tiles,) if self.radius_tiles is None or isinstance(self.radius_tiles, int) \
            else tuple(self.radius_tiles)
        if self.tile is not None and (len(reach) not in (1, 2) or any(r is None or r < 0 for r in reach)):
            raise RouteError("LocalAttentionConfig.tile needs radius_tiles >= 0 (how many tiles each way a query "
                             "sees), or a pair (up-down, left-right)")
        if self.pooled is not None and self.pooled < 2:
            raise RouteError(f"LocalAttentionConfig.pooled={self.pooled}: pooling needs a window of d >= 2 tokens")
        if self.frame_radius is not None and self.frame_radius < 0:
            raise RouteError(f"LocalAttentionConfig.frame_radius={self.frame_radius} must be >= 0 (None: every frame)")
        if self.backend not in ("auto", "flex", "sdpa"):
            raise RouteError(f"LocalAttentionConfig.backend={self.backend!r} is not one of 'auto', 'flex', 'sdpa'")
        if self.reorder not in ("stack", "attention"):
            raise RouteError(f"LocalAttentionConfig.reorder={self.reorder!r} is not one of 'stack' (order the tokens "
                             "tile by tile once around the local blocks) or 'attention' (around each attention)")


class LocalAttentionPatch(Patch):
    """Taps the chosen blocks (their stream layout) and runs their attention branch's
    ``scaled_dot_product_attention`` call locally (``tokenroute.core.attention``)."""

    name = NAME
    order = 40
    title = "local attention"

    def __init__(self, config: LocalAttentionConfig, stack: BlockStack):
        super().__init__()
        config.check()
        self.config = config
        self.attention = AttentionBranches(stack, config.blocks, NAME, self.title, config.grid)
        self.branches = self.attention.paths
        self.taps = self.attention.taps
        self.masks = LocalMasks()
        if config.reorder == "stack":  # a run of same-class local blocks runs in tile order, where no route spans it
            order = OrderTokens(self._stack_order, "tile order " + "x".join(map(str, config.tile or KERNEL_TILE)))
            self.segments = [Segment(Route(a, b, 0.0), order, NAME, needed_in_eval=True, optional=True)
                             for a, b in _runs(stack, sorted(self.branches))]
        self.teacher: tuple[list[nn.Parameter], list[torch.Tensor]] | None = None  # see distillation_parameters
        if config.pooled:
            d = config.pooled
            self.modules = {"local_attention_pool": nn.ParameterDict(
                {str(p): nn.Parameter(torch.full((d * d,), 1.0 / (d * d))) for p in self.branches})}

    @property
    def enabled(self) -> bool:
        return self.attention.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:  # off: the blocks attend densely (the distillation teacher)
        self.attention.enabled = value

    def attach(self, stack: BlockStack) -> None:
        self.attention.attach(stack, self.registry, self._local)

    def detach(self, stack: BlockStack) -> None:
        self.attention.detach()

    def _stack_order(self, layout: TokenLayout, device: torch.device) -> torch.Tensor | None:
        """The image tokens' tile order (N,) for a run of local blocks; None where FlexAttention does not run (the
        dense-mask path gains nothing) or the grid is unknown (each attention then refuses on its own)."""
        grid = layout.grid or self.config.grid
        if not uses_flex(self.config.backend, device) or grid is None or math.prod(grid) != layout.image:
            return None
        tile = self.config.tile or KERNEL_TILE

        def order() -> torch.Tensor | None:  # None where row-major is tile order already (tiles as wide as the grid)
            coords = _coords(torch.arange(layout.image, device=device), tuple(grid))
            return None if in_tile_order(coords, tile) else tile_sorted(coords, tile)

        return self.masks.cached(self.masks.orders, ("stack", tuple(grid), tile, str(device)), order)

    def _local(self, position: int, tokens: StreamTokens, grid: tuple[int, ...], query: torch.Tensor,
               key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None, dropout_p: float = 0.0,
               is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
        """scaled_dot_product_attention's call (its parameter names), made local."""
        q, k, v = query, key, value
        self.attention.refuse_options(self.registry, position, q, k, attn_mask, dropout_p, is_causal, enable_gqa)
        layout, length = tokens.layout, q.shape[-2]
        cache_key = None
        if tokens.shared:  # one sequence's layout, shared by the batch: coordinates and block mask cached
            cache_key = (tuple(grid), length, layout.lead, layout.joint, tokens.order, str(q.device))  # one rule per patch
            coords = self.masks.cached(self.masks.coords, cache_key,
                                       lambda: _coords(tokens.grid_index(length, device=q.device), grid)[0])
        else:  # a route's kept tokens, each sample's own
            coords = _coords(tokens.grid_index(length, device=q.device), grid)
        extra = None
        if self.config.pooled:
            if not tokens.shared:
                raise RouteError("pooled keys and values need the whole grid; they do not run inside a route that "
                                 "keeps a subset of the tokens (end the route before these blocks, or pooled=None)")
            weights = self.modules["local_attention_pool"][str(position)]
            lead, trail = tokens.image_span(length)
            rows = self.masks.cached(self.masks.coords, (cache_key, "rows"),
                                     lambda: tokens.image_rows(length, device=q.device))
            extra = (pool_grid(k, grid, lead, trail, self.config.pooled, weights, rows),
                     pool_grid(v, grid, lead, trail, self.config.pooled, weights, rows))
        return local_attention(q, k, v, coords, coords, radius=self.config.radius if self.config.tile is None else None,
                               tile=self.config.tile, radius_tiles=self.config.radius_tiles,
                               frame_radius=self.config.frame_radius, extra_kv=extra,
                               masks=self.masks, key=cache_key, scale=scale, backend=self.config.backend)

    def describe(self, stack: BlockStack) -> list[str]:
        c = self.config
        rule = f"radius {c.radius:g} tokens" if c.tile is None else f"tiles {c.tile[0]}x{c.tile[1]}, {c.radius_tiles} each way"
        pooled = f", pooled {c.pooled}x{c.pooled} keys and values" if c.pooled else ""
        order = "the stack reordered where no other route runs" if c.reorder == "stack" else "each attention reordered"
        return [f"  local attention: {rule}{pooled}, backend {c.backend}, in {len(self.branches)} blocks' "
                f"attention ({', '.join(stack.paths[p] + '.' + b for p, b in list(self.branches.items())[:3])}"
                f"{', ...' if len(self.branches) > 3 else ''}); FlexAttention's tile order: {order}"]


def _runs(stack: BlockStack, positions: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive positions whose blocks share a class (where a stack changes block kind, Flux's
    double-stream to single-stream blocks, its stream changes too): (first, last) each."""
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and runs[-1][1] == p - 1 and type(stack.blocks[p]) is type(stack.blocks[p - 1]):
            runs[-1] = (runs[-1][0], p)
        else:
            runs.append((p, p))
    return runs


def _coords(index: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """(B, L) grid places (-1: global) -> (B, L, len(grid)) coordinates, -1 throughout for global tokens."""
    out, rest = [], index.clamp_min(0)
    for size in reversed(grid):
        out.append(rest % size)
        rest = rest // size
    coords = torch.stack(out[::-1], dim=-1)
    return torch.where(index[..., None] < 0, torch.full_like(coords, -1), coords)


@contextlib.contextmanager
def local_attention_off(model: nn.Module) -> Iterator[None]:
    """Dense attention inside the block (the teacher of distillation: the same weights, no second copy)."""
    patch = registry_of(model).get(NAME)
    patch.enabled = False
    try:
        yield
    finally:
        patch.enabled = True


@contextlib.contextmanager
def teacher_mode(model: nn.Module) -> Iterator[None]:
    """The distillation teacher: dense attention, with the trained parameters as they were when
    ``distillation_parameters`` was first called (their values are swapped in, then back)."""
    patch = registry_of(model).get(NAME)
    if patch.teacher is None:
        raise RouteError("the distillation teacher's weights are not recorded: call distillation_parameters(model) "
                         "once before training (it keeps the trained parameters' starting values as the teacher's)")
    params, saved = patch.teacher
    for i, (p, value) in enumerate(zip(params, saved)):
        if value.device != p.device:  # the model moved after the values were recorded: they follow, once
            saved[i] = value.to(p.device)
    current = [p.data for p in params]
    torch.clear_autocast_cache()  # autocast caches its casts of the weights by tensor: none may cross the swap
    try:
        for p, value in zip(params, saved):
            p.data = value
        with local_attention_off(model):
            yield
    finally:
        for p, value in zip(params, current):
            p.data = value
        torch.clear_autocast_cache()


def distillation_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What CLEAR's distillation trains: the image stream's query, key, value and output projections of every
    attention branch made local (its linear layers, less the text stream's ``add_*`` ones of joint attention),
    and the pooling weights.

    The first call also keeps these parameters' current values as the teacher's (a copy of them alone, not of the
    model): the teacher is the model with local attention off and those values. A teacher sharing the trained
    weights would move with the student, and both would drift to what local and dense attention agree on."""
    patch = registry_of(model).get(NAME)
    stack = patch.registry.stack
    found: list[nn.Parameter] = []
    for position, path in patch.branches.items():
        branch = stack.blocks[position].get_submodule(path)
        for name, module in branch.named_modules():
            if isinstance(module, nn.Linear) and "add" not in name:
                found += list(module.parameters())
    if "local_attention_pool" in patch.modules:
        found += list(patch.modules["local_attention_pool"].parameters())
    if patch.teacher is None:
        patch.teacher = (found, [p.detach().clone() for p in found])
    return found


@dataclass(kw_only=True)
class DistillationConfig:
    """CLEAR's weights: the model's objective + ``prediction`` x MSE(student, teacher prediction) + ``attention`` x
    MSE of the attention outputs, on every ``attention_every``-th local block."""

    prediction: float = 0.5
    attention: float = 0.5
    attention_every: int = 4


def distillation_loss(model: nn.Module, forward: Callable[[nn.Module], torch.Tensor],
                      objective: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      config: DistillationConfig | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """One distillation loss: ``forward(model)`` runs the model on a batch (its prediction), once as the teacher
    (local attention off, no gradients) and once as the student; ``objective(prediction)`` is the model's own
    loss on the batch (None: distillation alone). The teacher's weights are those recorded by
    ``distillation_parameters``. Returns the loss and its parts."""
    config = config or DistillationConfig()
    patch = registry_of(model).get(NAME)
    stack = patch.registry.stack
    watched = list(patch.branches.items())[config.attention_every - 1:: config.attention_every] or \
        list(patch.branches.items())[-1:]
    outputs: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}
    role = ["teacher"]
    handles = [stack.blocks[p].get_submodule(path).register_forward_hook(
        lambda m, a, out: None if tracing() else outputs[role[0]].append(out if isinstance(out, torch.Tensor) else out[0]))
        for p, path in watched]
    try:
        with torch.no_grad(), teacher_mode(model):
            teacher = forward(model)
        role[0] = "student"
        student = forward(model)
    finally:
        for handle in handles:
            handle.remove()
    parts = {"prediction": F.mse_loss(student.float(), teacher.float())}
    parts["attention"] = torch.stack([F.mse_loss(s.float(), t.float()) for s, t in
                                      zip(outputs["student"], outputs["teacher"])]).mean()
    loss = config.prediction * parts["prediction"] + config.attention * parts["attention"]
    if objective is not None:
        parts["objective"] = objective(student)
        loss = loss + parts["objective"]
    return loss, {name: float(value.detach()) for name, value in parts.items()}


def apply_local_attention(model: nn.Module, config: LocalAttentionConfig | None = None) -> nn.Module:
    """Local attention in the attention branches of ``model``'s block stack; returns the model."""
    config = config or LocalAttentionConfig()
    registry = PatchRegistry.for_model(model, config.stack)
    registry.apply(LocalAttentionPatch(config, registry.stack))
    return model


def remove_local_attention(model: nn.Module) -> nn.Module:
    """Take local attention off ``model``; other methods stay."""
    remove_patch(model, NAME)
    return model
