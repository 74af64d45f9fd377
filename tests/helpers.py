"""Small models and utilities shared by the tests."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from hypothesis import settings

from tokenroute.models import DiT, DiffusionMamba, UViT


# Property tests whose every example wraps a fresh model and traces it (on fake tensors, a fraction of a
# second each): half the profile's examples, so the suite stays fast as it grows.
traced_examples = settings(max_examples=max(1, settings.default.max_examples // 2))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random parameters everywhere: zero-initialised layers would make output comparisons vacuous."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


class ToyBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + torch.tanh(self.mlp(x)) * c[:, None]


class ToyTransformer(nn.Module):
    """A user's model: blocks in a ModuleList, an assert on shapes in its forward."""

    def __init__(self, dim: int = 8, depth: int = 6, in_dim: int = 3):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.layers = nn.ModuleList([ToyBlock(dim) for _ in range(depth)])
        self.out = nn.Linear(dim, in_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        x = self.embed(x)
        assert x.shape[1] == n
        for layer in self.layers:
            x = layer(x, c)
        return self.out(x)


TINY = dict(input_size=8, patch_size=2, in_channels=1, num_classes=10)


def make_backbone(name: str, depth: int = 5, seed: int = 0, size: int = 8) -> nn.Module:
    config = dict(TINY, input_size=size)
    if name == "dit":
        model = DiT(hidden_size=16, depth=depth, num_heads=2, **config)
    elif name == "uvit":
        model = UViT(hidden_size=16, depth=depth, num_heads=2, **config)
    elif name == "mamba":
        model = DiffusionMamba(hidden_size=16, depth=depth, d_state=4, **config)
    else:
        raise ValueError(name)
    return randomize(model, seed)


def backbone_inputs(batch: int, seed: int = 0, size: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, size, size, generator=gen)
    t = torch.rand(batch, generator=gen) * 1000
    y = torch.randint(0, 10, (batch,), generator=gen)
    return x, t, y


def stack_depth(model: nn.Module) -> int:
    from tokenroute.core import find_stack
    return len(find_stack(model))


def twin(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def zero_branch_outputs(block: nn.Module) -> list:
    """Forward hooks that zero every known branch output of ``block`` (see tokenroute.block_branches)."""
    import tokenroute

    handles = []
    for branch in tokenroute.block_branches(block):
        def zero(module, args, out, index=branch.output):
            if index is None:
                return torch.zeros_like(out)
            return tuple(torch.zeros_like(o) if k == index else o for k, o in enumerate(out))
        handles.append(block.get_submodule(branch.path).register_forward_hook(zero))
    return handles
