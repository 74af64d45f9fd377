"""Shared benchmark plumbing: environment record, timers, JSON output."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def bench_device(cpu: bool = False, name: str | None = None) -> torch.device:
    """``name`` if given, else the GPU unless ``cpu`` or none is present. On a GPU, matmuls may use TF32,
    as training scripts set them to."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() and not cpu else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


class Timer:
    """Milliseconds of ``n`` calls of ``fn``: CUDA events on a GPU, the wall clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any], n: int) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(n):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / n
        began = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - began) * 1000 / n


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def earlier_payload(path: Path, payload: dict[str, Any], config_keys: Sequence[str],
                    sections: Sequence[tuple[str, str]], script: str) -> dict[str, Any]:
    """What an earlier run wrote to ``path``, for ``--append`` to extend with ``payload``'s run: refused, naming
    every difference, unless the ``config_keys`` of the two configs and the ``(section, key)`` entries (the
    device, say) agree, so that figures measured under other settings never end up side by side."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"{script}: error: --append: cannot read {path}: {err}") from None
    new = json.loads(json.dumps(payload, default=str))  # as it will be written
    pairs = [("config", key) for key in config_keys] + list(sections)
    differ = [f"{section} {key} {old.get(section, {}).get(key)!r} -> {new.get(section, {}).get(key)!r}"
              for section, key in pairs if old.get(section, {}).get(key) != new.get(section, {}).get(key)]
    if differ:
        raise SystemExit(f"{script}: error: --append: {path} was measured with other settings ("
                         + "; ".join(differ) + "); use another --output or the same settings")
    return old
