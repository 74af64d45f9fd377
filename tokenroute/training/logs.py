"""What a training run writes as it goes: loss.csv and its plot, sample grids, JSON summaries, progress.

numpy and matplotlib are imported when a plot or a grid is drawn, tqdm when a progress bar is shown.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from ..core.selection import hash32
from .data import PAD

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "LOSS_FIELDS",
    "LossLog",
    "Progress",
    "image_grid",
    "jsonable",
    "mask_checksum",
    "read_loss_csv",
    "save_grid",
    "save_loss_plot",
    "write_json",
]

LOSS_FIELDS = ("step", "epoch", "loss", "denoise", "lr", "mask_checksum")


class LossLog:
    """loss.csv, one row per step; `truncate(step)` drops rows after a checkpoint when a run resumes."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def truncate(self, step: int) -> None:
        """Keep the rows up to and including `step`."""
        rows = [r for r in self.read() if int(r["step"]) <= step]
        self._write(rows, "w")

    def start(self) -> None:
        """A new, empty log (the header only)."""
        self._write([], "w")

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        """Add rows; keys outside LOSS_FIELDS are ignored, missing ones left empty."""
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
        """The rows as strings; none when the file does not exist."""
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))


def read_loss_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a loss.csv, as strings."""
    return LossLog(path).read()


def mask_checksum(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """An int64 fingerprint of one forward's routing masks (0 when nothing routed), computed on the device."""
    total = torch.zeros((), dtype=torch.int64, device=masks[0].device if masks else "cpu")
    for r, mask in enumerate(masks):  # hashed weights: masks of equal size and position sum still differ
        pos = torch.arange(mask.numel(), device=mask.device, dtype=torch.int64)
        weights = hash32(hash32(pos) ^ (r + 1)) % 2_147_483_647
        total = (total + (mask.reshape(-1).long() * weights).sum()) % 2_147_483_647
    return total


def save_loss_plot(csv_path: str | os.PathLike, png_path: str | os.PathLike, title: str = "") -> Path | None:
    """Loss per step (faint) and its running mean, log scale, with matplotlib's Agg backend."""
    rows = read_loss_csv(csv_path)
    if not rows:
        return None
    import matplotlib
    import numpy as np

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
    import numpy as np

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


def jsonable(value: Any) -> Any:
    """`value` with paths, devices, dtypes, tensors and numpy scalars turned into what JSON holds."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    np = sys.modules.get("numpy")  # without numpy imported there are no numpy scalars
    if np is not None and isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def write_json(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write `data` (through `jsonable`) as indented JSON, making the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(data), indent=2, sort_keys=False) + "\n")
    return path


class Progress:
    """A tqdm bar when tqdm is installed and stderr is a terminal, else a line every `every` steps."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, every: int = 50, desc: str = "train",
                 bar: bool | None = None) -> None:
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
        """Count `n` more steps; without a bar, print a line every `every` steps and at the end."""
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and (self.n % self.every == 0 or self.n == self.total):
            stats = " ".join(f"{k}={v}" for k, v in self.postfix.items())
            print(f"step {self.n}/{self.total} {stats}", file=sys.stderr, flush=True)

    def set(self, **stats: Any) -> None:
        """The figures shown beside the count (floats to 4 significant digits)."""
        self.postfix = {k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in stats.items()}
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)

    def write(self, text: str) -> None:
        """A message that does not break the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
