"""U-ViT: a ViT with long skip connections for diffusion (Bao et al., 2023).

Time and label enter as two prefix tokens ``[time, label, patches...]`` (never routed), and the
``depth // 2`` input blocks feed the ``depth // 2`` output blocks through skips in last-in, first-out
order, around one middle block. Stack order (for routes): ``in_blocks``, ``mid_block``, ``out_blocks``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .layers import Attention, Mlp, PrefixTokenBackbone, from_preset, tokens_to_image

__all__ = ["UVIT_PRESETS", "UViT", "UViTBlock"]

UVIT_PRESETS: dict[str, dict[str, Any]] = {
    "U-ViT-S/2": dict(hidden_size=512, depth=13, num_heads=8, input_size=32, patch_size=2, in_channels=4),
    "U-ViT-M/2": dict(hidden_size=768, depth=17, num_heads=12, input_size=32, patch_size=2, in_channels=4),
    "tiny": dict(hidden_size=64, depth=5, num_heads=4, input_size=8, patch_size=2, in_channels=1),
}


class UViTBlock(nn.Module):
    """Pre-norm attention + MLP. A skip block (``skip=True``) first fuses the long skip:
    ``x = skip_linear(cat([x, skip], -1))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 skip: bool = False) -> None:
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, D); skip: (B, L, D) tokens from the matching input block (skip blocks only)."""
        if self.skip_linear is not None:
            if skip is None:
                raise ValueError("this UViTBlock is a skip block and needs the `skip` tokens")
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class UViT(PrefixTokenBackbone):
    """U-ViT: ``forward(x (B, C, H, W), t (B,) float, y (B,) long) -> (B, C, H, W)``.

    ``depth`` counts blocks: ``depth // 2`` input blocks, one middle block, ``depth // 2`` output blocks
    (an odd depth is exact; an even one gives ``depth + 1`` blocks, as in the U-ViT code).
    ``y == num_classes`` is the null label (see ``LabelEmbedder``).
    """

    def __init__(self, input_size: int | tuple[int, int] = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 512, depth: int = 13, num_heads: int = 8, mlp_ratio: float = 4.0,
                 num_classes: int = 10, qkv_bias: bool = False, use_final_conv: bool = True) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._init_embedding(input_size, patch_size, in_channels, hidden_size, num_classes)

        # Registration order is execution order: in_blocks, mid_block, out_blocks.
        n_side = depth // 2
        self.in_blocks = nn.ModuleList(
            [UViTBlock(hidden_size, num_heads, mlp_ratio, qkv_bias) for _ in range(n_side)])
        self.mid_block = UViTBlock(hidden_size, num_heads, mlp_ratio, qkv_bias)
        self.out_blocks = nn.ModuleList(
            [UViTBlock(hidden_size, num_heads, mlp_ratio, qkv_bias, skip=True) for _ in range(n_side)])

        self.norm = nn.LayerNorm(hidden_size)
        self.decoder_pred = nn.Linear(hidden_size, patch_size * patch_size * in_channels)
        self.final_layer = (nn.Conv2d(in_channels, in_channels, 3, padding=1) if use_final_conv
                            else nn.Identity())
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "UViT":
        """Build a named configuration from ``UVIT_PRESETS``; keyword arguments override its fields."""
        return from_preset(cls, UVIT_PRESETS, name, overrides)

    def initialize_weights(self) -> None:
        """U-ViT's initialisation: truncated-normal (std 0.02) linears and position embedding."""

        def _init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init)
        nn.init.normal_(self.label_emb.embedding_table.weight, std=0.02)

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, 2 + N, D) -> images: norm, drop the prefix tokens, linear to patches, 3x3 conv."""
        x = self.decoder_pred(self.norm(tokens))
        x = tokens_to_image(x, self.num_prefix_tokens, self.patch_size, self.grid_size, self.out_channels)
        return self.final_layer(x)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.embed(x, t, y)
        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())
        return self.head(x)
