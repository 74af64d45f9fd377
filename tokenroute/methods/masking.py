"""MaskDiT masked training (arXiv 2306.09305) on any backbone that ``tokenroute.wrap`` supports.

Per sample a random ``ratio`` of the tokens is dropped after the embedding (prefix tokens never); the
encoder blocks run on the visible tokens in their original order; at the decoder's entry the dropped
positions are filled with a learnable mask token and the decoder runs on the full sequence. It is a route
from block 0 to the end of the encoder whose skipped tokens come back as the mask token instead of their
own values, so it shares TREAD's machinery: ``routing_masks`` reports the dropped tokens (True = dropped)
and ``tokenroute.losses.combine(..., mode="visible", mae=..., mae_weight=0.1)`` gives MaskDiT's loss.

Decoders: ``decoder=k`` uses the last k blocks of the stack (no new architecture, as MDT); ``decoder=
Decoder(depth=...)`` adds fresh copies of the stack's last block after it, with their own learned position
embedding, or, with ``width=`` and ``block=``, a narrower stack of its own (MaskDiT's asymmetric decoder).
At eval nothing is dropped; with an added decoder, eval equals running the backbone and then the decoder.

Unmasking tuning, as MaskDiT ends its training: ``tokenroute.set_ratio(model, 0.0)``.

    apply_masking(model, MaskingConfig(ratio=0.5, decoder=2))   # or tokenroute.mask(model, 0.5, decoder=2)
    remove_masking(model)
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..core.plan import Segment, Stage
from ..core.operations import MaskTokens
from ..core.patches import Patch, PatchRegistry, SpliceOptions, remove_patch
from ..core.route import Route, RouteError, check_ratio
from ..core.stack import BlockStack

NAME = "masking"
MODULE_NAME = "tokenroute_masking"


@dataclass(frozen=True)
class Decoder:
    """An added decoder of ``depth`` blocks with its own position embedding:
    ``Decoder(depth, *, num_tokens=None, width=None, block=None)`` (the rest by keyword).

    By default its blocks are fresh copies of the stack's last block, at the model's width. With ``width``
    and ``block`` (a function of the width returning a block called like the stack's blocks, e.g.
    ``lambda w: DiTBlock(w, num_heads=8)``), it runs at its own width as MaskDiT's narrower decoder does:
    tokens are projected in and out, and every other argument of the model's width (the conditioning) is
    projected to the decoder's. ``num_tokens``: the full sequence length (prefix tokens included), found
    from the model's ``pos_embed`` when not given.
    """

    depth: int = 2
    num_tokens: int | None = field(default=None, kw_only=True)
    width: int | None = field(default=None, kw_only=True)
    block: Callable[[int], nn.Module] | None = field(default=None, kw_only=True)


class MaskDecoder(nn.Module):
    """Position embedding, then blocks, each called like the stack's last block (same conditioning)."""

    def __init__(self, template: nn.Module, config: Decoder, num_tokens: int, dim: int, arguments: Sequence[str]):
        super().__init__()
        width = config.width or dim
        self.dim, self.width = dim, width
        if width != dim:
            self.proj_in, self.proj_out = nn.Linear(dim, width), nn.Linear(width, dim)
            self.proj_args = nn.ModuleDict({name: nn.Linear(dim, width) for name in arguments})
            blocks = [config.block(width) for _ in range(config.depth)]
        else:
            blocks = [copy.deepcopy(template) for _ in range(config.depth)]
            for block in blocks:
                for module in block.modules():
                    if hasattr(module, "reset_parameters") and module is not block:
                        module.reset_parameters()
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.width != self.dim:
            x = self.proj_in(x)
            kwargs = {k: self.proj_args[k](v) if k in self.proj_args and isinstance(v, torch.Tensor)
                      and v.shape[-1] == self.dim else v for k, v in kwargs.items()}
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x, **kwargs)
        return self.proj_out(x) if self.width != self.dim else x


class TokenMasking(nn.Module):
    """The parameters masked training adds to the model: the mask token and, optionally, a decoder."""

    def __init__(self, dim: int, decoder: MaskDecoder | None):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.decoder = decoder

    def fill(self, stream: torch.Tensor) -> torch.Tensor:
        return self.mask_token.to(stream.dtype).expand_as(stream)


def _num_tokens(owner: nn.Module) -> int:
    pos = getattr(owner, "pos_embed", None)
    if isinstance(pos, torch.Tensor) and pos.dim() == 3:
        return pos.shape[1]
    raise RouteError("cannot tell the sequence length for the decoder's position embedding; "
                     "give it: tokenroute.mask(model, decoder=tokenroute.Decoder(depth, num_tokens=N))")


@dataclass
class MaskingConfig(SpliceOptions):
    """MaskDiT's masking and decoder (and ``seed``, ``prefix_tokens``, ``mechanism``, ``blocks``: see
    ``SpliceOptions``).

    ratio: fraction of the tokens dropped per sample in training, in [0, 1).
    decoder: ``k`` (the last k blocks of the stack decode) or ``Decoder(depth, ...)`` (an added stack).
    """

    ratio: float = 0.5
    decoder: int | Decoder = 2


class MaskingPatch(Patch):
    name = NAME
    order = 10
    title = "masked training"

    def __init__(self, config: MaskingConfig, stack: BlockStack):
        super().__init__()
        ratio = check_ratio(config.ratio, "mask ratio")
        decoder, depth = config.decoder, len(stack)
        dim = stack.width()
        added = _check_decoder(decoder, stack)
        if added:
            parameters = inspect.signature(stack.blocks[-1].forward).parameters
            spec = stack.specs[-1]
            num_tokens = decoder.num_tokens or _num_tokens(stack.owner)
            arguments = [n for n in parameters if n != spec.stream and spec.role(n) != "tokens"]
            added_decoder = MaskDecoder(stack.blocks[-1], decoder, num_tokens, dim, arguments)
            encoder_end = depth - 1
        else:
            added_decoder = None
            encoder_end = depth - 1 - decoder
        self.masking = TokenMasking(dim, added_decoder)
        self.modules = {MODULE_NAME: self.masking}
        self.take_options(config)
        self.segments = [Segment(Route(0, encoder_end, ratio), MaskTokens(self.generator, self.masking.fill), NAME)]
        if added_decoder is not None:
            self.stages = [Stage(depth - 1, added_decoder, NAME)]

    def describe(self, stack: BlockStack) -> list[str]:
        owner = stack.owner_path or "<model>"
        count = sum(p.numel() for p in self.masking.parameters())
        parts = ", ".join(f"{n} {tuple(p.shape)}" if p.dim() <= 1 else n for n, p in self.masking.named_parameters()
                          if n.count(".") <= 1)
        lines = [f"  {self.title} adds {owner}.{MODULE_NAME}: {count:,} parameters ({parts})"]
        decoder = self.masking.decoder
        if decoder is not None:
            lines.append(f"  after the last block: {type(decoder).__name__} ({len(decoder.blocks)} blocks, width "
                         f"{decoder.width}); eval runs it with nothing dropped")
        return lines


def _check_decoder(decoder: Any, stack: BlockStack) -> bool:
    """Validate ``decoder`` against the stack; True for an added decoder, False for the stack's last k blocks."""
    depth = len(stack)
    if isinstance(decoder, Decoder):
        if decoder.depth < 1:
            raise RouteError(f"Decoder depth {decoder.depth} must be at least 1")
        spec = stack.specs[-1]
        if spec.stream_output is not None:
            raise RouteError(f"an added decoder needs blocks that return the token stream; "
                             f"{type(stack.blocks[-1]).__name__} returns a tuple: use decoder=k instead")
        parameters = inspect.signature(stack.blocks[-1].forward).parameters
        token_inputs = [n for n in spec.token_args if n in parameters]
        if token_inputs:
            raise RouteError(f"an added decoder copies the stack's last block, which takes the token-aligned input "
                             f"{token_inputs[0]!r} that a decoder after the stack cannot supply; use decoder=k")
        if (decoder.width is None) != (decoder.block is None):
            raise RouteError("Decoder(width=..., block=...) go together: a block of another width cannot be copied "
                             "from the stack; give both, or neither for copies at the model's width")
        return True
    if isinstance(decoder, bool) or not isinstance(decoder, int):
        raise RouteError(f"decoder {decoder!r} is neither a number of blocks nor a tokenroute.Decoder")
    if not 1 <= decoder < depth:
        raise RouteError(f"a decoder of {decoder} blocks does not fit a stack of {depth}: give 1..{depth - 1}")
    return False


def apply_masking(model: nn.Module, config: MaskingConfig) -> nn.Module:
    """Turn on MaskDiT masked training for ``model`` in place and return it."""
    registry = PatchRegistry.for_model(model, config.blocks)
    registry.apply(MaskingPatch(config, registry.stack))
    return model


def remove_masking(model: nn.Module) -> nn.Module:
    """Take masked training off ``model`` (the mask token and an added decoder go with it); other methods stay."""
    remove_patch(model, NAME)
    return model
