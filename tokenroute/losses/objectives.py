"""Diffusion training objectives that yield per-token losses for `combine`.

Every objective follows three steps, so a trainer does not care which one it runs::

    batch = objective.prepare(x0, generator=g)             # noise, time, target, weight
    pred = objective.predict(model, batch, y)              # model(x_t, t, y), EDM adds preconditioning
    loss, parts = combine(objective.per_token_loss(pred, batch, patch_size=2), tokenroute.routing_masks(model))

The MaskDiT MAE term: `mae_loss(patchify_pixels(pred, 2), mae_target(batch.model_input, 2))`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from ..utils import describe_value, output_tensor
from .patches import patchify_pixels, per_token


@dataclass
class NoisyBatch:
    """One noised training batch.

    Attributes:
        model_input: the noisy sample x_t the backbone sees (EDM scales it by c_in inside `predict`).
        timestep: (B,) time input: integer DDPM timesteps, EDM sigma, or flow time t in [0, 1].
        target: what the prediction regresses to, shaped like x0.
        weight: per-sample loss weight, broadcastable to x0.
        noise: the Gaussian noise drawn.
        x0: the clean sample.
    """

    model_input: Tensor
    timestep: Tensor
    target: Tensor
    weight: Tensor
    noise: Tensor
    x0: Tensor


def _draw(sampler: Callable[..., Tensor], *args: Any, like: Tensor, generator: torch.Generator | None, **kwargs: Any):
    """Call a torch sampler on the generator's device (a CPU generator may feed GPU data), then move to `like`."""
    device = like.device if generator is None else generator.device
    kwargs.setdefault("dtype", like.dtype)
    return sampler(*args, generator=generator, device=device, **kwargs).to(like.device)


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1), broadcastable against `like`."""
    return values.reshape(-1, *[1] * (like.ndim - 1))


def _check_x0(x0: Tensor) -> None:
    if not isinstance(x0, Tensor) or not x0.is_floating_point() or x0.ndim < 2:
        raise ValueError(f"x0 must be a float tensor (B, C, ...), got {describe_value(x0)}.")


class Objective:
    """Common interface: `prepare` noises a batch, `predict` runs the model, `per_token_loss` scores it."""

    def prepare(self, x0: Tensor, generator: torch.Generator | None = None) -> NoisyBatch:
        raise NotImplementedError

    def predict(self, model_fn: Callable[..., Any], batch: NoisyBatch, *args: Any, **kwargs: Any) -> Tensor:
        """The model's prediction for `batch`: `model_fn(batch.model_input, batch.timestep, *args, **kwargs)`."""
        return output_tensor(model_fn(batch.model_input, batch.timestep, *args, **kwargs))

    def per_pixel_loss(self, prediction: Tensor, batch: NoisyBatch) -> Tensor:
        """`weight * (prediction - target) ** 2`, shaped like x0."""
        if prediction.shape != batch.target.shape:
            raise ValueError(
                f"prediction has shape {tuple(prediction.shape)} but the target has {tuple(batch.target.shape)}; "
                "a backbone that also predicts variance (learn_sigma) should pass only its first C channels."
            )
        return batch.weight * (prediction - batch.target) ** 2

    def per_token_loss(
        self, prediction: Tensor, batch: NoisyBatch, patch_size: int | tuple[int, int], frames: int | None = None
    ) -> Tensor:
        """(B, N) loss per token in the model's patch order, ready for `combine`."""
        return per_token(self.per_pixel_loss(prediction, batch), patch_size, frames)


@dataclass
class _SchedulerObjective(Objective):
    """Noise with a diffusers scheduler (`add_noise`, `config.num_train_timesteps`), as diffusers' trainers do."""

    scheduler: Any
    prediction_type: ClassVar[str]

    def __post_init__(self) -> None:
        config = getattr(self.scheduler, "config", None)
        if not hasattr(self.scheduler, "add_noise") or not hasattr(config, "num_train_timesteps"):
            raise TypeError(
                f"{type(self).__name__} needs a diffusers noise scheduler with add_noise and "
                f"config.num_train_timesteps (e.g. DDPMScheduler), got {type(self.scheduler).__name__}."
            )
        configured = getattr(config, "prediction_type", self.prediction_type)
        if configured != self.prediction_type:
            raise ValueError(
                f"{type(self).__name__} trains prediction_type {self.prediction_type!r} but the scheduler is "
                f"configured for {configured!r}, so sampling would misread the model; use from_scheduler(scheduler)."
            )

    def target(self, x0: Tensor, noise: Tensor, timestep: Tensor) -> Tensor:
        raise NotImplementedError

    def prepare(self, x0: Tensor, generator: torch.Generator | None = None) -> NoisyBatch:
        _check_x0(x0)
        noise = _draw(torch.randn, x0.shape, like=x0, generator=generator)
        steps = self.scheduler.config.num_train_timesteps
        timestep = _draw(torch.randint, 0, steps, (x0.shape[0],), like=x0, generator=generator, dtype=torch.long)
        return NoisyBatch(
            model_input=self.scheduler.add_noise(x0, noise, timestep),
            timestep=timestep,
            target=self.target(x0, noise, timestep),
            weight=_per_sample(torch.ones_like(timestep, dtype=x0.dtype), x0),
            noise=noise,
            x0=x0,
        )


class EpsilonPrediction(_SchedulerObjective):
    """The model predicts the noise (DDPM, DiT)."""

    prediction_type: ClassVar[str] = "epsilon"

    def target(self, x0: Tensor, noise: Tensor, timestep: Tensor) -> Tensor:
        return noise


class VPrediction(_SchedulerObjective):
    """The model predicts the velocity `sqrt(a) * noise - sqrt(1 - a) * x0` (`scheduler.get_velocity`)."""

    prediction_type: ClassVar[str] = "v_prediction"

    def target(self, x0: Tensor, noise: Tensor, timestep: Tensor) -> Tensor:
        return self.scheduler.get_velocity(x0, noise, timestep)


def from_scheduler(scheduler: Any) -> EpsilonPrediction | VPrediction:
    """The objective that matches `scheduler.config.prediction_type`, so training and sampling agree."""
    kinds = {cls.prediction_type: cls for cls in (EpsilonPrediction, VPrediction)}
    kind = getattr(getattr(scheduler, "config", None), "prediction_type", None)
    if kind not in kinds:
        raise ValueError(
            f"scheduler.config.prediction_type is {kind!r}; supported: {', '.join(map(repr, kinds))}. "
            "Configure the scheduler with one of them."
        )
    return kinds[kind](scheduler)


@dataclass
class EDM(Objective):
    """Karras et al.'s EDM: log-normal sigma, preconditioned denoiser D(x; sigma), loss weight.

    `timestep` in the batch is sigma; `predict` (or `precondition` in a sampler) turns any backbone taking
    (x, t, y) into the denoiser `c_skip * x + c_out * F(c_in * x, c_noise, y)`, whose target is x0.
    """

    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5

    def __post_init__(self) -> None:
        if self.P_std <= 0 or self.sigma_data <= 0:
            raise ValueError(f"P_std and sigma_data must be > 0, got P_std={self.P_std}, sigma_data={self.sigma_data}.")

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) for noise level `sigma`."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2: unit loss scale at every sigma."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def prepare(self, x0: Tensor, generator: torch.Generator | None = None) -> NoisyBatch:
        _check_x0(x0)
        sigma = (_draw(torch.randn, (x0.shape[0],), like=x0, generator=generator) * self.P_std + self.P_mean).exp()
        noise = _draw(torch.randn, x0.shape, like=x0, generator=generator)
        s = _per_sample(sigma, x0)
        return NoisyBatch(
            model_input=x0 + s * noise, timestep=sigma, target=x0, weight=self.loss_weight(s), noise=noise, x0=x0
        )

    def precondition(
        self, model_fn: Callable[..., Any], x_noisy: Tensor, sigma: Tensor | float, *args: Any, **kwargs: Any
    ) -> Tensor:
        """Denoised estimate D(x_noisy; sigma); `sigma` is a float or (B,), extra arguments go to the model."""
        sigma = torch.as_tensor(sigma, dtype=x_noisy.dtype, device=x_noisy.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x_noisy.shape[0])
        if sigma.shape != (x_noisy.shape[0],):
            raise ValueError(f"sigma must be a scalar or shaped ({x_noisy.shape[0]},), got {tuple(sigma.shape)}.")
        c_skip, c_out, c_in, c_noise = self.scalings(_per_sample(sigma, x_noisy))
        out = output_tensor(model_fn(c_in * x_noisy, c_noise.flatten(), *args, **kwargs))
        if out.shape != x_noisy.shape:
            raise ValueError(
                f"The model returned shape {tuple(out.shape)} for input {tuple(x_noisy.shape)}; EDM needs an output "
                "shaped like its input (drop learned-variance channels first)."
            )
        return c_skip * x_noisy + c_out * out

    def predict(self, model_fn: Callable[..., Any], batch: NoisyBatch, *args: Any, **kwargs: Any) -> Tensor:
        return self.precondition(model_fn, batch.model_input, batch.timestep, *args, **kwargs)


@dataclass
class FlowMatching(Objective):
    """Rectified flow: x_t = (1 - t) x0 + t noise, target noise - x0; the backbone gets t in [0, 1].

    `time_sampling` is "uniform" (t ~ U(0, 1)) or "logit_normal" (t = sigmoid(N(logit_mean, logit_std)),
    as SD3).
    """

    time_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self) -> None:
        if self.time_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"time_sampling must be 'uniform' or 'logit_normal', got {self.time_sampling!r}.")
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}.")

    def prepare(self, x0: Tensor, generator: torch.Generator | None = None) -> NoisyBatch:
        _check_x0(x0)
        batch = (x0.shape[0],)
        if self.time_sampling == "uniform":
            t = _draw(torch.rand, batch, like=x0, generator=generator)
        else:
            t = (_draw(torch.randn, batch, like=x0, generator=generator) * self.logit_std + self.logit_mean).sigmoid()
        noise = _draw(torch.randn, x0.shape, like=x0, generator=generator)
        s = _per_sample(t, x0)
        return NoisyBatch(
            model_input=(1 - s) * x0 + s * noise,
            timestep=t,
            target=noise - x0,
            weight=torch.ones_like(s),
            noise=noise,
            x0=x0,
        )


def mae_target(
    x_noisy: Tensor, patch_size: int | tuple[int, int], frames: int | None = None, eps: float = 1e-6
) -> Tensor:
    """MaskDiT's MAE target (B, N, P*C): each patch of the NOISY input, minus its mean, over sqrt(var + eps).

    The variance is the unbiased one, as MaskDiT and MAE compute it.
    """
    patches = patchify_pixels(x_noisy, patch_size, frames)
    if patches.shape[-1] < 2:
        raise ValueError("A patch holds a single value, so it cannot be normalised; use a larger patch_size.")
    mean = patches.mean(-1, keepdim=True)
    var = patches.var(-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def mae_loss(pred_patches: Tensor, target: Tensor) -> Tensor:
    """(B, N) mean squared error per patch; pass the result to `combine(..., mae=...)`."""
    if pred_patches.shape != target.shape or target.ndim != 3:
        raise ValueError(
            f"pred_patches {tuple(pred_patches.shape)} and target {tuple(target.shape)} must both be (B, N, P*C); "
            "patchify the prediction with patchify_pixels(pred, patch_size)."
        )
    return ((pred_patches - target) ** 2).mean(-1)
