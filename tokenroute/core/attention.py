"""Attention replaced where the model computes it: the ``scaled_dot_product_attention`` call inside a block's
attention branch (diffusers' processors, their ``dispatch_attention_fn`` native backend, timm's ``Attention``, the
project's models) runs a method's attention instead, told where the stream's image tokens sit and their grid.

Local attention (windows on the grid) and token density's pooling attention (keys and values pooled) are both
this: ``AttentionBranches`` finds the branches, taps their blocks' layouts, and installs the replacement.
An attention branch that computes attention otherwise is refused with the way to make it call
``scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .blocks import block_branches
from .layout import StreamTokens
from .locality import pool_grid
from .patches import unwrap_forwards, wrap_forward
from .plan import Tap
from .route import RouteError
from .splice.tracer import tracing
from .stack import BlockStack

# replace(position, tokens, grid, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> output
Replacement = Callable[..., torch.Tensor]


class _Interception(TorchFunctionMode):
    """While an attention branch runs: its ``scaled_dot_product_attention`` call runs ``replace`` instead."""

    def __init__(self, replace: Callable[..., torch.Tensor]):
        super().__init__()
        self.replace, self.calls = replace, 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls += 1
            return self.replace(*args, **kwargs)
        return func(*args, **kwargs)


class AttentionBranches:
    """The attention branches of chosen blocks (``blocks``: positions; None: every block with a known attention
    branch), the taps that tell their stream's layout, and the installed replacement of their attention.

    ``grid``: the image tokens' grid where the graph cannot show it (packed latents), checked where it can.
    """

    def __init__(self, stack: BlockStack, blocks: list[int] | None, method: str, title: str,
                 grid: tuple[int, ...] | None = None):
        self.method, self.title, self.grid = method, title, grid
        chosen = list(range(len(stack.blocks))) if blocks is None else list(blocks)
        self.paths: dict[int, str] = {}
        for position in chosen:
            if not 0 <= position < len(stack.blocks):
                raise RouteError(f"{title}: block {position} is not in the stack: the stack has {len(stack.blocks)} "
                                 f"({stack.paths[0]} .. {stack.paths[-1]})")
            attention = [b for b in block_branches(stack.blocks[position], stack.specs[position]) if b.kind == "attention"]
            if attention:
                self.paths[position] = attention[0].path
            elif blocks is not None:
                raise RouteError(
                    f"block {stack.paths[position]} ({type(stack.blocks[position]).__name__}) has no known attention "
                    "branch; register its class with tokenroute.register_block(cls, tokenroute.BlockSpec(stream, "
                    "branches=(tokenroute.Branch('attention', path), ...)))")
        if not self.paths:
            raise RouteError(f"no block of {type(stack.owner).__name__}'s stack has a known attention branch; register "
                             "the block class with its branches (tokenroute.register_block)")
        self.taps = [Tap(p, method) for p in self.paths]
        self.installed: list[tuple[nn.Module, Any]] = []
        self.enabled = True  # off: the blocks attend as they did (a distillation teacher)

    def attach(self, stack: BlockStack, registry: Any, replace: Replacement) -> None:
        for position, path in self.paths.items():
            wrap_forward(stack.blocks[position].get_submodule(path), self.installed,
                         lambda original, p=position: lambda *args, **kwargs:
                         self._attend(registry, p, replace, original, args, kwargs))

    def detach(self) -> None:
        unwrap_forwards(self.installed)

    def _tokens(self, registry: Any, position: int) -> tuple[StreamTokens, tuple[int, ...]]:
        splice = registry.splice
        tokens = splice.boundaries.tokens_at(position) if splice is not None else None
        path = registry.stack.paths[position]
        if tokens is None:
            raise RouteError(
                f"{self.title} at {path}: where its stream's image tokens sit is not known (the owner's forward could "
                f"not be traced, so its graph cannot show them). Make the forward traceable, or keep {self.title} off "
                "this model")
        grid = tokens.layout.grid or self.grid
        if grid is None:
            raise RouteError(
                f"{self.title} at {path}: the image tokens' grid is not known: the graph shows no patch embedding "
                f"that makes it ({tokens.layout.image} image tokens). Declare it: grid=(H, W) in the method's config")
        if self.grid is not None and (tuple(self.grid) != tuple(grid) or math.prod(grid) != tokens.layout.image):
            raise RouteError(
                f"the declared grid {tuple(self.grid)} does not match {path}'s stream: {tokens.layout.image} image "
                "tokens" + (f", grid {tuple(tokens.layout.grid)} read from the graph" if tokens.layout.grid else ""))
        return tokens, tuple(grid)

    def _attend(self, registry: Any, position: int, replace: Replacement, original: Any, args: tuple,
                kwargs: dict) -> Any:
        if tracing() or not self.enabled:  # the trace runs the blocks on fake values: shapes only
            return original(*args, **kwargs)
        tokens, grid = self._tokens(registry, position)
        interception = _Interception(lambda *a, **kw: replace(position, tokens, grid, *a, **kw))
        with interception:
            out = original(*args, **kwargs)
        if interception.calls == 0:
            raise RouteError(
                f"{self.title} at {registry.stack.paths[position]}.{self.paths[position]}: the attention branch never "
                "called torch.nn.functional.scaled_dot_product_attention, so there is nothing to replace. Set its "
                "attention backend to the native one (diffusers: model.set_attention_backend('native')), or register "
                "a block whose attention submodule calls scaled_dot_product_attention")
        return out

    def refuse_options(self, registry: Any, position: int, query: torch.Tensor, key: torch.Tensor, attn_mask: Any,
                       dropout_p: float, is_causal: bool, enable_gqa: bool) -> None:
        """Refuse what a replacement does not combine yet: masks, causal, dropout, grouped-query, other lengths."""
        if attn_mask is not None or is_causal or dropout_p or enable_gqa or query.shape[-2] != key.shape[-2]:
            raise RouteError(
                f"{self.title} at {registry.stack.paths[position]}: its attention passes "
                f"{'a mask' if attn_mask is not None else 'causal, dropout or grouped-query options, or keys of another length'}"
                f", which {self.title} does not combine yet; keep {self.title} off these blocks")


class PooledKeys:
    """Pooling attention (token density's bottom blocks): each chosen block's attention sees the keys and values of
    its image grid pooled d x d (``factors``: block -> d; the whole grid's side: one key, the mean of the values),
    beside its other tokens as they are."""

    def __init__(self, factors: dict[int, int], stack: BlockStack, method: str):
        for position, d in factors.items():
            if isinstance(d, bool) or not isinstance(d, int) or d < 1:
                raise RouteError(f"pooling attention in block {position}: factor {d!r} must be an int >= 1")
        self.factors = dict(factors)
        self.branches = AttentionBranches(stack, sorted(factors), method, "pooling attention")
        self.taps = self.branches.taps
        self.registry: Any = None

    def attach(self, stack: BlockStack, registry: Any) -> None:
        self.registry = registry
        self.branches.attach(stack, registry, self._attention)

    def detach(self) -> None:
        self.branches.detach()

    def _attention(self, position: int, tokens: StreamTokens, grid: tuple[int, ...], query: torch.Tensor,
                   key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None, dropout_p: float = 0.0,
                   is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
        self.branches.refuse_options(self.registry, position, query, key, attn_mask, dropout_p, is_causal, enable_gqa)
        d = self.factors[position]
        if d == 1:
            return F.scaled_dot_product_attention(query, key, value, scale=scale)
        if not tokens.shared:
            raise RouteError(f"pooling attention in block {position}: it needs the whole grid, and the block runs inside "
                             "a route that keeps a subset of the tokens; end that route before it")
        if len(grid) != 2 or grid[0] % d or grid[1] % d:
            raise RouteError(f"pooling attention in block {position}: a factor of {d} does not divide the grid "
                             f"{'x'.join(map(str, grid))}; choose one that divides both sides")
        lead, trail = tokens.image_span(key.shape[-2])
        length = key.shape[-2]
        rows = tokens.image_rows(length, device=key.device)  # a reordered stream's grid, row-major

        def pooled(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x[:, :, :lead], pool_grid(x, grid, lead, trail, d, rows=rows), x[:, :, length - trail:]],
                             dim=-2)

        return F.scaled_dot_product_attention(query, pooled(key), pooled(value), scale=scale)
