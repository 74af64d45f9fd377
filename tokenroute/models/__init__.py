"""Reference diffusion backbones: DiT (adaLN-zero transformer), U-ViT (long-skip ViT with prefix
tokens) and a pure-PyTorch diffusion Mamba (causal selective scan), all with
``forward(x (B, C, H, W), t (B,), y (B,)) -> (B, C_out, H, W)``.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .dit import DIT_PRESETS, DiT, DiTBlock
from .layers import get_2d_sincos_pos_embed, patchify, unpatchify
from .mamba import MAMBA_PRESETS, DiffusionMamba, MambaBlock, MambaMixer, selective_scan, selective_scan_ref
from .uvit import UVIT_PRESETS, UViT, UViTBlock

__all__ = [
    "BACKBONES",
    "DIT_PRESETS",
    "MAMBA_PRESETS",
    "UVIT_PRESETS",
    "DiT",
    "DiTBlock",
    "DiffusionMamba",
    "MambaBlock",
    "MambaMixer",
    "UViT",
    "UViTBlock",
    "build_backbone",
    "get_2d_sincos_pos_embed",
    "patchify",
    "selective_scan",
    "selective_scan_ref",
    "unpatchify",
]

BACKBONES: dict[str, type[nn.Module]] = {"dit": DiT, "uvit": UViT, "mamba": DiffusionMamba}


def build_backbone(name: str, preset: str, **overrides: Any) -> nn.Module:
    """Build a reference backbone by family name ("dit", "uvit", "mamba") and preset name, e.g.
    ``build_backbone("dit", "DiT-B/2", num_classes=1000)``; keyword arguments override preset fields."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name].from_preset(preset, **overrides)
