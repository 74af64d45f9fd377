"""An exponential moving average of a model's weights, kept in a plain copy of the model."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .checkpoints import gathered_parameters

__all__ = ["EMA"]


class EMA:
    """Exponential moving average of a model's parameters, kept in a copy of the model (`.module`).

    The decay warms up as min(decay, (1 + step) / (10 + step)), so short runs still average sensibly and a
    resumed run gets the same decay at the same step. Make it before `tokenroute.wrap`: the copy is then
    a plain backbone; its state_dict keys are the model's either way. Make it before sharding too (FSDP2, DeepSpeed):
    the copy stays whole, and each update gathers the shards or ZeRO-3's partitions (every rank updates).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self, step: int) -> float:
        """The decay applied at `step` (warmed up)."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move the average towards `model`'s parameters; buffers are copied as they are."""
        decay = self.current_decay(step)
        ema_params = [p for p in self.module.parameters()]
        with gathered_parameters(model):
            params = [_whole(p.detach()) for p in model.parameters()]
            torch._foreach_lerp_(ema_params, [p.to(e.dtype) for p, e in zip(params, ema_params)], 1.0 - decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter as one tensor: a DTensor shard (FSDP2) gathered whole (a collective: every rank updates its
    EMA), anything else as it is."""
    full = getattr(tensor, "full_tensor", None)
    return full() if full is not None else tensor
