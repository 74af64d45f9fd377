"""Local attention's masks and kernels (tokenroute.core.locality) against brute-force references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenroute.core.locality import (LocalMasks, block_sparsity, local_attention, local_mask, pool_grid, tile_sorted,
                                      tile_order)


def coords_of(grid: tuple[int, ...], lead: int, trail: int) -> torch.Tensor:
    places = torch.stack(torch.meshgrid(*[torch.arange(s) for s in grid], indexing="ij"), -1).reshape(-1, len(grid))
    globals_ = lambda n: torch.full((n, len(grid)), -1, dtype=torch.long)  # noqa: E731
    return torch.cat([globals_(lead), places, globals_(trail)])


def brute(coords: torch.Tensor, near) -> torch.Tensor:
    n = len(coords)
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            qi, kj = coords[i].tolist(), coords[j].tolist()
            out[i, j] = qi[0] < 0 or kj[0] < 0 or near(qi, kj)
    return out


@settings(max_examples=25, deadline=None)
@given(grid=st.one_of(st.tuples(st.integers(1, 6), st.integers(1, 6)),
                      st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4))),
       radius=st.floats(1.0, 6.0), lead=st.integers(0, 3), trail=st.integers(0, 2),
       frame_radius=st.sampled_from([None, 0, 1]))
def test_the_circular_mask_is_the_brute_force_rule(grid, radius, lead, trail, frame_radius):
    """2D grids, and frames x 2D with the window through every frame or the frames within frame_radius."""
    coords = coords_of(grid, lead, trail)

    def near(q, k):
        frames = len(q) == 2 or frame_radius is None or abs(q[0] - k[0]) <= frame_radius
        return frames and (q[-2] - k[-2]) ** 2 + (q[-1] - k[-1]) ** 2 < radius ** 2

    assert torch.equal(local_mask(coords, coords, radius=radius, frame_radius=frame_radius), brute(coords, near))


@settings(max_examples=15, deadline=None)
@given(tiles=st.tuples(st.integers(1, 3), st.integers(1, 3)), counts=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       radius_tiles=st.one_of(st.integers(0, 2), st.tuples(st.integers(0, 2), st.integers(0, 2))),
       lead=st.integers(0, 2))
def test_the_tile_mask_is_the_brute_force_rule_and_tile_order_makes_whole_blocks(tiles, counts, radius_tiles, lead):
    grid = (tiles[0] * counts[0], tiles[1] * counts[1])
    coords = coords_of(grid, lead, 0)
    reach = (radius_tiles, radius_tiles) if isinstance(radius_tiles, int) else radius_tiles  # up-down, left-right

    def near(q, k):
        return abs(q[0] // tiles[0] - k[0] // tiles[0]) <= reach[0] and \
            abs(q[1] // tiles[1] - k[1] // tiles[1]) <= reach[1]

    mask = local_mask(coords, coords, tile=tiles, radius_tiles=radius_tiles)
    assert torch.equal(mask, brute(coords, near))
    order, inverse = tile_order(grid, tiles)
    assert torch.equal(order[inverse], torch.arange(order.numel()))
    image = mask[lead:, lead:][order][:, order]  # tokens tile by tile: every tile-by-tile block is whole
    area = tiles[0] * tiles[1]
    blocks = image.reshape(image.shape[0] // area, area, image.shape[1] // area, area)
    assert (blocks.all(dim=(1, 3)) | ~blocks.any(dim=(1, 3))).all()


def reference(q, k, v, allowed):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def qkv(length: int, extra: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, n, 8, generator=g) for n in (length, length, length, extra, extra)]


def test_sdpa_path_is_the_manual_rule_with_pooled_keys_for_image_queries_only():
    coords = coords_of((4, 4), 2, 1)
    q, k, v, k2, v2 = qkv(len(coords), extra=4)
    out = local_attention(q, k, v, coords, coords, radius=1.5, extra_kv=(k2, v2), backend="sdpa")
    allowed = torch.cat([local_mask(coords, coords, radius=1.5),
                         (coords[:, 0] >= 0)[:, None].expand(-1, 4)], dim=1)
    torch.testing.assert_close(out, reference(q, torch.cat([k, k2], 2), torch.cat([v, v2], 2), allowed))
    dense = local_attention(q, k, v, coords, coords, radius=100.0, backend="sdpa")
    torch.testing.assert_close(dense, F.scaled_dot_product_attention(q, k, v), rtol=0, atol=1e-6)


def test_flex_and_sdpa_agree_and_block_masks_are_cached_per_key():
    coords = coords_of((8, 32), 1, 0)  # two 8 x 16 kernel tiles side by side: row-major is not tile order
    q, k, v, _, _ = qkv(len(coords))
    masks = LocalMasks()
    try:
        with torch.no_grad():
            flex = local_attention(q, k, v, coords, coords, radius=2.5, masks=masks, key="a", backend="flex")
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"FlexAttention does not run on this CPU build: {type(err).__name__}: {err}")
    torch.testing.assert_close(flex, local_attention(q, k, v, coords, coords, radius=2.5, backend="sdpa"),
                               rtol=1e-5, atol=1e-5)
    first, order = masks.blocks[("a", "tile order")], masks.orders[("a", "order")]  # run tile by tile, cached
    with torch.no_grad():
        local_attention(q, k, v, coords, coords, radius=2.5, masks=masks, key="a", backend="flex")
    assert masks.blocks[("a", "tile order")] is first and len(masks.blocks) == 1
    assert masks.orders[("a", "order")] is order and len(masks.orders) == 1
    assert 0.0 <= block_sparsity(first) <= 1.0
    ordered = coords[order[0]]  # a sequence in tile order already (a stack run reordered): no gathers, same answer
    with torch.no_grad():
        flex = local_attention(q, k, v, ordered, ordered, radius=2.5, masks=masks, key="b", backend="flex")
    torch.testing.assert_close(flex, local_attention(q, k, v, ordered, ordered, radius=2.5, backend="sdpa"),
                               rtol=1e-5, atol=1e-5)
    assert masks.orders[("b", "order")] is None and ("b", "tile order") not in masks.blocks and "b" in masks.blocks
    batched = torch.stack([coords, coords.flip(0)])
    with torch.no_grad():
        flex = local_attention(q, k, v, batched, batched, radius=2.5, masks=masks, backend="flex")
    torch.testing.assert_close(flex, local_attention(q, k, v, batched, batched, radius=2.5, backend="sdpa"),
                               rtol=1e-5, atol=1e-5)


def test_gradients_reach_queries_keys_values_and_pooling_weights():
    coords = coords_of((4, 4), 0, 0)
    q, k, v, _, _ = [t.requires_grad_() for t in qkv(len(coords))]
    weights = torch.full((4,), 0.25, requires_grad=True)
    pooled = (pool_grid(k, (4, 4), 0, 0, 2, weights), pool_grid(v, (4, 4), 0, 0, 2, weights))
    local_attention(q, k, v, coords, coords, radius=1.5, extra_kv=pooled, backend="sdpa").square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v, weights))


def test_bad_input_is_refused():
    coords = coords_of((4, 4), 0, 0)
    with pytest.raises(ValueError, match="radius >= 1"):
        local_mask(coords, coords, radius=0.5)
    with pytest.raises(ValueError, match=r"\(L, 2\)"):
        local_mask(coords[:, :1], coords[:, :1], radius=2.0)
    with pytest.raises(ValueError, match="do not divide"):
        tile_order((4, 4), (3, 3))
    with pytest.raises(ValueError, match="divisible"):
        pool_grid(torch.zeros(1, 1, 16, 2), (4, 4), 0, 0, 3, torch.ones(9))


def test_tile_windows_run_tile_by_tile_and_give_the_same_attention():
    """The flex path reorders the tokens tile by tile (globals first) and back: the same output as the dense mask,
    and every kernel block of one tile's size is whole."""
    coords = coords_of((8, 8), 2, 0)
    order = tile_sorted(coords, (4, 4))
    grid_order, _ = tile_order((8, 8), (4, 4))
    assert torch.equal(order, torch.cat([torch.arange(2), grid_order + 2]))
    q, k, v, _, _ = qkv(len(coords))
    dense = local_attention(q, k, v, coords, coords, tile=(4, 4), radius_tiles=0, backend="sdpa")
    try:
        with torch.no_grad():
            flex = local_attention(q, k, v, coords, coords, tile=(4, 4), radius_tiles=0, backend="flex")
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"FlexAttention does not run on this CPU build: {type(err).__name__}: {err}")
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims", [(8, 8), (8, 24), (4, 16)])
def test_flex_pads_head_dims_below_its_kernel_minimum(dims):
    """FlexAttention's compiled kernels refuse head dims below 16: the flex path zero-pads queries, keys and values
    and cuts the output back, with the true dim's scale: the same attention as the dense mask."""
    coords = coords_of((8, 32), 1, 0)
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 2, len(coords), dims[0], generator=gen) for _ in range(2))
    v = torch.randn(2, 2, len(coords), dims[1], generator=gen)
    try:
        with torch.no_grad():
            flex = local_attention(q, k, v, coords, coords, radius=2.5, backend="flex")
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"FlexAttention does not run on this CPU build: {type(err).__name__}: {err}")
    assert flex.shape == v.shape
    torch.testing.assert_close(flex, local_attention(q, k, v, coords, coords, radius=2.5, backend="sdpa"),
                               rtol=1e-5, atol=1e-5)
