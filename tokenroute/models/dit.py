"""DiT: a class-conditional diffusion transformer with adaLN-zero blocks (Peebles & Xie, 2023).

Parameter names follow the reference implementation, so its checkpoints load with ``load_state_dict``
(the fixed position embedding is a non-persistent buffer here and is simply not in the state dict).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .layers import (
    Attention,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    from_preset,
    get_2d_sincos_pos_embed,
    modulate,
    unpatchify,
)

__all__ = ["DIT_PRESETS", "DiT", "DiTBlock", "FinalLayer"]

DIT_PRESETS: dict[str, dict[str, Any]] = {
    "DiT-S/2": dict(hidden_size=384, depth=12, num_heads=6, patch_size=2),
    "DiT-B/2": dict(hidden_size=768, depth=12, num_heads=12, patch_size=2),
    "DiT-L/2": dict(hidden_size=1024, depth=24, num_heads=16, patch_size=2),
    "DiT-XL/2": dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2),
    "tiny": dict(hidden_size=64, depth=4, num_heads=4, input_size=8, patch_size=2, in_channels=1),
}


def _gelu_tanh() -> nn.Module:
    return nn.GELU(approximate="tanh")


class DiTBlock(nn.Module):
    """Pre-norm attention + MLP, each modulated and gated by the conditioning vector (adaLN-zero)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=_gelu_tanh)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D) tokens, c: (B, D) conditioning -> (B, N, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map from each token to its patch of ``p * p * C_out`` values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer: ``forward(x (B, C, H, W), t (B,) float, y (B,) long) -> (B, C_out, H, W)``.

    ``y == num_classes`` is the null label (classifier-free guidance; see ``LabelEmbedder``).
    ``learn_sigma`` doubles the output channels (predicted noise and variance, as in ADM/DiT).
    """

    num_prefix_tokens = 0

    def __init__(self, input_size: int | tuple[int, int] = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 384, depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0,
                 num_classes: int = 10, learn_sigma: bool = False) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes = num_classes
        self.hidden_size = hidden_size
        self.learn_sigma = learn_sigma

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.grid_size = self.x_embedder.grid_size
        pos = get_2d_sincos_pos_embed(hidden_size, *self.grid_size).unsqueeze(0)
        self.register_buffer("pos_embed", pos, persistent=False)

        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "DiT":
        """Build a named configuration from ``DIT_PRESETS``; keyword arguments override its fields."""
        return from_preset(cls, DIT_PRESETS, name, overrides)

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, and adaLN-zero (every modulation and the output layer
        start at zero, so each block starts as the identity and the model output starts at zero)."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images, timesteps, labels -> patch tokens (B, N, D) with position embedding, conditioning (B, D)."""
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        return tokens, c

    def head(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, D) and conditioning -> images (B, C_out, H, W)."""
        out = self.final_layer(tokens, c)
        return unpatchify(out, self.patch_size, *self.grid_size, self.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, c = self.embed(x, t, y)
        for block in self.blocks:
            x = block(x, c)
        return self.head(x, c)
