"""Pixel <-> token layout: the patch order DiT and U-ViT use, shared by the backbones (patchify,
unpatchify) and the losses (per-pixel losses line up with routing masks).

Images (B, C, H, W) become (B, h*w, ph*pw*C) with patches in row-major (h, w) order and each patch's values
in (row, column, channel) order, as DiT's patchify/unpatchify. Video (B, C, T, H, W) with `frames` frames per
patch becomes (B, t*h*w, frames*ph*pw*C), frames-major.
"""

from __future__ import annotations

import math

from torch import Tensor


def _patch_dims(shape: tuple[int, ...], patch_size: int | tuple[int, int], frames: int | None) -> tuple[int, ...]:
    """Patch extent along each axis after (B, C): (ph, pw) for images, (frames, ph, pw) for video."""
    if len(shape) not in (4, 5):
        raise ValueError(
            f"Expected an image batch (B, C, H, W) or a video batch (B, C, T, H, W), got shape {shape}; "
            "add a channel axis of size 1 if the input has none."
        )
    if isinstance(patch_size, int):
        patch_size = (patch_size, patch_size)
    if not isinstance(patch_size, (tuple, list)) or len(patch_size) != 2 or not all(
        isinstance(p, int) and p > 0 for p in patch_size
    ):
        raise ValueError(
            f"patch_size must be a positive int or a (height, width) pair of them, got {patch_size!r}; "
            "give the temporal patch size of video as frames=."
        )
    if len(shape) == 4 and frames is not None:
        raise ValueError(f"frames={frames} applies to video (B, C, T, H, W) only; the input is an image batch {shape}.")
    dims = tuple(patch_size)
    if len(shape) == 5:
        frames = 1 if frames is None else frames
        if not isinstance(frames, int) or frames <= 0:
            raise ValueError(f"frames (the temporal patch size) must be a positive int, got {frames!r}.")
        dims = (frames, *dims)
    names = (("T", "frames"), ("H", "patch_size"), ("W", "patch_size"))[-len(dims):]
    for (axis, param), size, p in zip(names, shape[2:], dims):
        if size % p:
            near = " or ".join(str(m) for m in (size - size % p, size - size % p + p) if m)
            raise ValueError(
                f"{axis}={size} is not divisible by {param}={p}; crop or pad the input along {axis} to a "
                f"multiple of {p} (e.g. {near})."
            )
    return dims


def patchify_pixels(x: Tensor, patch_size: int | tuple[int, int], frames: int | None = None) -> Tensor:
    """(B, C, [T,] H, W) -> (B, N, P*C): one row per token in the model's order, values (patch..., channel)."""
    dims = _patch_dims(tuple(x.shape), patch_size, frames)
    batch, channels, *size = x.shape
    grid = [s // p for s, p in zip(size, dims)]
    x = x.reshape(batch, channels, *(v for g, p in zip(grid, dims) for v in (g, p)))
    k = len(dims)
    # (B, C, g0, p0, g1, p1, ...) -> (B, g0, g1, ..., p0, p1, ..., C)
    x = x.permute(0, *range(2, 2 + 2 * k, 2), *range(3, 3 + 2 * k, 2), 1)
    return x.reshape(batch, math.prod(grid), math.prod(dims) * channels)


def unpatchify_pixels(
    tokens: Tensor, patch_size: int | tuple[int, int], size: tuple[int, ...], frames: int | None = None
) -> Tensor:
    """Exact inverse of `patchify_pixels`: (B, N, P*C) -> (B, C, [T,] H, W), with `size` = ([T,] H, W)."""
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be (B, N, P*C), got shape {tuple(tokens.shape)}.")
    batch, num, features = tokens.shape
    size = tuple(size)
    if len(size) not in (2, 3):
        raise ValueError(f"size must be (H, W) for images or (T, H, W) for video, got {size}.")
    dims = _patch_dims((batch, 1, *size), patch_size, frames)
    grid = [s // p for s, p in zip(size, dims)]
    patch = math.prod(dims)
    if num != math.prod(grid) or features % patch:
        raise ValueError(
            f"tokens of shape {tuple(tokens.shape)} do not tile size {size} with patches {dims}: expected "
            f"{math.prod(grid)} tokens of a multiple of {patch} values; check size, patch_size and frames."
        )
    channels = features // patch
    k = len(dims)
    x = tokens.reshape(batch, *grid, *dims, channels)
    # (B, g0, g1, ..., p0, p1, ..., C) -> (B, C, g0, p0, g1, p1, ...)
    x = x.permute(0, 2 * k + 1, *(i for j in range(k) for i in (1 + j, 1 + k + j)))
    return x.reshape(batch, channels, *size)
