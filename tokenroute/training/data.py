"""Fashion-MNIST from its original idx files, a synthetic stand-in in the same format, and which samples and
which noise each training step draws.

numpy is imported where the idx files are read or written, so importing this module needs only torch.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "CLASSES",
    "DEFAULT_DATA_DIR",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "PAD",
    "SPLITS",
    "DataError",
    "StepBatches",
    "load_fashion_mnist",
    "locate_fashion_mnist",
    "pad_images",
    "read_idx",
    "resize_images",
    "step_generator",
    "to_model_range",
    "write_idx",
    "write_synthetic_fashion_mnist",
]

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist/"  # Debian package dataset-fashion-mnist
SPLITS = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
NUM_CLASSES = len(CLASSES)
IMAGE_SIZE = 32  # 28x28 padded by 2 on each side, so patch 2 or 4 tiles it
PAD = 2

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_CODES = {"uint8": 0x08, "int8": 0x09}


class DataError(SystemExit):
    """The data set is missing or unreadable; exits with its message (non-zero)."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (gzipped when the name ends in .gz), the format of MNIST and Fashion-MNIST."""
    import numpy as np

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
    import numpy as np

    array = np.ascontiguousarray(array)
    header = bytes([0, 0, _IDX_CODES[array.dtype.name], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
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
    import numpy as np

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


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images (N, C, s, s) at ``size`` x ``size`` (bilinear; the same size: unchanged), for models trained on a
    larger grid than the 32 x 32 frame."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def write_synthetic_fashion_mnist(directory: str | os.PathLike, num_train: int = 96, num_test: int = 32,
                                  seed: int = 0) -> Path:
    """A tiny stand-in for Fashion-MNIST in the same idx gz files: one blurred shape per class plus noise.

    For tests and for machines without the data set; nothing here is real data.
    """
    import numpy as np

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

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        per_rank = num_items // world_size
        if batch_size < 1 or per_rank < batch_size:
            raise DataError(f"{num_items} images over {world_size} process(es) do not fill one batch of {batch_size}; "
                            "use a smaller --batch-size or more data.")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = per_rank // batch_size
        self._epoch, self._perm = -1, None

    def epoch(self, step: int) -> int:
        """The epoch that step `step` (from 0) falls in."""
        return step // self.steps_per_epoch

    def indices(self, step: int) -> torch.Tensor:
        """This rank's sample indices (batch_size,) for step `step`."""
        epoch = self.epoch(step)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.num_items, generator=g)
            self._perm, self._epoch = perm[self.rank::self.world_size], epoch
        start = (step % self.steps_per_epoch) * self.batch_size
        return self._perm[start:start + self.batch_size]


def step_generator(seed: int, step: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for one step's noise, time and label dropout: seeded by (seed, step, rank), so a resumed
    run draws the same numbers without saving generator state."""
    return torch.Generator(device=device).manual_seed((seed * 7_919 + step) * 1_000_003 + rank)
