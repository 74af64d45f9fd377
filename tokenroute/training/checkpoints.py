"""Checkpoint folders: OUTPUT/checkpoints/step_NNNNNNN/ with safetensors weights beside the training state.

safetensors is imported when weights are saved or loaded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

__all__ = ["checkpoint_dirs", "latest_checkpoint", "load_weights", "prune_checkpoints", "save_weights"]


def save_weights(state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> None:
    """Write a state dict as safetensors (on the CPU, contiguous), with optional string metadata."""
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}, str(path), metadata=metadata)


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file into a state dict on the CPU."""
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
    """The newest complete checkpoint under output/checkpoints, or None."""
    found = checkpoint_dirs(output)
    return found[-1] if found else None


def prune_checkpoints(output: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep 0: delete none)."""
    if keep > 0:
        for old in checkpoint_dirs(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
