"""Local attention's masks and kernels: which query may see which key, from each token's place on the grid.

Each token of an attention sequence has coordinates on the image grid ((row, col), or (frame, row, col): the
window then runs through every frame, or the frames within ``frame_radius``), or is
global (-1 throughout: text, class, register tokens) or pooled (-2 throughout: a key made by pooling the grid,
seen by image queries only). A query sees a key iff either is global, or the key is pooled and the query an image
token, or they are near: ``dy^2 + dx^2 < r^2`` (same frame), or, tile-aligned, their tiles are at most
``radius_tiles`` apart each way (windows aligned to tiles: ordered tile by tile, no kernel block of a tile's size
is partly masked; a pair reaches (up-down, left-right), so that 8 x 16 tiles, one kernel block each, make square
windows).

In FlexAttention the sequence is ordered tile by tile for both rules (``KERNEL_TILE`` for circular windows), so
that each kernel block holds a compact patch of the grid rather than a strip of a row: fewer blocks meet a
window.

On CUDA the attention runs in FlexAttention with a block mask cached per layout key in a ``LocalMasks`` the
caller owns (no module globals); elsewhere in scaled_dot_product_attention with the dense boolean mask, which has
the same semantics and a backward on the CPU.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Hashable

import torch
import torch.nn.functional as F

GLOBAL, POOLED = -1, -2
KERNEL_TILE = (8, 16)  # one FlexAttention block of 128 tokens: the patch of the grid a block holds when ordered
DENSE_CACHE_LIMIT = 2**22  # (query, key) pairs up to which SDPA's dense boolean mask is cached (4 MiB each)
TileReach = int | tuple[int, int]  # tiles a window reaches each way, or (up-down, left-right)


def _near(qc: torch.Tensor, kc: torch.Tensor, radius: float | None, tile: tuple[int, int] | None,
          radius_tiles: TileReach | None, frame_radius: int | None = None) -> torch.Tensor:
    """Whether image query coordinates ``qc`` and key coordinates ``kc`` (broadcast against each other) are near:
    on the 2D grid, in every frame (a tube through the video) or in the frames within ``frame_radius``."""
    same_frame = True
    if qc.shape[-1] == 3 and frame_radius is not None:
        same_frame = (qc[..., 0] - kc[..., 0]).abs() <= frame_radius
    dy, dx = qc[..., -2] - kc[..., -2], qc[..., -1] - kc[..., -1]
    if tile is None:
        return same_frame & (dy * dy + dx * dx < radius * radius)
    reach_y, reach_x = (radius_tiles, radius_tiles) if isinstance(radius_tiles, int) else radius_tiles
    ty = qc[..., -2] // tile[0] - kc[..., -2] // tile[0]
    tx = qc[..., -1] // tile[1] - kc[..., -1] // tile[1]
    return same_frame & (ty.abs() <= reach_y) & (tx.abs() <= reach_x)


def _allowed(q_image: torch.Tensor, k_kind: torch.Tensor, near: Any) -> torch.Tensor:
    """The rule, written once for the dense mask and the block mask: global keys for everyone, every key but the
    pooled ones for global queries, pooled keys for image queries, image keys for the image queries near them."""
    return (k_kind == GLOBAL) | (~q_image & (k_kind != POOLED)) | (q_image & (k_kind == POOLED)) | \
        (q_image & (k_kind >= 0) & near())


def check_rule(radius: float | None, tile: tuple[int, int] | None, radius_tiles: TileReach | None) -> None:
    if tile is None and (radius is None or radius < 1):
        raise ValueError(f"radius {radius}: below 1 token an image query sees no image key; give radius >= 1")
    reach = [radius_tiles] if radius_tiles is None or isinstance(radius_tiles, int) else list(radius_tiles)
    if tile is not None and (len(tile) != 2 or min(tile) < 1 or len(reach) not in (1, 2) or
                             any(r is None or r < 0 for r in reach)):
        raise ValueError(f"tile {tile} with radius_tiles {radius_tiles}: give two positive tile sides and "
                         "radius_tiles >= 0 (or a pair: tiles up-down, tiles left-right)")


def local_mask(q_coords: torch.Tensor, kv_coords: torch.Tensor, *, radius: float | None = None,
               tile: tuple[int, int] | None = None, radius_tiles: TileReach | None = None,
               frame_radius: int | None = None) -> torch.Tensor:
    """Dense boolean mask (..., Lq, Lkv), True where the query may see the key. Coordinates (L, n) or (B, L, n)."""
    check_rule(radius, tile, radius_tiles)
    if q_coords.shape[-1] not in (2, 3) or kv_coords.shape[-1] != q_coords.shape[-1]:
        raise ValueError(f"coordinates of shapes {tuple(q_coords.shape)} and {tuple(kv_coords.shape)}: give (L, 2) "
                         "or (L, 3) per sequence (row, col or frame, row, col; -1 for global tokens)")
    qc, kc = q_coords[..., :, None, :], kv_coords[..., None, :, :]
    q_image, k_kind = qc[..., 0] >= 0, kc[..., 0]
    return _allowed(q_image, k_kind, lambda: _near(qc, kc, radius, tile, radius_tiles, frame_radius))


def tile_order(grid: tuple[int, int], tile: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The permutation that orders a row-major grid's tokens tile by tile, and its inverse."""
    if grid[0] % tile[0] or grid[1] % tile[1]:
        raise ValueError(f"tiles of {tile[0]}x{tile[1]} do not divide the grid {grid[0]}x{grid[1]}; choose tile sides "
                         "that divide it")
    index = torch.arange(grid[0] * grid[1]).view(grid[0] // tile[0], tile[0], grid[1] // tile[1], tile[1])
    order = index.permute(0, 2, 1, 3).reshape(-1)
    return order, torch.argsort(order)


def tile_sorted(coords: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """The order that puts a sequence's global tokens first, then its grid tokens tile by tile (each tile
    row-major; frames first), from the coordinates (L, n): the permutation ``tile_order`` gives for a bare grid."""
    return torch.sort(tile_rank(coords, tile), stable=True).indices


def in_tile_order(coords: torch.Tensor, tile: tuple[int, int]) -> bool:
    """Whether a sequence's grid tokens already come tile by tile (its global tokens anywhere): a stream the
    stack runs in tile order needs no reordering around each attention."""
    rank = tile_rank(coords, tile)[coords[:, 0] >= 0]
    return bool((rank[1:] > rank[:-1]).all())


def tile_rank(coords: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """Each token's place in tile order (L,): 0 for global tokens, 1 + its rank among the grid's tokens ordered
    tile by tile (each tile row-major; frames first)."""
    image = coords[:, 0] >= 0
    c = coords.clamp_min(0)
    spans = [int(c[:, i].max()) + 1 for i in range(c.shape[1])]
    th, tw = tile
    tiles_w = -(-spans[-1] // tw)
    tiles_h = -(-spans[-2] // th)
    rank = ((c[:, -2] // th) * tiles_w + c[:, -1] // tw) * (th * tw) + (c[:, -2] % th) * tw + c[:, -1] % tw
    if c.shape[1] == 3:
        rank = rank + c[:, 0] * tiles_h * tiles_w * th * tw
    return torch.where(image, rank + 1, torch.zeros_like(rank))


def _reordering(coords: torch.Tensor, tile: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The tile order of a sequence and its inverse; None where it comes in tile order already."""
    if in_tile_order(coords, tile):
        return None
    order = tile_sorted(coords, tile)
    return order, torch.argsort(order)


def pool_grid(x: torch.Tensor, grid: tuple[int, int], lead: int, trail: int, d: int,
              weights: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Keys or values (B, H, L, D) of a sequence holding ``lead`` tokens, the grid's row-major, ``trail`` tokens
    (or, given ``rows``, the grid's tokens at those places, row-major: a reordered stream): the grid pooled by
    d x d windows with ``weights`` (d * d,; None: the mean) -> (B, H, (Hg / d) * (Wg / d), D)."""
    if len(grid) != 2 or grid[0] % d or grid[1] % d:
        raise ValueError(f"pooled keys and values need a 2D grid divisible by d={d}, got {grid}")
    b, h, _, c = x.shape
    image = x[:, :, lead: x.shape[2] - trail] if rows is None else x.index_select(2, rows)
    image = image.reshape(b, h, grid[0] // d, d, grid[1] // d, d, c)
    windows = image.permute(0, 1, 2, 4, 3, 5, 6).reshape(b, h, grid[0] // d, grid[1] // d, d * d, c)
    pooled = windows.mean(-2) if weights is None else (windows * weights.to(x.dtype)[:, None]).sum(-2)
    return pooled.reshape(b, h, -1, c)


def _raise_recompile_limit(limit: int) -> None:
    import torch._dynamo.config as dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), limit))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), 4 * limit))


class LocalMasks:
    """Block masks by layout key (least recently used out, at most ``capacity``), and the compiled FlexAttention:
    owned by the method that uses them, not by the module."""

    def __init__(self, capacity: int = 32):
        self.capacity = capacity
        self.blocks: OrderedDict[Hashable, Any] = OrderedDict()
        self.orders: OrderedDict[Hashable, Any] = OrderedDict()  # tile orders of a sequence and their inverses
        self.coords: OrderedDict[Hashable, Any] = OrderedDict()  # a layout's token coordinates on the grid
        self.dense: OrderedDict[Hashable, Any] = OrderedDict()  # dense masks of short sequences (SDPA's path)
        self._flex: Any = None

    def cached(self, store: OrderedDict, key: Hashable | None, make: Any) -> Any:
        """``store[key]``, made by ``make()`` on a miss (not kept when ``key`` is None)."""
        if key is not None and key in store:
            store.move_to_end(key)
            return store[key]
        value = make()
        if key is not None:
            store[key] = value
            if len(store) > self.capacity:
                store.popitem(last=False)
        return value

    def flex(self) -> Any:
        """FlexAttention compiled. It compiles once per rule, sequence length and autocast state: the recompile
        limit (8 by default) is raised so that a model's many layouts, or a benchmark's many rules, never push it
        back to the unfused eager path, which materialises the scores."""
        if self._flex is None:
            from torch.nn.attention.flex_attention import flex_attention

            _raise_recompile_limit(256)
            self._flex = torch.compile(flex_attention, dynamic=False)
        return self._flex

    def block_mask(self, key: Hashable | None, q_coords: torch.Tensor, kv_coords: torch.Tensor, rule: dict) -> Any:
        """The FlexAttention block mask of these coordinates (cached by ``key`` where the coordinates are one
        sequence's, shared by the batch)."""
        batched = q_coords.dim() == 3
        return self.cached(self.blocks, None if batched else key,
                           lambda: self._block_mask(q_coords, kv_coords, rule, batched))

    @staticmethod
    def _block_mask(q_coords: torch.Tensor, kv_coords: torch.Tensor, rule: dict, batched: bool) -> Any:
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b: Any, h: Any, qi: Any, ki: Any) -> Any:
            qc = q_coords[b, qi] if batched else q_coords[qi]
            kc = kv_coords[b, ki] if batched else kv_coords[ki]
            q_image, k_kind = qc[0] >= 0, kc[0]
            return _allowed(q_image, k_kind, lambda: _near(qc, kc, **rule))

        # compiled for long sequences on CUDA: the eager build materialises the whole (Lq, Lkv) mask (32 GiB at 64K
        # tokens), while compiling it costs seconds per rule, more than the eager build of a short one
        long = q_coords.shape[-2] * kv_coords.shape[-2] > 2**28
        return create_block_mask(mask_mod, q_coords.shape[0] if batched else None, None, q_coords.shape[-2],
                                 kv_coords.shape[-2], device=q_coords.device, _compile=q_coords.is_cuda and long)


def block_sparsity(block_mask: Any) -> float:
    """The share of the kernel's (query block, key block) pairs the mask skips (partly masked blocks count as run)."""
    q_blocks = math.ceil(block_mask.seq_lengths[0] / block_mask.BLOCK_SIZE[0])
    kv_blocks = math.ceil(block_mask.seq_lengths[1] / block_mask.BLOCK_SIZE[1])
    run = block_mask.kv_num_blocks.sum()
    if block_mask.full_kv_num_blocks is not None:
        run = run + block_mask.full_kv_num_blocks.sum()
    pairs = block_mask.kv_num_blocks.shape[0] * block_mask.kv_num_blocks.shape[1] * q_blocks * kv_blocks
    return 1.0 - float(run) / pairs


def uses_flex(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` ("auto", "flex" or "sdpa") runs FlexAttention on ``device``: "auto" does on CUDA."""
    return backend == "flex" or (backend == "auto" and device.type == "cuda")


FLEX_MIN_HEAD_DIM = 16  # FlexAttention's compiled kernels refuse smaller query, key and value head dims


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: Any, masks: LocalMasks,
          scale: float | None) -> torch.Tensor:
    """FlexAttention with a block mask: compiled on CUDA, eager (forward only) on the CPU. Head dims below the
    kernel's minimum are zero-padded: the padded channels add nothing to the scores (the scale stays that of
    the true dim) and are cut from the output."""
    dim, dim_v = q.shape[-1], v.shape[-1]
    if min(dim, dim_v) < FLEX_MIN_HEAD_DIM:
        qk = max(dim, FLEX_MIN_HEAD_DIM) - dim
        q, k = F.pad(q, (0, qk)), F.pad(k, (0, qk))
        out = _flex(q, k, F.pad(v, (0, max(dim_v, FLEX_MIN_HEAD_DIM) - dim_v)), block, masks,
                    dim ** -0.5 if scale is None else scale)
        return out[..., :dim_v]
    if q.is_cuda:
        return masks.flex()(q, k, v, block_mask=block, scale=scale)
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=block, scale=scale)


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_coords: torch.Tensor,
                    kv_coords: torch.Tensor, *, radius: float | None = None, tile: tuple[int, int] | None = None,
                    radius_tiles: TileReach | None = None, frame_radius: int | None = None,
                    extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                    masks: LocalMasks | None = None, key: Hashable | None = None, scale: float | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """Attention (B, H, L, D) -> (B, H, L, D) with the local rule; ``extra_kv`` (pooled keys and values, (B, H, P,
    D)) appended to the keys, seen by image queries only. backend: "auto" (FlexAttention on CUDA, else SDPA with
    the dense mask), "flex" or "sdpa"."""
    check_rule(radius, tile, radius_tiles)
    rule = dict(radius=radius, tile=tile, radius_tiles=radius_tiles, frame_radius=frame_radius)
    use_flex = uses_flex(backend, q.device)
    if use_flex and q_coords.dim() == 2 and q_coords is kv_coords:
        # ordered tile by tile: each kernel block holds a patch of the grid (tile-aligned: wholly in or out of
        # every window); the output goes back to the sequence's order
        masks = masks or LocalMasks()
        ordering = masks.cached(masks.orders, None if key is None else (key, "order"),
                                lambda: _reordering(q_coords, tile or KERNEL_TILE))
        if ordering is not None:
            order, inverse = ordering
            ordered = [x.index_select(2, order) for x in (q, k, v)]  # on the CPU half the time of x[:, :, order]
            out = local_attention(*ordered, q_coords[order], kv_coords[order], **rule, extra_kv=extra_kv,
                                  masks=masks, key=None if key is None else (key, "tile order"), scale=scale,
                                  backend="flex_ordered")
            return out.index_select(2, inverse)
        backend = "flex_ordered"  # the sequence comes in tile order already (the stack runs reordered)
    if extra_kv is not None:
        pooled = torch.full((*kv_coords.shape[:-2], extra_kv[0].shape[-2], kv_coords.shape[-1]), POOLED,
                            dtype=kv_coords.dtype, device=kv_coords.device)
        kv_coords = torch.cat([kv_coords, pooled], dim=-2)
        k, v = torch.cat([k, extra_kv[0]], dim=-2), torch.cat([v, extra_kv[1]], dim=-2)
        key = None if key is None else (key, "pooled", k.shape[-2])  # the masks of the sequence with pooled keys
    masks = masks or LocalMasks()
    if use_flex or backend == "flex_ordered":
        return _flex(q, k, v, masks.block_mask(key, q_coords, kv_coords, rule), masks, scale)
    small = q_coords.dim() == 2 and q_coords.shape[0] * kv_coords.shape[0] <= DENSE_CACHE_LIMIT
    mask = masks.cached(masks.dense, key if small else None, lambda: local_mask(q_coords, kv_coords, **rule))
    if mask.dim() == 3:
        mask = mask[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
