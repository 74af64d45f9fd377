"""Facts about a training run that its summary records, and the mixed precision it trains in."""

from __future__ import annotations

import os
import platform
from typing import Any, Sequence

import torch

import tokenroute

from .presets import format_routes

__all__ = ["environment", "mixed_precision", "run_config", "run_facts"]


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
    """What every training summary records about the run: routes, arguments, processes (and how the model is
    distributed over them: Accelerate's distributed type) and environment."""
    return {"routes": [list(r) for r in routes] if routes else [], "config": run_config(args, routes),
            "device": str(accelerator.device), "world_size": accelerator.num_processes,
            "distributed_type": accelerator.distributed_type.value,
            "mixed_precision": accelerator.mixed_precision, "torch_version": torch.__version__,
            "environment": environment()}
