"""Find the block stack of a model: the module that calls the blocks (the owner) and the blocks in order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch.nn as nn

from .blocks import BlockSpec, spec_for
from .route import RouteError

_CONTAINERS = (nn.ModuleList, nn.Sequential)


@dataclass
class BlockStack:
    """The owner module whose forward runs the blocks, and the blocks in the order it runs them."""

    owner: nn.Module
    owner_path: str
    paths: list[str]  # each block's path relative to the owner, in stack order
    blocks: list[nn.Module]
    specs: list[BlockSpec] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.blocks)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _stack_of(owner: nn.Module, container_names: Sequence[str] | None) -> tuple[list[str], list[nn.Module]]:
    """Blocks held by ``owner``'s containers (named, or all of them), plus direct children of the same
    classes (U-ViT's mid_block), in registration order, which is the order the forward runs them in."""
    children = dict(owner.named_children())
    if container_names is None:
        container_names = [n for n, m in children.items() if isinstance(m, _CONTAINERS) and len(m) > 0
                           and all(_has_params(b) for b in m)]
    block_classes = {type(b) for n in container_names for b in children[n]}
    paths, blocks = [], []
    for name, child in children.items():
        if name in container_names:
            paths += [f"{name}.{i}" for i in range(len(child))]
            blocks += list(child)
        elif type(child) in block_classes:
            paths.append(name)
            blocks.append(child)
    return paths, blocks


def find_stack(model: nn.Module, blocks: str | Sequence[str] | None = None) -> BlockStack:
    """Locate the block stack. ``blocks`` names the container(s) (dotted paths from ``model``, sharing
    one parent); by default the owner is the module whose block containers hold the most parameters."""
    if blocks is not None:
        names = [blocks] if isinstance(blocks, str) else list(blocks)
        parents = {n.rpartition(".")[0] for n in names}
        if len(parents) != 1:
            raise RouteError(f"blocks={names} do not share one parent module; name containers of one module")
        owner_path = parents.pop()
        try:
            owner = model.get_submodule(owner_path)
            containers = [model.get_submodule(n) for n in names]
        except AttributeError as err:
            raise RouteError(f"blocks={names}: {err}; give dotted paths such as 'transformer_blocks'") from None
        for name, module in zip(names, containers):
            if not isinstance(module, _CONTAINERS):
                raise RouteError(f"blocks: {name} is a {type(module).__name__}, not a ModuleList or Sequential")
        paths, found = _stack_of(owner, [n.rpartition(".")[2] for n in names])
    else:
        best = None
        for owner_path, owner in model.named_modules():
            if isinstance(owner, _CONTAINERS):
                continue
            paths, found = _stack_of(owner, None)
            if len(found) < 2:
                continue
            size = sum(p.numel() for b in found for p in b.parameters())
            if best is None or size > best[0]:
                best = (size, owner_path, owner, paths, found)
        if best is None:
            raise RouteError(
                f"no block stack found in {type(model).__name__}: no module holds a ModuleList or Sequential of "
                "two or more blocks; name it with blocks='path.to.blocks'"
            )
        _, owner_path, owner, paths, found = best
    if len(found) == 0:
        raise RouteError(f"the named block containers of {type(model).__name__} are empty")
    specs = [spec_for(b) for b in found]
    return BlockStack(owner, owner_path, paths, found, specs)
