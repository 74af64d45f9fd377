"""Samplers for the training objectives (EDM's Heun, rectified-flow Euler, a diffusers scheduler loop) and
class-conditional sample grids with classifier-free and routing guidance."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn

from tokenroute.sampling import guided_prediction

from .data import IMAGE_SIZE, NUM_CLASSES

if TYPE_CHECKING:
    from .tasks import Task

__all__ = ["class_labels", "edm_heun_sampler", "flow_euler_sampler", "sample_images", "scheduler_sampler"]


@torch.no_grad()
def edm_heun_sampler(denoise: Callable[..., torch.Tensor], noise: torch.Tensor, y: torch.Tensor, steps: int = 18,
                     sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1) over `steps` noise levels."""
    steps = max(int(steps), 2)
    i = torch.arange(steps, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]).tolist()
    x = noise.double() * sigmas[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoise(x.float(), s, y).double()) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d_next = (x_next - denoise(x_next.float(), s_next, y).double()) / s_next
            x_next = x + (s_next - s) * (0.5 * d + 0.5 * d_next)
        x = x_next
    return x.float()


@torch.no_grad()
def flow_euler_sampler(velocity: Callable[..., torch.Tensor], noise: torch.Tensor, y: torch.Tensor,
                       steps: int = 32) -> torch.Tensor:
    """Euler steps of the rectified-flow ODE from t = 1 (noise) to t = 0 (data); v = noise - x0."""
    ts = torch.linspace(1.0, 0.0, max(int(steps), 1) + 1).tolist()
    x = noise.float()
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * velocity(x, t, y).float()
    return x


@torch.no_grad()
def scheduler_sampler(predict: Callable[..., torch.Tensor], train_scheduler: Any, noise: torch.Tensor,
                      y: torch.Tensor, steps: int = 50, scheduler_cls: Any = None) -> torch.Tensor:
    """A diffusers scheduler loop (DDIM by default, eta 0) with the training scheduler's configuration."""
    if scheduler_cls is None:
        from diffusers import DDIMScheduler as scheduler_cls
    scheduler = scheduler_cls.from_config(train_scheduler.config)
    scheduler.set_timesteps(int(steps), device=noise.device)
    x = noise.float() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(predict(scheduler.scale_model_input(x, t), t, y).float(), t, x).prev_sample
    return x


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
