"""The one-line conveniences: ``wrap`` (TREAD), ``mask`` (MaskDiT, optionally with TREAD routes in its
decoder) and ``unwrap`` (every method off). Each is a thin call of the methods' own apply/remove."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from .core.patches import registry_of
from .methods.masking import Decoder, MaskingConfig, apply_masking, remove_masking
from .methods.tread import TreadConfig, apply_tread


def wrap(
    model: nn.Module,
    routes: Sequence[Any],
    *,
    blocks: str | Sequence[str] | None = None,
    seed: int | None = None,
    prefix_tokens: int | None = None,
    protect: torch.Tensor | Any = None,
    mechanism: str = "auto",
) -> nn.Module:
    """Turn on TREAD token routing for ``model`` in place and return it (see ``TreadConfig`` for the
    arguments). Composes with other methods already applied, e.g. masked training."""
    return apply_tread(model, TreadConfig(routes, seed=seed, prefix_tokens=prefix_tokens, protect=protect,
                                          mechanism=mechanism, blocks=blocks))


def mask(
    model: nn.Module,
    ratio: float = 0.5,
    decoder: int | Decoder = 2,
    *,
    routes: Sequence[Any] = (),
    blocks: str | Sequence[str] | None = None,
    seed: int | None = None,
    prefix_tokens: int | None = None,
    mechanism: str = "auto",
) -> nn.Module:
    """Turn on MaskDiT masked training for ``model`` in place and return it; undo with ``tokenroute.unwrap``.

    ratio: fraction of the tokens dropped per sample in training, in [0, 1).
    decoder: ``k`` (the last k blocks of the stack decode) or ``Decoder(depth, ...)`` (an added stack).
    routes: TREAD routes to apply as well (inside the decoder only: they may not overlap the encoder).
    """
    apply_masking(model, MaskingConfig(ratio, decoder, seed=seed, prefix_tokens=prefix_tokens, mechanism=mechanism,
                                       blocks=blocks))
    if routes:
        try:
            wrap(model, routes, seed=seed, prefix_tokens=prefix_tokens, mechanism=mechanism)
        except Exception:
            remove_masking(model)  # nothing half-applied
            raise
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Remove every tokenroute method: the owner's original forward comes back exactly, hooks, graphs and
    added submodules go."""
    registry = registry_of(model)
    for patch in reversed(list(registry)):
        registry.remove(patch.name)
    return model
