"""Gather and scatter along a token axis as single batched index operations."""

from __future__ import annotations

import torch


def with_context(keep: torch.Tensor, lead: int, image: int, length: int) -> torch.Tensor:
    """Kept image-token indices ``keep`` (B, K), counted among the ``image`` tokens after ``lead`` others, as
    positions in the stream of ``length`` tokens, with every non-image token kept too: (B, length - image + K)."""
    if lead == 0 and image == length:
        return keep
    parts = [torch.arange(lead, device=keep.device).expand(keep.shape[0], lead), keep + lead]
    if lead + image < length:
        parts.append(torch.arange(lead + image, length, device=keep.device).expand(keep.shape[0], -1))
    return torch.cat(parts, dim=1)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]`` for x of shape (B or 1, L, ...) and index (B, K): one gather."""
    return gather_axes(x, index, (1,))


def gather_axes(x: torch.Tensor, index: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """``x`` (B or 1, ...) with each of ``axes`` reduced to the kept positions ``index`` (B, K): a query axis
    and a key axis of an attention mask, say. One gather per axis."""
    if x.shape[0] != index.shape[0]:
        x = x.expand(index.shape[0], *x.shape[1:])
    for axis in axes:
        view = index.view(index.shape[0], *[index.shape[1] if d == axis else 1 for d in range(1, x.dim())])
        x = torch.take_along_dim(x, view, dim=axis)
    return x


def scatter_tokens(base: torch.Tensor, index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A copy of ``base`` (B, L, ...) with rows ``index`` (B, K) replaced by ``x`` (B, K, ...)."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    full = base.reshape(base.shape[0], base.shape[1], -1).to(flat.dtype)
    out = full.scatter(1, index.unsqueeze(-1).expand_as(flat), flat)
    return out.view(*base.shape[:2], *x.shape[2:])
