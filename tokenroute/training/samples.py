"""Class-conditional sample grids from a model, with classifier-free and routing guidance."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.nn as nn

from tokenroute.sampling import guided_prediction

from .data import IMAGE_SIZE, NUM_CLASSES
from .tasks import Task

__all__ = ["class_labels", "sample_images"]


def class_labels(samples_per_class: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """0, 0, ..., 1, 1, ...: one row of the grid per class."""
    return torch.arange(NUM_CLASSES, device=device).repeat_interleave(samples_per_class)


@torch.no_grad()
def sample_images(model: nn.Module, task: Task, *, samples_per_class: int = 8, steps: int = 18,
                  cfg_scale: float = 1.5, routing: tuple[float, float, float] | None = None, seed: int = 0,
                  batch_size: int = 256, device: torch.device | str | None = None,
                  autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> torch.Tensor:
    """Class-conditional samples (NUM_CLASSES * samples_per_class, 1, 32, 32) in [-1, 1], one class per grid row.

    Runs the model in eval mode (unrouted: bitwise the plain backbone) with classifier-free guidance
    (`cfg_scale`, null label = num_classes) and, if `routing=(g1, g2, w)` and the model is wrapped, TREAD's
    routing guidance, through `tokenroute.sampling.guided_prediction`. The same seed gives the same noise.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    null = model.num_classes
    predict_fn = task.prediction_fn(model)

    def predict(x: torch.Tensor, t: Any, y: torch.Tensor) -> torch.Tensor:
        with autocast() if autocast is not None else contextlib.nullcontext():
            out = guided_prediction(model, x, t, y, null_label=null, cfg_scale=cfg_scale, routing=routing,
                                    model_fn=predict_fn)
        return out.float()

    labels = class_labels(samples_per_class, device)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), model.in_channels, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(device)
    out = []
    try:
        for start in range(0, len(labels), batch_size):
            sl = slice(start, start + batch_size)
            out.append(task.sample(predict, noise[sl], labels[sl], steps))
    finally:
        model.train(was_training)
    return torch.cat(out).clamp(-1, 1).cpu()
