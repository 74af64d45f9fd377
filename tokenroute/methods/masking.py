"""MaskDiT masked training (arXiv 2306.09305) on any backbone that ``tokenroute.wrap`` supports.

Per sample a random ``ratio`` of the tokens is dropped after the embedding (prefix tokens never); the
encoder blocks run on the visible tokens in their original order; at the decoder's entry the dropped
positions are filled with a learnable mask token and the decoder runs on the full sequence. It is a route
from block 0 to the end of the encoder whose skipped tokens come back as the mask token instead of their
own values, so it shares TREAD's machinery: ``routing_masks`` reports the dropped tokens (True = dropped)
and ``tokenroute.losses.combine(..., mode="visible", mae=..., mae_weight=0.1)`` gives MaskDiT's loss.

Decoders: ``decoder=k`` uses the last k blocks of the stack (no new architecture, as MDT); ``decoder=
Decoder(depth=...)`` adds fresh copies of the stack's last block after it, with their own learned position
embedding (MaskDiT's asymmetric decoder; its width is the model's). At eval nothing is dropped; with an added
decoder, eval equals running the backbone and then the decoder.

Unmasking tuning, as MaskDiT ends its training: ``tokenroute.set_ratio(model, 0.0)``.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..core.route import Route, RouteError, check_ratio
from ..core.stack import find_stack
from ..core.wrap import Extension, wrap

MODULE_NAME = "tokenroute_masking"


@dataclass(frozen=True)
class Decoder:
    """An added decoder: ``depth`` fresh copies of the stack's last block. ``num_tokens``: length of the
    full sequence (prefix tokens included), for its position embedding; found from the model's
    ``pos_embed`` when not given."""

    depth: int = 2
    num_tokens: int | None = None


class MaskDecoder(nn.Module):
    """Position embedding, then blocks, each called like the stack's last block (same conditioning)."""

    def __init__(self, template: nn.Module, depth: int, num_tokens: int, dim: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(copy.deepcopy(template) for _ in range(depth))
        for block in self.blocks:
            for module in block.modules():
                if hasattr(module, "reset_parameters") and module is not block:
                    module.reset_parameters()

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x, **kwargs)
        return x


class TokenMasking(nn.Module):
    """The parameters masked training adds to the model: the mask token and, optionally, a decoder."""

    def __init__(self, dim: int, decoder: MaskDecoder | None):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.decoder = decoder

    def fill(self, stream: torch.Tensor) -> torch.Tensor:
        return self.mask_token.to(stream.dtype).expand_as(stream)


def _width(owner: nn.Module, blocks: Sequence[nn.Module]) -> int:
    for name in ("hidden_size", "embed_dim", "inner_dim", "dim"):
        value = getattr(owner, name, None) or getattr(getattr(owner, "config", None), name, None)
        if isinstance(value, int):
            return value
    norms = [m for m in blocks[0].modules() if isinstance(m, nn.LayerNorm)]
    if norms:
        return norms[0].normalized_shape[-1]
    raise RouteError("cannot tell the token width of the model; give the owner a hidden_size attribute")


def _num_tokens(owner: nn.Module) -> int:
    pos = getattr(owner, "pos_embed", None)
    if isinstance(pos, torch.Tensor) and pos.dim() == 3:
        return pos.shape[1]
    raise RouteError("cannot tell the sequence length for the decoder's position embedding; "
                     "give it: tokenroute.mask(model, decoder=tokenroute.Decoder(depth, num_tokens=N))")


def mask(
    model: nn.Module,
    ratio: float = 0.5,
    decoder: int | Decoder = 2,
    *,
    routes: Sequence[Any] = (),
    blocks: str | Sequence[str] | None = None,
    seed: int | None = None,
    prefix_tokens: int | None = None,
    mechanism: str = "auto",
) -> nn.Module:
    """Turn on MaskDiT masked training for ``model`` in place and return it; undo with ``tokenroute.unwrap``.

    ratio: fraction of the tokens dropped per sample in training, in [0, 1).
    decoder: ``k`` (the last k blocks of the stack decode) or ``Decoder(depth, num_tokens)`` (an added stack).
    routes: TREAD routes to apply as well (inside the decoder only: they may not overlap the encoder).
    """
    ratio = check_ratio(ratio, "mask ratio")
    stack = find_stack(model, blocks)
    depth = len(stack)
    added = isinstance(decoder, Decoder)
    if not added and (isinstance(decoder, bool) or not isinstance(decoder, int)):
        raise RouteError(f"decoder {decoder!r} is neither a number of blocks nor a tokenroute.Decoder")
    if added:
        if decoder.depth < 1:
            raise RouteError(f"Decoder depth {decoder.depth} must be at least 1")
        encoder_end = depth - 1
        spec = stack.specs[-1]
        if spec.stream_output is not None:
            raise RouteError(f"an added decoder needs blocks that return the token stream; "
                             f"{type(stack.blocks[-1]).__name__} returns a tuple: use decoder=k instead")
        token_inputs = [n for n in spec.token_args if n in inspect.signature(stack.blocks[-1].forward).parameters]
        if token_inputs:
            raise RouteError(f"an added decoder copies the stack's last block, which takes the token-aligned input "
                             f"{token_inputs[0]!r} that a decoder after the stack cannot supply; use decoder=k")
        num_tokens = decoder.num_tokens or _num_tokens(stack.owner)
        dec = MaskDecoder(stack.blocks[-1], decoder.depth, num_tokens, _width(stack.owner, stack.blocks))
    else:
        if not 1 <= decoder < depth:
            raise RouteError(f"a decoder of {decoder} blocks does not fit a stack of {depth}: give 1..{depth - 1}")
        encoder_end = depth - 1 - decoder
        dec = None
    masking = TokenMasking(_width(stack.owner, stack.blocks), dec)
    extension = Extension(fills=None, modules={MODULE_NAME: masking}, after_stack=dec, always_splice=added,
                          name="masked training")
    all_routes = [Route(0, encoder_end, ratio), *routes]
    extension.fills = [masking.fill] + [None] * len(routes)
    wrap(model, all_routes, blocks=blocks, seed=seed, prefix_tokens=prefix_tokens, mechanism=mechanism,
         _extension=extension)
    return model
