"""Losses for routed training: per-token objectives and the combinator that follows the routes."""

from .combine import MODES, combine
from .objectives import (
    EDM,
    EpsilonPrediction,
    FlowMatching,
    NoisyBatch,
    Objective,
    VPrediction,
    from_scheduler,
    mae_loss,
    mae_target,
)
from .patches import patchify_pixels, per_token, unpatchify_pixels

__all__ = [
    "MODES",
    "EDM",
    "EpsilonPrediction",
    "FlowMatching",
    "NoisyBatch",
    "Objective",
    "VPrediction",
    "combine",
    "from_scheduler",
    "mae_loss",
    "mae_target",
    "patchify_pixels",
    "per_token",
    "unpatchify_pixels",
]
