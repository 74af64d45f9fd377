"""Reduce a per-token loss to one number, given which tokens skipped which route.

TREAD's first release averages the loss, for each route, over the tokens that route processed, then over
the routes; its current code takes the plain mean. MaskDiT averages over the tokens no route dropped and
adds an MAE term over the dropped ones. All three are one masked mean with different token selections.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..utils import describe_value

MODES = ("all", "routes", "visible")


def _sample_mean(loss: Tensor, keep: Tensor) -> Tensor:
    """Mean over samples of each sample's mean over its kept tokens; a sample keeping none adds zero.

    `torch.where` (not a product) gives the excluded tokens an exact zero gradient, even where the loss is
    inf or NaN there.
    """
    per_sample = torch.where(keep, loss, 0.0).sum(1) / keep.sum(1).clamp_min(1)
    return per_sample.mean()


def _check(per_token_loss: Tensor, masks: Sequence[Tensor], mode: str, mae: Tensor | None, mae_weight: float):
    if not isinstance(per_token_loss, Tensor) or per_token_loss.ndim != 2 or not per_token_loss.is_floating_point():
        raise ValueError(
            f"per_token_loss must be a float (batch, tokens) tensor, got {describe_value(per_token_loss)}; "
            "turn a per-pixel loss into one with tokenroute.losses.per_token(loss, patch_size)."
        )
    if isinstance(masks, Tensor) or not isinstance(masks, Sequence):
        raise TypeError(
            f"masks must be a list of (batch, tokens) bool tensors, one per route, got {type(masks).__name__}; "
            "pass tokenroute.routing_masks(model), or wrap a single mask in a list."
        )
    shape = tuple(per_token_loss.shape)
    for i, mask in enumerate(masks):
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"masks[{i}] must be a bool tensor (True = skipped the route), got {describe_value(mask)}.")
        if tuple(mask.shape) != shape:
            raise ValueError(
                f"masks[{i}] has shape {tuple(mask.shape)} but per_token_loss has {shape}; masks must come from "
                "the same forward pass (same batch) and count the same routable tokens."
            )
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; choose one of {', '.join(map(repr, MODES))}.")
    if mae_weight < 0:
        raise ValueError(f"mae_weight must be >= 0, got {mae_weight}.")
    if mae is None and mae_weight > 0:
        raise ValueError(f"mae_weight={mae_weight} needs an mae tensor; pass mae=mae_loss(...) or set mae_weight=0.")
    if mae is not None and (not isinstance(mae, Tensor) or tuple(mae.shape) != shape):
        raise ValueError(
            f"mae is {describe_value(mae)} but per_token_loss has shape {shape}; reduce it per token first with "
            "tokenroute.losses.mae_loss(pred_patches, target)."
        )


def combine(
    per_token_loss: Tensor,
    masks: Sequence[Tensor],
    mode: str = "routes",
    mae: Tensor | None = None,
    mae_weight: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Combine a (B, N) per-token loss into a scalar, following the routes a forward pass applied.

    Args:
        per_token_loss: (B, N) float loss per routable token, in the model's token order.
        masks: one (B, N) bool tensor per route, True where the token skipped that route, as returned by
            `tokenroute.routing_masks(model)`; may be empty.
        mode: which tokens the denoising term averages over:
            "all": every token (TREAD's current code).
            "routes": for each route the tokens it processed, then the mean over routes (TREAD's first
                release). Equals "all" when no mask is given or none has a True entry.
            "visible": the tokens that skipped no route (MaskDiT's loss over visible tokens).
        mae: optional (B, N) per-token MAE loss (`mae_loss`), averaged over the tokens that skipped any
            route; zero where none did. It stays in the graph even at weight 0, so distributed training
            sees the MAE head used.
        mae_weight: weight of the MAE term (MaskDiT uses 0.1).

    Every mean is per sample first, then over the batch (as MaskDiT); a sample with no selected token adds
    zero. Excluded tokens get exactly zero gradient.

    Returns:
        `(total, parts)`: `total = denoise + mae_weight * mae`, and the detached parts "denoise", "total" and,
        when `mae` is given, the unweighted "mae", for logging.
    """
    _check(per_token_loss, masks, mode, mae, mae_weight)
    all_tokens = torch.ones_like(per_token_loss, dtype=torch.bool)
    skipped = torch.stack(list(masks)).any(0) if masks else ~all_tokens

    if mode == "routes" and masks:
        route_means = torch.stack([_sample_mean(per_token_loss, ~mask) for mask in masks])
        # Averaged as offsets from the first route, so that identical route terms (no token routed) give
        # the plain mean bit for bit, whatever the number of routes.
        denoise = route_means[0] + (route_means - route_means[0]).mean()
    else:
        denoise = _sample_mean(per_token_loss, ~skipped if mode == "visible" else all_tokens)

    parts = {"denoise": denoise}
    total = denoise
    if mae is not None:
        parts["mae"] = _sample_mean(mae, skipped)
        total = total + mae_weight * parts["mae"]
    parts["total"] = total
    return total, {name: value.detach() for name, value in parts.items()}
