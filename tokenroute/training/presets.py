"""The reference backbones sized for 32x32 single-channel Fashion-MNIST, and routes as written on a command line."""

from __future__ import annotations

import argparse
from typing import Any, Sequence

import torch.nn as nn

from tokenroute.models import BACKBONES

from .data import IMAGE_SIZE, NUM_CLASSES

__all__ = [
    "BACKBONE_NAMES",
    "PRESETS",
    "PRESET_DEFAULTS",
    "PRESET_NAMES",
    "build_model",
    "format_routes",
    "model_config",
    "parse_routes",
    "stack_depth",
    "tread_routes",
]

BACKBONE_NAMES = tuple(BACKBONES)  # dit, uvit, mamba
PRESET_NAMES = ("tiny", "small", "base")
_DATA_SHAPE = dict(input_size=IMAGE_SIZE, in_channels=1, num_classes=NUM_CLASSES)
# tiny: CPU smoke runs (patch 4 -> 64 tokens); small: about DiT-S/2; base: about DiT-B/2 (patch 2 -> 256 tokens).
# U-ViT counts depth // 2 in-blocks, a middle block and depth // 2 out-blocks, so an odd depth is exact.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "dit": {
        "tiny": dict(patch_size=4, hidden_size=64, depth=6, num_heads=4),
        "small": dict(patch_size=2, hidden_size=384, depth=12, num_heads=6),
        "base": dict(patch_size=2, hidden_size=768, depth=12, num_heads=12),
    },
    "uvit": {
        "tiny": dict(patch_size=4, hidden_size=64, depth=7, num_heads=4),
        "small": dict(patch_size=2, hidden_size=384, depth=13, num_heads=6),
        "base": dict(patch_size=2, hidden_size=768, depth=13, num_heads=12),
    },
    "mamba": {
        "tiny": dict(patch_size=4, hidden_size=64, depth=6, headdim=32),
        "small": dict(patch_size=2, hidden_size=384, depth=12, headdim=64),
        "base": dict(patch_size=2, hidden_size=768, depth=12, headdim=64),
    },
}
# Training defaults per preset: per-device batch size and learning rate (small models take a higher one).
PRESET_DEFAULTS = {"tiny": dict(batch_size=32, lr=1e-3), "small": dict(batch_size=128, lr=1e-4),
                   "base": dict(batch_size=128, lr=1e-4)}


def model_config(backbone: str, preset: str) -> dict[str, Any]:
    """Constructor arguments of the reference backbone for this preset."""
    if backbone not in PRESETS:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONE_NAMES)}")
    if preset not in PRESETS[backbone]:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    return {**_DATA_SHAPE, **PRESETS[backbone][preset]}


def build_model(backbone: str, preset: str, **overrides: Any) -> nn.Module:
    """A fresh, unwrapped backbone (tokenroute.models) for 32x32 single-channel images with 10 classes."""
    return BACKBONES[backbone](**{**model_config(backbone, preset), **overrides})


def stack_depth(model: nn.Module) -> int:
    """Number of blocks in the stack that routes index (U-ViT: in-blocks, middle block, out-blocks)."""
    from tokenroute.core import find_stack

    return len(find_stack(model))


def tread_routes(depth: int, ratio: float = 0.5) -> list[tuple[int, int, float]]:
    """TREAD's default route for a depth-D stack, (2, D - 4, ratio); shallow stacks (D < 8) get (1, D - 2)."""
    if depth >= 8:
        return [(2, depth - 4, ratio)]
    if depth >= 3:
        return [(1, depth - 2, ratio)]
    raise ValueError(f"a stack of {depth} blocks is too shallow for a TREAD route")


def parse_routes(text: str) -> list[tuple[int, int, float]] | str | None:
    """argparse type for `START:END:RATIO[,START:END:RATIO...]`; also `none` (no routing) and `tread`
    (TREAD's rule for the model's depth, resolved later). Indices may be negative (from the end)."""
    text = text.strip()
    if text.lower() in ("", "none", "off"):
        return None
    if text.lower() == "tread":
        return "tread"
    routes = []
    for part in text.split(","):
        fields = part.strip().split(":")
        if len(fields) != 3:
            raise argparse.ArgumentTypeError(
                f"route {part.strip()!r} must be START:END:RATIO, e.g. 2:8:0.5 (END inclusive; several routes "
                "separated by commas), or 'tread' for TREAD's default, or 'none'")
        try:
            start, end, ratio = int(fields[0]), int(fields[1]), float(fields[2])
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"route {part.strip()!r}: START and END must be integers and RATIO a number, e.g. 2:8:0.5") from None
        if not 0.0 <= ratio < 1.0:
            raise argparse.ArgumentTypeError(
                f"route {part.strip()!r}: RATIO {ratio} must be in [0, 1): the fraction of tokens that skip the route")
        routes.append((start, end, ratio))
    return routes


def format_routes(routes: Sequence[tuple[int, int, float]] | None) -> str:
    """Routes in the spelling `parse_routes` reads: "2:8:0.5,..." or "none"."""
    return ",".join(f"{s}:{e}:{r:g}" for s, e, r in routes) if routes else "none"
