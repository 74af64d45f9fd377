"""Shared pieces of the tokenroute examples: Fashion-MNIST, presets, objectives and samplers, EMA, logs, grids.

Used by `examples/train.py`, `examples/diffusers_dit.py` and `examples/demo.py` (through `compare_routing`).
Import it with the examples folder on `sys.path` (the scripts do this themselves)::

    sys.path.insert(0, "examples"); import common
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import gzip
import importlib.util
import json
import math
import os
import platform
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

import tokenroute
from tokenroute.losses import EDM, FlowMatching
from tokenroute.models import BACKBONES
from tokenroute.sampling import guided_prediction

EXAMPLES_DIR = Path(__file__).resolve().parent

# ------------------------------------------------------------------------------------------------
# Fashion-MNIST from the original idx files
# ------------------------------------------------------------------------------------------------

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist/"  # Debian package dataset-fashion-mnist
SPLITS = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
NUM_CLASSES = len(CLASSES)
IMAGE_SIZE = 32  # 28x28 padded by 2 on each side, so patch 2 or 4 tiles it
PAD = 2

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_CODES = {np.dtype("uint8"): 0x08, np.dtype("int8"): 0x09}


class DataError(SystemExit):
    """The data set is missing or unreadable; exits with its message (non-zero)."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (gzipped when the name ends in .gz), the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path} is truncated or corrupt: {err}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an idx file (bad magic number {data[:4].hex()}).")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(f"{path} is truncated or corrupt: {len(data)} bytes, expected {expected} for shape {dims}.")
    return np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write `array` (uint8 or int8) as an idx file, gzipped when the name ends in .gz."""
    array = np.ascontiguousarray(array)
    header = bytes([0, 0, _IDX_CODES[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def _idx_folder(data_dir: Path) -> Path | None:
    """The folder holding the four idx files: `data_dir` itself or torchvision's `FashionMNIST/raw` in it."""
    for folder in (data_dir, data_dir / "FashionMNIST" / "raw"):
        if all((folder / name).is_file() for pair in SPLITS.values() for name in pair):
            return folder
    return None


def _missing_message(data_dir: Path) -> str:
    names = ", ".join(name for pair in SPLITS.values() for name in pair)
    return (f"Fashion-MNIST not found in {data_dir}: expected {names}. Install the Debian package "
            f"dataset-fashion-mnist (files in {DEFAULT_DATA_DIR}), or pass --data-dir DIR with those idx files "
            "(torchvision's FashionMNIST/raw layout works too).")


def locate_fashion_mnist(data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The folder with the idx files; falls back to torchvision's download only when the files are missing
    and torchvision is importable. Raises DataError (a SystemExit with a message) otherwise."""
    data_dir = Path(data_dir or DEFAULT_DATA_DIR).expanduser()
    folder = _idx_folder(data_dir)
    if folder is not None:
        return folder
    if download and importlib.util.find_spec("torchvision") is not None:
        root = data_dir
        if str(data_dir).rstrip("/") == DEFAULT_DATA_DIR.rstrip("/") or not os.access(data_dir.parent, os.W_OK):
            root = Path.home() / ".cache" / "tokenroute" / "fashion-mnist"
        folder = _idx_folder(root)
        if folder is not None:
            return folder
        print(f"Fashion-MNIST not in {data_dir}; downloading it with torchvision into {root}", file=sys.stderr)
        try:
            from torchvision.datasets import FashionMNIST

            for train in (True, False):
                FashionMNIST(str(root), train=train, download=True)
        except Exception as err:  # offline, no space, ...
            raise DataError(f"{_missing_message(data_dir)} The torchvision download failed too: {err}") from err
        folder = _idx_folder(root)
        if folder is not None:
            return folder
    raise DataError(_missing_message(data_dir))


def load_fashion_mnist(data_dir: str | os.PathLike | None = None, splits: Sequence[str] = ("train", "t10k"),
                       download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the given splits, concatenated (all 70k by default)."""
    folder = locate_fashion_mnist(data_dir, download)
    images, labels = [], []
    for split in splits:
        image_file, label_file = (folder / name for name in SPLITS[split])
        x, y = read_idx(image_file), read_idx(label_file)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{image_file} ({x.shape}) and {label_file} ({y.shape}) do not pair up as images/labels.")
        if x.shape[1] > IMAGE_SIZE or x.shape[2] > IMAGE_SIZE:
            raise DataError(f"{image_file} holds {x.shape[1]}x{x.shape[2]} images; at most {IMAGE_SIZE}x{IMAGE_SIZE}.")
        if len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES):
            raise DataError(f"{label_file} has labels outside 0..{NUM_CLASSES - 1}.")
        images.append(torch.from_numpy(x.astype(np.uint8)))
        labels.append(torch.from_numpy(y.astype(np.int64)))
    return torch.cat(images), torch.cat(labels)


def pad_images(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(N, h, w) uint8 -> (N, 1, size, size) uint8, centred on a black (0) background."""
    n, h, w = images.shape
    out = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[:, 0, top:top + h, left:left + w] = images
    return out


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def write_synthetic_fashion_mnist(directory: str | os.PathLike, num_train: int = 96, num_test: int = 32,
                                  seed: int = 0) -> Path:
    """A tiny stand-in for Fashion-MNIST in the same idx gz files: one blurred shape per class plus noise.

    For tests and for machines without the data set; nothing here is real data.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    templates = []
    for k in range(NUM_CLASSES):  # class k: a box whose width and height follow the class
        h, w = 6 + 2 * (k % 5), 6 + 4 * (k // 5) + k % 3
        templates.append(((abs(yy - 14) < h) & (abs(xx - 14) < w)).astype(np.float32) * (140 + 10 * k))
    for split, count in (("train", num_train), ("t10k", num_test)):
        labels = np.arange(count) % NUM_CLASSES
        rng.shuffle(labels)
        images = np.stack([templates[k] for k in labels]) + rng.normal(0, 20, (count, 28, 28))
        image_file, label_file = SPLITS[split]
        write_idx(directory / image_file, np.clip(images, 0, 255).astype(np.uint8))
        write_idx(directory / label_file, labels.astype(np.uint8))
    return directory


class StepBatches:
    """Which samples each step trains on, a pure function of (seed, step, rank): resuming at step s draws
    exactly the batches an uninterrupted run would.

    Each epoch is a permutation seeded by (seed, epoch), split across ranks as DistributedSampler does
    (rank r takes every world_size-th index), cut into full batches (the remainder is dropped).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        per_rank = num_items // world_size
        if batch_size < 1 or per_rank < batch_size:
            raise DataError(f"{num_items} images over {world_size} process(es) do not fill one batch of {batch_size}; "
                            "use a smaller --batch-size or more data.")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = per_rank // batch_size
        self._epoch, self._perm = -1, None

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def indices(self, step: int) -> torch.Tensor:
        epoch = self.epoch(step)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.num_items, generator=g)
            self._perm, self._epoch = perm[self.rank::self.world_size], epoch
        start = (step % self.steps_per_epoch) * self.batch_size
        return self._perm[start:start + self.batch_size]


def drop_labels(labels: torch.Tensor, probability: float, null_label: int, generator: torch.Generator) -> torch.Tensor:
    """Label dropout for classifier-free guidance: each label becomes the null label with this probability."""
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < probability
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def mae_term(prediction: torch.Tensor, batch: Any, patch_size: int) -> torch.Tensor:
    """MaskDiT's per-token MAE loss (B, N): the prediction's patches against the normalised noisy input's,
    for ``tokenroute.losses.combine(..., mae=...)``."""
    from tokenroute.losses import mae_loss, mae_target, patchify_pixels

    return mae_loss(patchify_pixels(prediction.float(), patch_size), mae_target(batch.model_input.float(), patch_size))


def step_generator(seed: int, step: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for one step's noise, time and label dropout: seeded by (seed, step, rank), so a resumed
    run draws the same numbers without saving generator state."""
    return torch.Generator(device=device).manual_seed((seed * 7_919 + step) * 1_000_003 + rank)


# ------------------------------------------------------------------------------------------------
# Backbones for 32x32x1 Fashion-MNIST
# ------------------------------------------------------------------------------------------------

BACKBONE_NAMES = tuple(BACKBONES)  # dit, uvit, mamba
PRESET_NAMES = ("tiny", "small", "base")
COMMON = dict(input_size=IMAGE_SIZE, in_channels=1, num_classes=NUM_CLASSES)
# tiny: CPU smoke runs (patch 4 -> 64 tokens); small: about DiT-S/2; base: about DiT-B/2 (patch 2 -> 256 tokens).
# U-ViT counts depth // 2 in-blocks, a middle block and depth // 2 out-blocks, so an odd depth is exact.
EXAMPLE_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "dit": {
        "tiny": dict(patch_size=4, hidden_size=64, depth=6, num_heads=4),
        "small": dict(patch_size=2, hidden_size=384, depth=12, num_heads=6),
        "base": dict(patch_size=2, hidden_size=768, depth=12, num_heads=12),
    },
    "uvit": {
        "tiny": dict(patch_size=4, hidden_size=64, depth=7, num_heads=4),
        "small": dict(patch_size=2, hidden_size=384, depth=13, num_heads=6),
        "base": dict(patch_size=2, hidden_size=768, depth=13, num_heads=12),
    },
    "mamba": {
        "tiny": dict(patch_size=4, hidden_size=64, depth=6, headdim=32),
        "small": dict(patch_size=2, hidden_size=384, depth=12, headdim=64),
        "base": dict(patch_size=2, hidden_size=768, depth=12, headdim=64),
    },
}
# Training defaults per preset: per-device batch size and learning rate (small models take a higher one).
PRESET_DEFAULTS = {"tiny": dict(batch_size=32, lr=1e-3), "small": dict(batch_size=128, lr=1e-4),
                   "base": dict(batch_size=128, lr=1e-4)}


def model_config(backbone: str, preset: str) -> dict[str, Any]:
    """Constructor arguments of the repo backbone for this example preset."""
    if backbone not in EXAMPLE_PRESETS:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONE_NAMES)}")
    if preset not in EXAMPLE_PRESETS[backbone]:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    return {**COMMON, **EXAMPLE_PRESETS[backbone][preset]}


def build_model(backbone: str, preset: str, **overrides: Any) -> nn.Module:
    """A fresh, unwrapped backbone (tokenroute.models) for 32x32 single-channel images with 10 classes."""
    return BACKBONES[backbone](**{**model_config(backbone, preset), **overrides})


def stack_depth(model: nn.Module) -> int:
    """Number of blocks in the stack that routes index (U-ViT: in-blocks, middle block, out-blocks)."""
    from tokenroute.core import find_stack

    return len(find_stack(model))


def num_tokens(model: nn.Module) -> int:
    """Routable (patch) tokens per image."""
    h, w = model.grid_size
    return h * w


def tread_routes(depth: int, ratio: float = 0.5) -> list[tuple[int, int, float]]:
    """TREAD's default route for a depth-D stack, (2, D - 4, ratio); shallow stacks (D < 8) get (1, D - 2)."""
    if depth >= 8:
        return [(2, depth - 4, ratio)]
    if depth >= 3:
        return [(1, depth - 2, ratio)]
    raise ValueError(f"a stack of {depth} blocks is too shallow for a TREAD route")


def parse_routes(text: str) -> list[tuple[int, int, float]] | str | None:
    """argparse type for `START:END:RATIO[,START:END:RATIO...]`; also `none` (no routing) and `tread`
    (TREAD's rule for the model's depth, resolved later). Indices may be negative (from the end)."""
    text = text.strip()
    if text.lower() in ("", "none", "off"):
        return None
    if text.lower() == "tread":
        return "tread"
    routes = []
    for part in text.split(","):
        fields = part.strip().split(":")
        if len(fields) != 3:
            raise argparse.ArgumentTypeError(
                f"route {part.strip()!r} must be START:END:RATIO, e.g. 2:8:0.5 (END inclusive; several routes "
                "separated by commas), or 'tread' for TREAD's default, or 'none'")
        try:
            start, end, ratio = int(fields[0]), int(fields[1]), float(fields[2])
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"route {part.strip()!r}: START and END must be integers and RATIO a number, e.g. 2:8:0.5") from None
        if not 0.0 <= ratio < 1.0:
            raise argparse.ArgumentTypeError(
                f"route {part.strip()!r}: RATIO {ratio} must be in [0, 1): the fraction of tokens that skip the route")
        routes.append((start, end, ratio))
    return routes


def format_routes(routes: Sequence[tuple[int, int, float]] | None) -> str:
    return ",".join(f"{s}:{e}:{r:g}" for s, e, r in routes) if routes else "none"


# ------------------------------------------------------------------------------------------------
# Objectives and their samplers
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# EMA
# ------------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a model's parameters, kept in a copy of the model (`.module`).

    The decay warms up as min(decay, (1 + step) / (10 + step)), so short runs still average sensibly and a
    resumed run gets the same decay at the same step. Make it before `tokenroute.wrap`: the copy is then
    a plain backbone; its state_dict keys are the model's either way.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = self.current_decay(step)
        ema_params = [p for p in self.module.parameters()]
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, [p.to(e.dtype) for p, e in zip(params, ema_params)], 1.0 - decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


# ------------------------------------------------------------------------------------------------
# Checkpoints: safetensors weights + a side .pt with the training state
# ------------------------------------------------------------------------------------------------


def save_weights(state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}, str(path), metadata=metadata)


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def checkpoint_dirs(output: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under output/checkpoints, oldest first."""
    root = Path(output) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()
             and (p / "training_state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(output: str | os.PathLike) -> Path | None:
    found = checkpoint_dirs(output)
    return found[-1] if found else None


def prune_checkpoints(output: str | os.PathLike, keep: int) -> None:
    if keep > 0:
        for old in checkpoint_dirs(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Logs, plots, grids, summaries
# ------------------------------------------------------------------------------------------------

LOSS_FIELDS = ("step", "epoch", "loss", "denoise", "lr", "mask_checksum")


class LossLog:
    """loss.csv, one row per step; `truncate(step)` drops rows after a checkpoint when a run resumes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def truncate(self, step: int) -> None:
        rows = [r for r in self.read() if int(r["step"]) <= step]
        self._write(rows, "w")

    def start(self) -> None:
        self._write([], "w")

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        self._write(list(rows), "a")

    def _write(self, rows: list[dict[str, Any]], mode: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = mode == "w" or not self.path.exists()
        with open(self.path, mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOSS_FIELDS)
            if new:
                writer.writeheader()
            for row in rows:
                writer.writerow({k: row.get(k, "") for k in LOSS_FIELDS})

    def read(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))


def read_loss_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    return LossLog(path).read()


def save_loss_plot(csv_path: str | os.PathLike, png_path: str | os.PathLike, title: str = "") -> Path | None:
    """Loss per step (faint) and its running mean, log scale, with matplotlib's Agg backend."""
    rows = read_loss_csv(csv_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    steps = np.array([int(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    window = max(1, min(100, len(loss) // 10))
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, loss, alpha=0.3, lw=0.8, label="loss")
    ax.plot(steps[window - 1:], smooth, lw=1.5, label=f"mean of {window}")
    if (loss > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


def image_grid(images: torch.Tensor, nrow: int, crop: int = PAD, pad: int = 2, upscale: int = 2) -> np.ndarray:
    """(B, 1, H, W) in [-1, 1] -> (rows, cols) float array in [0, 1], `nrow` images per row, padding cropped."""
    x = images.float().clamp(-1, 1).add(1).div(2)[:, 0]
    if crop:
        x = x[:, crop:-crop, crop:-crop]
    b, h, w = x.shape
    rows = math.ceil(b / nrow)
    grid = np.ones((rows * (h + pad) + pad, nrow * (w + pad) + pad), dtype=np.float32)
    for i, img in enumerate(x.numpy()):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
    if upscale > 1:
        grid = np.kron(grid, np.ones((upscale, upscale), dtype=np.float32))
    return grid


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int) -> Path:
    """Save (B, 1, H, W) images in [-1, 1] as a grayscale PNG grid, `nrow` per row."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(path, image_grid(images, nrow), cmap="gray", vmin=0.0, vmax=1.0)
    return path


def mask_checksum(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """An int64 fingerprint of one forward's routing masks (0 when nothing routed), computed on the device."""
    total = torch.zeros((), dtype=torch.int64, device=masks[0].device if masks else "cpu")
    for r, mask in enumerate(masks):
        pos = torch.arange(mask.numel(), device=mask.device, dtype=torch.int64)
        weights = (pos * 2_654_435_761 + (r + 1) * 40_503) % 2_147_483_647
        total = (total + (mask.reshape(-1).long() * weights).sum()) % 2_147_483_647
    return total


def mixed_precision(choice: str = "auto") -> str:
    """Accelerate's mixed_precision for a --mixed-precision choice: "auto" is what `accelerate launch` was
    configured with, else bf16 on a GPU that supports it, else "no"."""
    if choice != "auto":
        return choice
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return os.environ["ACCELERATE_MIXED_PRECISION"]
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def environment() -> dict[str, Any]:
    """Versions and device facts for summaries."""
    info = {"torch": torch.__version__, "tokenroute": tokenroute.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_config(args: Any, routes: Sequence[Any] | None) -> dict[str, Any]:
    """The command-line arguments of a run, with its routes in their --routes spelling."""
    return {**vars(args), "routes": format_routes(routes)}


def run_facts(args: Any, routes: Sequence[Any] | None, accelerator: Any) -> dict[str, Any]:
    """What every training summary records about the run: routes, arguments, processes and environment."""
    return {"routes": [list(r) for r in routes] if routes else [], "config": run_config(args, routes),
            "device": str(accelerator.device), "world_size": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision, "torch_version": torch.__version__,
            "environment": environment()}


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def write_json(data: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(data), indent=2, sort_keys=False) + "\n")
    return path


class Progress:
    """A tqdm bar when tqdm is installed and stderr is a terminal, else a line every `every` steps."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, every: int = 50, desc: str = "train",
                 bar: bool | None = None):
        self.enabled, self.every, self.total, self.n = enabled, max(1, every), total, initial
        self.postfix: dict[str, str] = {}
        self.bar = None
        if bar is None:  # a bar on a terminal; periodic lines in logs and pipes
            bar = sys.stderr.isatty()
        if enabled and bar:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and (self.n % self.every == 0 or self.n == self.total):
            stats = " ".join(f"{k}={v}" for k, v in self.postfix.items())
            print(f"step {self.n}/{self.total} {stats}", file=sys.stderr, flush=True)

    def set(self, **stats: Any) -> None:
        self.postfix = {k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in stats.items()}
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------
# FLOPs and the routed/unrouted comparison (the demo)
# ------------------------------------------------------------------------------------------------


def training_step_flops(model: nn.Module, batch_size: int = 2, seed: int = 0) -> int:
    """FLOPs (torch.utils.flop_counter) of one training forward + backward of `model` on random input."""
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, model.in_channels, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    t = torch.rand(batch_size, generator=g)
    y = torch.randint(0, model.num_classes, (batch_size,), generator=g)
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(x, t, y).square().mean().backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def routing_flops(backbone: str, preset: str, routes: Sequence[tuple[int, int, float]], batch_size: int = 2,
                  seed: int = 0) -> dict[str, Any]:
    """Training-step FLOPs without and with `routes`; the routed one is counted after a warm-up step,
    since the first routed forward also traces the model."""
    torch.manual_seed(seed)
    model = build_model(backbone, preset)
    unrouted = training_step_flops(model, batch_size, seed)
    tokenroute.wrap(model, routes=list(routes), seed=seed)
    training_step_flops(model, batch_size, seed)  # warm-up: traces the graph
    routed = training_step_flops(model, batch_size, seed)
    return {"unrouted": unrouted, "routed": routed, "saving": 1.0 - routed / unrouted,
            "flop_speedup": unrouted / routed, "batch_size": batch_size}


def interleaved_step_times(backbone: str, preset: str, routes: Sequence[tuple[int, int, float]], batch_size: int = 32,
                           rounds: int = 12, seed: int = 0) -> dict[str, Any]:
    """Median seconds per training step (EDM loss, AdamW) without and with `routes`, timing the two models'
    steps alternately so that a machine whose load changes slows both alike (a fairer ratio than two runs
    one after the other on a shared machine)."""
    task = make_task("edm")
    models = {}
    for name, rs in (("unrouted", None), ("routed", routes)):
        torch.manual_seed(seed)
        model = build_model(backbone, preset)
        if rs:
            tokenroute.wrap(model, routes=list(rs), seed=seed)
        models[name] = (model.train(), torch.optim.AdamW(model.parameters(), lr=1e-4))
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch_size, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1
    y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)

    def step(name: str) -> float:
        model, opt = models[name]
        t0 = time.perf_counter()
        batch = task.objective.prepare(x0, generator=g)
        pred = task.objective.predict(task.backbone_fn(model), batch, y)
        masks = tokenroute.routing_masks(model) if tokenroute.is_wrapped(model) else []
        loss, _ = tokenroute.losses.combine(task.objective.per_token_loss(pred, batch, model.patch_size), masks)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for name in models:  # warm-up; the first routed step also traces
        step(name), step(name)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name in models:
            times[name].append(step(name))
    median = {name: float(np.median(ts)) for name, ts in times.items()}
    return {"unrouted_s": median["unrouted"], "routed_s": median["routed"],
            "speedup": median["unrouted"] / median["routed"], "batch_size": batch_size, "rounds": rounds}


def load_example(name: str):
    """Import examples/<name>.py as a module (the scripts are not a package)."""
    if str(EXAMPLES_DIR) not in sys.path:
        sys.path.insert(0, str(EXAMPLES_DIR))
    module_name = f"_tokenroute_example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def compare_routing(backbone: str = "dit", preset: str = "tiny", steps: int | None = None,
                    time_budget: float | None = None, *, routes: Sequence[tuple[int, int, float]] | None = None,
                    batch_size: int = 32, output: str | os.PathLike | None = None,
                    data_dir: str | os.PathLike | None = None, seed: int = 0, sample_steps: int = 12,
                    samples_per_class: int = 4, flop_batch: int = 2, timing_rounds: int = 12, objective: str = "edm",
                    quiet: bool = True, extra_args: Sequence[str] = ()) -> dict[str, Any]:
    """Train the same backbone without and with TREAD routing for the same number of steps (CPU) and compare.

    Both runs go through `examples/train.py` (same data order, noise, init and seed; only the wrap differs).
    With `time_budget` (seconds, for both runs together) and no `steps`, the unrouted run gets half the
    budget and the routed run then trains for as many steps as it reached. Neither given: 800 steps, about
    2 to 3 minutes for both runs on 2 CPU cores with the tiny DiT (batch 32).
    `routes` defaults to TREAD's rule for the preset's depth (`tread_routes`). `objective` is train.py's
    (edm, flow or eps); flow gives the cleaner grids after a short run.

    Returns a dict: `routes`, `steps`, `batch_size`, `data` (where the images came from), `baseline` and
    `routed` (each: wall_time_s, train_time_s, images_per_s, final_loss, samples (PNG path), summary (JSON
    path), output), `speedup` (routed / baseline images per second), `flops` (training-step FLOPs unrouted,
    routed, `saving` fraction, `flop_speedup`), `interleaved_timing` (median step time of each model timed
    alternately, `timing_rounds` rounds, and its `speedup`: steadier than `speedup` on a machine whose load
    changes between the two runs; None when timing_rounds=0), `samples` (both grids' paths), `output`; also
    written to OUTPUT/comparison.json.
    """
    train = load_example("train")
    output = Path(output) if output is not None else Path("outputs") / f"compare-{backbone}-{preset}"
    output.mkdir(parents=True, exist_ok=True)
    depth = stack_depth(build_model(backbone, preset))
    routes = list(routes) if routes is not None else tread_routes(depth)

    try:
        data_folder = locate_fashion_mnist(data_dir, download=True)
        data = f"Fashion-MNIST ({data_folder})"
    except DataError as err:
        data_folder = write_synthetic_fashion_mnist(output / "synthetic-data", num_train=512, num_test=128, seed=seed)
        data = f"synthetic stand-in ({data_folder}): {err}"

    if steps is None and time_budget is None:
        steps = 800
    common_args = ["--backbone", backbone, "--preset", preset, "--batch-size", str(batch_size), "--seed", str(seed),
                   "--data-dir", str(data_folder), "--sample-every", "0", "--ckpt-every", "0",
                   "--sample-steps", str(sample_steps), "--samples-per-class", str(samples_per_class),
                   "--objective", objective, "--no-download", *extra_args]
    if quiet:
        common_args.append("--quiet")

    def run(name: str, route_arg: str, max_steps: int, budget: float | None) -> dict[str, Any]:
        argv = [*common_args, "--routes", route_arg, "--max-steps", str(max_steps), "--output", str(output / name)]
        if budget is not None:
            argv += ["--time-budget", str(budget)]
        summary = train.main(argv)
        return {"steps": summary["steps"], "wall_time_s": summary["wall_time_s"],
                "train_time_s": summary["train_time_s"], "images_per_s": summary["images_per_s"],
                "step_time_ms": summary["step_time_ms"], "final_loss": summary["final_loss"],
                "samples": summary["outputs"]["samples"], "summary": str(output / name / "summary.json"),
                "output": str(output / name)}

    baseline = run("baseline", "none", steps if steps is not None else 10**9,
                   None if time_budget is None else time_budget / 2)
    steps = baseline["steps"]
    routed = run("routed", format_routes(routes), steps, None)
    flops = routing_flops(backbone, preset, routes, flop_batch, seed)
    timing = interleaved_step_times(backbone, preset, routes, batch_size, timing_rounds, seed) if timing_rounds else None
    result = {"backbone": backbone, "preset": preset, "objective": objective, "routes": [list(r) for r in routes],
              "steps": steps, "batch_size": batch_size, "data": data, "baseline": baseline, "routed": routed,
              "speedup": routed["images_per_s"] / baseline["images_per_s"], "flops": flops,
              "interleaved_timing": timing, "samples": {"baseline": baseline["samples"], "routed": routed["samples"]},
              "output": str(output)}
    write_json(result, output / "comparison.json")
    return result
