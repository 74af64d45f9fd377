"""TREAD written by hand inside each reference backbone's forward loop, as the paper's code does: the
baseline a user would otherwise write, against which the spliced routing is timed, and the reference the
tests check the splice against (``dit_forward_handrouted``)."""

from __future__ import annotations

from typing import Sequence

import torch

from tokenroute.models import DiffusionMamba, DiT, UViT


def dit_forward_handrouted(model: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                           routes: Sequence[tuple[int, int, torch.Tensor]]) -> torch.Tensor:
    """``DiT.forward`` with TREAD routing written out by hand: the reference the splice is checked against.

    Each route ``(start, end, keep_idx)`` (``keep_idx``: (B, K) long, kept token indices sorted ascending)
    gathers the kept tokens before block ``start``, runs blocks ``start..end`` (inclusive) on them only,
    and scatters them back into the full sequence after block ``end``; the other tokens skip those blocks
    unchanged. Routes must not overlap.
    """
    depth = len(model.blocks)
    by_start: dict[int, tuple[int, torch.Tensor]] = {}
    last_end = -1
    for start, end, keep_idx in sorted(routes, key=lambda r: r[0]):
        if not 0 <= start <= end < depth:
            raise ValueError(f"route ({start}, {end}) is out of range for {depth} blocks")
        if start <= last_end:
            raise ValueError(f"route ({start}, {end}) overlaps the previous route ending at block {last_end}")
        by_start[start] = (end, keep_idx)
        last_end = end

    x, c = model.embed(x, t, y)
    d = x.shape[-1]
    x_full, idx, route_end = None, None, -1
    for i, block in enumerate(model.blocks):
        if i in by_start:
            route_end, keep_idx = by_start[i]
            idx = keep_idx[..., None].expand(-1, -1, d)
            x_full = x
            x = x.gather(1, idx)
        x = block(x, c)
        if i == route_end:
            x = x_full.scatter(1, idx, x.to(x_full.dtype))
            x_full, idx, route_end = None, None, -1
    return model.head(x, c)


def draw_keep(batch: int, num_tokens: int, ratio: float, device: torch.device, ordered: bool) -> torch.Tensor:
    """The paper's draw: a random permutation per sample, the first N - int(N * ratio) kept. State-space
    models need the kept tokens in their original order (``ordered``); the paper's DiT does not sort."""
    keep = torch.rand(batch, num_tokens, device=device).argsort(dim=1)[:, : num_tokens - int(num_tokens * ratio)]
    return keep.sort(dim=1).values if ordered else keep


def _index(keep: torch.Tensor, prefix: int, dim: int) -> torch.Tensor:
    if prefix:
        lead = torch.arange(prefix, device=keep.device).expand(keep.shape[0], prefix)
        keep = torch.cat([lead, keep + prefix], dim=1)
    return keep[..., None].expand(-1, -1, dim)


def tread_dit(model: DiT, x, t, y, routes: Sequence[tuple[int, int, float]]) -> torch.Tensor:
    n = model.x_embedder.num_patches
    keeps = [(s, e, draw_keep(x.shape[0], n, r, x.device, ordered=False)) for s, e, r in routes]
    return dit_forward_handrouted(model, x, t, y, keeps)


def tread_mamba(model: DiffusionMamba, x, t, y, routes: Sequence[tuple[int, int, float]]) -> torch.Tensor:
    tokens = model.embed(x, t, y)
    prefix, dim = model.num_prefix_tokens, tokens.shape[-1]
    n = tokens.shape[1] - prefix
    by_start = {s: (e, draw_keep(x.shape[0], n, r, x.device, ordered=True)) for s, e, r in routes}
    full, idx, end = None, None, -1
    for i, block in enumerate(model.blocks):
        if i in by_start:
            end, keep = by_start[i]
            idx = _index(keep, prefix, dim)
            full, tokens = tokens, tokens.gather(1, idx)
        tokens = block(tokens)
        if i == end:
            tokens = full.to(tokens.dtype).scatter(1, idx, tokens)
    return model.head(tokens)


def tread_uvit(model: UViT, x, t, y, routes: Sequence[tuple[int, int, float]]) -> torch.Tensor:
    """U-ViT's loop with routes: skips that enter a route are gathered, skips made inside it are
    scattered back into the route-start tokens when they are used after it."""
    tokens = model.embed(x, t, y)
    prefix, dim = model.num_prefix_tokens, tokens.shape[-1]
    n = tokens.shape[1] - prefix
    blocks = [*model.in_blocks, model.mid_block, *model.out_blocks]
    depth_in = len(model.in_blocks)
    by_start = {s: (e, draw_keep(x.shape[0], n, r, x.device, ordered=False)) for s, e, r in routes}
    skips: list[tuple[torch.Tensor, int]] = []  # (skip, index of the route it was made in or -1)
    full, idx, end, route = None, None, -1, -1
    full_of: dict[int, torch.Tensor] = {}  # per route: its start tokens and kept index, for skips leaving it
    idx_of: dict[int, torch.Tensor] = {}
    for i, block in enumerate(blocks):
        if i in by_start:
            end, keep = by_start[i]
            idx, route = _index(keep, prefix, dim), i
            full, tokens = tokens, tokens.gather(1, idx)
        if i > depth_in:
            skip, made_in = skips.pop()
            if route != -1 and made_in not in (-1, route):
                raise NotImplementedError("this reference handles skips of one route only")
            if route != -1 and made_in == -1:
                skip = skip.gather(1, idx)
            elif route == -1 and made_in != -1:
                skip = full_of[made_in].to(skip.dtype).scatter(1, idx_of[made_in], skip)
            tokens = block(tokens, skip)
        else:
            tokens = block(tokens)
        if i < depth_in:
            skips.append((tokens, route))
        if i == end:
            full_of[route], idx_of[route] = full, idx
            tokens = full.to(tokens.dtype).scatter(1, idx, tokens)
            end, route = -1, -1
    return model.head(tokens)


HANDWRITTEN = {DiT: tread_dit, UViT: tread_uvit, DiffusionMamba: tread_mamba}
