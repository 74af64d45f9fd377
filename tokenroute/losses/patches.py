"""Per-pixel losses -> per-token losses, in the backbones' patch order (``tokenroute.patchify``)."""

from __future__ import annotations

from torch import Tensor

from ..patchify import patchify_pixels, unpatchify_pixels

__all__ = ["patchify_pixels", "per_token", "unpatchify_pixels"]


def per_token(loss: Tensor, patch_size: int | tuple[int, int], frames: int | None = None) -> Tensor:
    """Per-pixel loss (B, C, [T,] H, W) -> per-token loss (B, N): mean over channels and each patch's pixels.

    The token order is the one `tokenroute.routing_masks` uses for patch-embedded backbones, so the result
    goes straight into `combine`.
    """
    return patchify_pixels(loss, patch_size, frames).mean(-1)
