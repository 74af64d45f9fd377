"""Training objectives as the examples use them: the tokenroute.losses objective, the backbone's time scale and
the matching sampler, plus the per-step extras (label dropout, MaskDiT's MAE term)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from tokenroute.losses import EDM, FlowMatching

from .samplers import edm_heun_sampler, flow_euler_sampler, scheduler_sampler

__all__ = ["Task", "drop_labels", "mae_term", "make_task"]


@dataclass
class Task:
    """An objective (tokenroute.losses), how the backbone sees its time input, and the sampler that goes
    with it. `time_scale` multiplies the objective's time before the backbone's sinusoidal embedding
    (EDM's c_noise = log(sigma) / 4 lies in about [-1.6, 1.1] and flow time in [0, 1], where the DiT-style
    sinusoidal embedding made for 0..999 hardly varies; DDPM timesteps are 0..999 already)."""

    name: str
    objective: Any
    time_scale: float = 1.0
    scheduler: Any = None  # diffusers DDPMScheduler for "eps"

    def backbone_fn(self, model: Callable[..., Any]) -> Callable[..., Any]:
        """The model as the objective calls it, f(x, t, y), with the time scaled for its embedding."""
        if self.time_scale == 1.0:
            return model
        scale = self.time_scale
        return lambda x, t, y: model(x, t * scale, y)

    def prediction_fn(self, model: Callable[..., Any]) -> Callable[..., torch.Tensor]:
        """What the sampler consumes, as f(x, t, y): EDM's denoised estimate, flow velocity, or noise."""
        fn = self.backbone_fn(model)
        if self.name == "edm":
            return lambda x, sigma, y: self.objective.precondition(fn, x, sigma, y)
        return fn

    def sample(self, predict: Callable[..., torch.Tensor], noise: torch.Tensor, y: torch.Tensor, steps: int
               ) -> torch.Tensor:
        """Run the objective's sampler from `noise` (standard normal) with `predict(x, t, y)`."""
        if self.name == "edm":
            return edm_heun_sampler(predict, noise, y, steps)
        if self.name == "flow":
            return flow_euler_sampler(predict, noise, y, steps)
        return scheduler_sampler(predict, self.scheduler, noise, y, steps)


def make_task(name: str) -> Task:
    """`edm` (EDM: P_mean -1.2, P_std 1.2, sigma_data 0.5), `flow` (rectified flow), `eps` (DDPM noise
    prediction with diffusers' DDPMScheduler, 1000 linear-beta steps)."""
    if name == "edm":
        return Task("edm", EDM(P_mean=-1.2, P_std=1.2, sigma_data=0.5), time_scale=250.0)
    if name == "flow":
        return Task("flow", FlowMatching(), time_scale=1000.0)
    if name == "eps":
        try:
            from diffusers import DDPMScheduler
        except ImportError:
            raise SystemExit("--objective eps needs diffusers (pip install 'tokenroute[diffusers]')") from None
        from tokenroute.losses import EpsilonPrediction

        scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon")
        return Task("eps", EpsilonPrediction(scheduler), scheduler=scheduler)
    raise ValueError(f"unknown objective {name!r}; choose edm, flow or eps")


def drop_labels(labels: torch.Tensor, probability: float, null_label: int, generator: torch.Generator) -> torch.Tensor:
    """Label dropout for classifier-free guidance: each label becomes the null label with this probability."""
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < probability
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def mae_term(prediction: torch.Tensor, batch: Any, patch_size: int) -> torch.Tensor:
    """MaskDiT's per-token MAE loss (B, N): the prediction's patches against the normalised noisy input's,
    for ``tokenroute.losses.combine(..., mae=...)``."""
    from tokenroute.losses import mae_loss, mae_target, patchify_pixels

    return mae_loss(patchify_pixels(prediction.float(), patch_size), mae_target(batch.model_input.float(), patch_size))
