"""Sharded training through Accelerate: what ``accelerate launch --config_file ...`` asked for, checked against
what Accelerate chose, and the settings a hand-written loop must give FSDP2 and DeepSpeed itself.

Accelerate (1.16) selects FSDP only where each process has a GPU (or another accelerator; ``AcceleratorState``
keeps ``MULTI_CPU`` otherwise) and DeepSpeed only without ``cpu=True``: on CPUs an FSDP or DeepSpeed config
silently trains whole models under DDP. ``check_sharding`` refuses that instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

__all__ = ["block_class_names", "check_sharding", "check_sharding_packages", "configure_sharding",
           "deepspeed_autocast", "requested_sharding"]


def requested_sharding() -> str | None:
    """"fsdp" or "deepspeed" when the launch configured it (Accelerate's launcher environment), else None."""
    for name, variable in (("deepspeed", "ACCELERATE_USE_DEEPSPEED"), ("fsdp", "ACCELERATE_USE_FSDP")):
        if os.environ.get(variable, "false").lower() == "true":
            return name
    return None


def check_sharding_packages(prog: str) -> None:
    """Before ``Accelerator()``: a DeepSpeed launch needs deepspeed, and Accelerate's DeepSpeed plugin imports
    transformers when it is selected (Accelerate's own error names only the missing package metadata)."""
    if requested_sharding() != "deepspeed":
        return
    missing = [name for name in ("deepspeed", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"{prog}: error: the DeepSpeed config needs {' and '.join(missing)} (Accelerate's DeepSpeed "
                         f"integration imports both): pip install {' '.join(missing)}")


def check_sharding(accelerator: object, prog: str) -> None:
    """After ``Accelerator()``: the sharding the launch asked for is the one Accelerate runs, FSDP as FSDP2."""
    from accelerate.utils import DistributedType

    wanted = requested_sharding()
    chosen = accelerator.distributed_type
    expected = {"fsdp": DistributedType.FSDP, "deepspeed": DistributedType.DEEPSPEED}.get(wanted)
    if expected is not None and chosen != expected:
        raise SystemExit(
            f"{prog}: error: the launch config asks for {'FSDP' if wanted == 'fsdp' else 'DeepSpeed'}, but Accelerate "
            f"chose {chosen.value} on {accelerator.device.type} ({accelerator.num_processes} process(es)): it shards "
            "only where every process has a GPU (or another accelerator), and would train a whole model per process "
            "instead. Launch on such a machine, or drop the config for plain data parallelism (accelerate launch "
            "--multi_gpu --num_processes N, or torchrun, which on CPUs use the gloo backend)")
    if chosen == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise SystemExit(f"{prog}: error: the examples shard with FSDP2 (torch.distributed.fsdp.fully_shard); set "
                         "fsdp_version: 2 in the config (or --fsdp_version 2)")


def block_class_names(model: torch.nn.Module) -> list[str]:
    """The class names of the model's main block stack (tokenroute's stack), in order of first appearance."""
    from tokenroute.core import find_stack

    return list(dict.fromkeys(type(block).__name__ for block in find_stack(model).blocks))


def configure_sharding(accelerator: object, model: torch.nn.Module, batch_size: int, grad_clip: float,
                       prog: str) -> None:
    """Before ``accelerator.prepare``: FSDP2 shards each block of the model's stack (the config's
    ``fsdp_transformer_layer_cls_to_wrap``, filled in with the stack's block class where the config names none, and
    checked where it names one); DeepSpeed gets the micro batch (no DataLoader is prepared) and the loop's gradient
    clipping (its engine clips; 0 turns it off) where the config leaves them ``auto``."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
        if getattr(policy, "__name__", "") != "transformer_auto_wrap_policy":
            return  # size-based or no auto-wrap: the config's choice
        blocks = block_class_names(model)
        present = {type(m).__name__ for m in model.modules()}
        names = list(plugin.transformer_cls_names_to_wrap or [])
        if not names:
            plugin.transformer_cls_names_to_wrap = blocks
        elif not set(names) <= present:
            raise SystemExit(f"{prog}: error: the FSDP config wraps {', '.join(sorted(set(names) - present))}, which "
                             f"this {type(model).__name__} does not have; its blocks are {', '.join(blocks)}: pass "
                             f"--fsdp_transformer_layer_cls_to_wrap {','.join(blocks)} to accelerate launch")
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        for key, value in (("train_micro_batch_size_per_gpu", batch_size), ("gradient_clipping", grad_clip)):
            if config.get(key, "auto") == "auto":
                config[key] = value


def deepspeed_autocast(accelerator: object) -> contextlib.AbstractContextManager:
    """Autocast for a forward under DeepSpeed with bf16 or fp16: its engine casts the weights, not the inputs, and
    Accelerate autocasts nothing there. Elsewhere a no-op (DDP's forward is autocast by ``prepare``, FSDP2 casts
    through its mixed precision policy)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.mixed_precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16
        return torch.autocast(accelerator.device.type, dtype=dtype)
    return contextlib.nullcontext()
