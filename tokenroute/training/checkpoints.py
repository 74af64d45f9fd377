"""Checkpoint folders: OUTPUT/checkpoints/step_NNNNNNN/ with safetensors weights beside the training state.

safetensors is imported when weights are saved or loaded. A model sharded by FSDP2 (its parameters DTensors) saves
and loads through the full state dicts: ``full_state_dict`` gathers the model's (every rank calls it; rank 0
receives it), ``load_full_state_dict`` spreads rank 0's back to the shards, and the optimizer's likewise, so a
checkpoint is the plain backbone's whatever the sharding. Under DeepSpeed ZeRO-3 (partitioned parameters)
``full_state_dict`` and ``gathered_parameters`` gather the weights; its optimizer state stays DeepSpeed's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch

__all__ = ["checkpoint_dirs", "full_optimizer_state", "full_state_dict", "gathered_parameters", "is_sharded",
           "latest_checkpoint", "load_full_optimizer_state", "load_full_state_dict", "load_weights",
           "prune_checkpoints", "save_weights", "write_checkpoint"]


def _fsdp2(model: torch.nn.Module) -> bool:
    """Whether any of the model's parameters is a DTensor shard (FSDP2)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def _zero3_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters DeepSpeed ZeRO-3 partitions (they carry ``ds_id``)."""
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the model's parameters are split over the ranks: DTensor shards (FSDP2) or ZeRO-3 partitions."""
    return _fsdp2(model) or bool(_zero3_parameters(model))


@contextlib.contextmanager
def gathered_parameters(model: torch.nn.Module) -> Iterator[None]:
    """ZeRO-3's partitioned parameters whole inside the block, read-only (a collective: every rank enters);
    anything else as it is. (FSDP2 shards gather per tensor: ``DTensor.full_tensor``.)"""
    partitioned = _zero3_parameters(model)
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def _full_options(load: bool) -> object:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True) if load else \
        StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict: gathered from the shards to rank 0 when sharded (a collective: call it on
    every rank; under FSDP2 the other ranks get an empty dict, under ZeRO-3 a copy on the CPU), else
    ``model.state_dict()``."""
    if _zero3_parameters(model):
        with gathered_parameters(model):
            return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if not _fsdp2(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options(load=False))


def load_full_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole state dict (strict): into the shards from rank 0's ``state`` when sharded (every rank calls
    it), else ``model.load_state_dict``. Not for DeepSpeed, whose optimizer keeps its own copy of the weights."""
    if not _fsdp2(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_full_options(load=True))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state (by parameter name when sharded by FSDP2, gathered to rank 0; a collective)."""
    if not _fsdp2(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options(load=False))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load what ``full_optimizer_state`` gave (rank 0's, spread to the shards when sharded by FSDP2)."""
    if not _fsdp2(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_full_options(load=True))


def save_weights(state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> None:
    """Write a state dict as safetensors (on the CPU, contiguous), with optional string metadata."""
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}, str(path), metadata=metadata)


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file into a state dict on the CPU."""
    from safetensors.torch import load_file

    return load_file(str(path))


def write_checkpoint(output: str | os.PathLike, step: int, weights: dict[str, dict[str, torch.Tensor]],
                     state: dict, keep: int) -> Path:
    """OUTPUT/checkpoints/step_NNNNNNN/: each of ``weights`` as NAME.safetensors and ``state`` as
    training_state.pt; then only the ``keep`` newest checkpoints are kept."""
    folder = Path(output) / "checkpoints" / f"step_{step:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    for name, state_dict in weights.items():
        save_weights(state_dict, folder / f"{name}.safetensors")
    torch.save(state, folder / "training_state.pt")
    prune_checkpoints(output, keep)
    return folder


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
