"""Small building blocks shared by the reference backbones (DiT, U-ViT, diffusion Mamba).

Token order convention used everywhere in ``tokenroute.models``: an image of ``h x w`` patches becomes
``h * w`` tokens in row-major order, token ``i * w + j`` being the patch at row ``i``, column ``j``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..patchify import patchify_pixels, unpatchify_pixels

__all__ = [
    "Attention",
    "LabelEmbedder",
    "Mlp",
    "PatchEmbed",
    "TimestepEmbedder",
    "get_2d_sincos_pos_embed",
    "modulate",
    "patchify",
    "prepend_tokens",
    "to_2tuple",
    "tokens_to_image",
    "unpatchify",
]


def to_2tuple(size: int | tuple[int, int]) -> tuple[int, int]:
    """``8 -> (8, 8)``; a pair is returned as a tuple."""
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def grid_size(input_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Patch grid (rows, cols) of an input, checking that the patch size divides it."""
    h, w = to_2tuple(input_size)
    if h % patch_size or w % patch_size:
        raise ValueError(f"input size {(h, w)} is not divisible by patch size {patch_size}")
    return h // patch_size, w // patch_size


# --------------------------------------------------------------------------------------------------
# Patches <-> tokens
# --------------------------------------------------------------------------------------------------


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Cut images into non-overlapping ``p x p`` patches: (B, C, H, W) -> (B, (H/p) * (W/p), p * p * C).

    Tokens are in row-major (h, w) order. Each token's features are laid out as (p, p, C), i.e. feature
    ``(i * p + j) * C + c`` is pixel ``(i, j)`` of the patch in channel ``c`` (the layout DiT's final
    linear layer produces, so ``unpatchify`` of a head output needs no extra permutation). The layout is
    the one per-token losses use (``tokenroute.patchify.patchify_pixels``).
    """
    return patchify_pixels(x, p)


def unpatchify(tokens: torch.Tensor, p: int, h: int, w: int, c: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, h * w, p * p * c) -> (B, c, h * p, w * p).

    ``h`` and ``w`` are the patch-grid sizes (number of patch rows and columns), not pixel sizes.
    Tokens must be in row-major order with per-token layout (p, p, c).
    """
    b, n, d = tokens.shape
    if n != h * w or d != p * p * c:
        raise ValueError(
            f"cannot unpatchify tokens of shape {tuple(tokens.shape)} into a {h}x{w} grid of "
            f"{p}x{p}x{c} patches (expected ({b}, {h * w}, {p * p * c}))"
        )
    return unpatchify_pixels(tokens, p, (h * p, w * p))


def prepend_tokens(patches: torch.Tensor, *prefix: torch.Tensor) -> torch.Tensor:
    """``[prefix[0], prefix[1], ..., patches...]``: (B, D) vectors become leading tokens of (B, N, D) patches."""
    lead = [p.unsqueeze(1).to(patches.dtype) for p in prefix]
    return torch.cat([*lead, patches], dim=1)


class PrefixTokenBackbone(nn.Module):
    """What U-ViT and the diffusion Mamba share: tokens ``[time, label, patches...]`` with a learned position
    embedding over all of them. The two prefix tokens are never routed (``num_prefix_tokens``)."""

    num_prefix_tokens = 2

    def _init_embedding(self, input_size: int | tuple[int, int], patch_size: int, in_channels: int,
                        hidden_size: int, num_classes: int) -> None:
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.num_classes = num_classes
        self.hidden_size = hidden_size
        self.patch_embed = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.grid_size = self.patch_embed.grid_size
        self.time_embed = TimestepEmbedder(hidden_size)
        self.label_emb = LabelEmbedder(num_classes, hidden_size)
        num_tokens = self.num_prefix_tokens + self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, hidden_size))

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Images, timesteps, labels -> tokens ``[time, label, patches...]`` (B, 2 + N, D) with position embedding."""
        return prepend_tokens(self.patch_embed(x), self.time_embed(t), self.label_emb(y)) + self.pos_embed


def tokens_to_image(tokens: torch.Tensor, num_prefix_tokens: int, p: int, grid: tuple[int, int],
                    c: int) -> torch.Tensor:
    """Per-token patch predictions (B, prefix + h * w, p * p * c) -> images, dropping the prefix tokens."""
    return unpatchify(tokens[:, num_prefix_tokens:], p, grid[0], grid[1], c)


class PatchEmbed(nn.Module):
    """Patchify with a stride-``p`` convolution: (B, C, H, W) -> (B, N, D), tokens in row-major order.

    Equivalent to a linear layer on :func:`patchify` tokens with weight ``proj.weight.permute(0, 2, 3, 1)``.
    """

    def __init__(self, img_size: int | tuple[int, int] = 32, patch_size: int = 2, in_chans: int = 4,
                 embed_dim: int = 384, bias: bool = True) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.grid_size = grid_size(img_size, patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input spatial size {tuple(x.shape[-2:])} does not match the model's {self.img_size}")
        # contiguous: a transposed view would make the whole residual stream strided, every norm copy it and
        # every elementwise op run its slow strided kernel
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------


def _1d_sincos(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (MAE / DiT): a float32 tensor (grid_h * grid_w, dim).

    Rows follow the row-major token order. As in the MAE/DiT reference code, the first half of the
    channels encodes the column (w) coordinate and the second half the row (h) coordinate, so the
    values match DiT checkpoints.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos position embedding needs dim divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb = torch.cat([_1d_sincos(dim // 2, cols.flatten()), _1d_sincos(dim // 2, rows.flatten())], dim=1)
    return emb.float()


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal features followed by a 2-layer MLP (DiT).

    Timesteps are floats of any scale (``[0, 1000)`` integers from DDPM or ``[0, 1]`` flow-matching
    times both work); the sinusoid is computed in float32 even under autocast.
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(B,) timesteps -> (B, dim) float32 ``[cos, sin]`` features at geometric frequencies."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.timestep_embedding(t, self.frequency_embedding_size, self.max_period)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors. The table has ``num_classes + 1`` rows: the last row (label
    ``num_classes``) is the null / unconditional class.

    Label dropout for classifier-free guidance is deliberately *not* done here: the trainer replaces
    dropped labels by ``num_classes`` before calling the model, and sampling passes ``num_classes`` for
    the unconditional branch. Keeping the model deterministic makes routed and unrouted runs comparable.
    """

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


# --------------------------------------------------------------------------------------------------
# Transformer parts
# --------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention over (B, N, D) tokens with ``F.scaled_dot_product_attention``
    (flash / memory-efficient kernels where available). Parameter names follow timm (``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Two-layer MLP ``fc1 -> act -> fc2`` (timm naming)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: type[nn.Module] | None = None) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer() if act_layer is not None else nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens (B, N, D) by per-sample (B, D) shift and scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def from_preset(cls: type, presets: Mapping[str, Mapping[str, Any]], name: str, overrides: Mapping[str, Any]):
    """``cls(**presets[name], **overrides)`` with a clear error for unknown preset names."""
    if name not in presets:
        raise ValueError(f"unknown {cls.__name__} preset {name!r}; choose one of {sorted(presets)}")
    return cls(**{**presets[name], **overrides})
