"""Samplers for the training objectives: EDM's Heun, rectified-flow Euler, a diffusers scheduler loop."""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["edm_heun_sampler", "flow_euler_sampler", "scheduler_sampler"]


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
