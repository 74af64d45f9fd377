"""Where the image tokens sit in a route's stream, and where each fact came from.

A stream entering a route may hold tokens that must never be routed beside the image tokens: time, label,
class or register tokens before them, text joined before or after them. The graph splice reads the layout
from the model's graph (a concatenation on the token axis says where the other tokens sit; the patch
embedding gives the grid); what cannot be read is declared (``prefix_tokens``), and where neither is
certain the route is refused. Every method that needs the image tokens (routing, local attention, token
density) reads them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .route import RouteError


@dataclass(frozen=True)
class TokenLayout:
    """A stream of ``length`` tokens: ``lead`` non-image tokens, then ``image`` image tokens, then the rest
    (``trail``). ``grid``: the image tokens' grid, row-major ((H, W), or (F, H, W) for video), None where it
    is not known. ``sources``: fact -> where it came from, for explain."""

    length: int
    lead: int
    image: int
    grid: tuple[int, ...] | None = None
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    joint: str | None = None  # where the blocks' joint attention puts other tokens: "text_first", "text_last"

    def __post_init__(self) -> None:
        if self.lead < 0 or self.image < 0 or self.lead + self.image > self.length:
            raise RouteError(f"a token layout of {self.lead} leading and {self.image} image tokens does not fit a "
                             f"stream of {self.length} tokens")

    @property
    def trail(self) -> int:
        return self.length - self.lead - self.image

    @property
    def image_slice(self) -> slice:
        return slice(self.lead, self.lead + self.image)

    @classmethod
    def declared(cls, length: int, prefix: int, declared: bool) -> "TokenLayout":
        """The layout a declared (or assumed) prefix count gives: ``prefix`` leading tokens, the rest image."""
        source = f"declared prefix_tokens={prefix}" if declared else "assumed: no prefix declared"
        lead = min(prefix, length)
        return cls(length, lead, length - lead, None, {"image tokens": source})

    def positions(self, index: torch.Tensor, size: int) -> torch.Tensor:
        """Kept positions ``index`` (B, K) of the stream, as positions along an axis of ``size`` that spans the
        blocks' joint sequence (the stream's tokens and, before or after them, the other tokens')."""
        if size == self.length:
            return index
        if size < self.length or self.joint is None:
            raise RouteError(
                f"an axis of {size} entries spans the stream's {self.length} tokens and {size - self.length} others "
                "(text in joint attention), and the blocks do not say on which side the others sit; register the "
                "block class with tokenroute.BlockSpec(..., joint='text_first' or 'text_last')")
        others = torch.arange(size - self.length, device=index.device).expand(index.shape[0], -1)
        if self.joint == "text_first":
            return torch.cat([others, index + others.shape[1]], dim=1)
        return torch.cat([index, others + self.length], dim=1)

    def describe(self) -> str:
        parts = [f"{self.length} tokens"]
        if self.lead or self.trail:
            parts.append(f"image tokens {self.lead}..{self.lead + self.image - 1}"
                         + (f" after {self.lead} others" if self.lead else "")
                         + (f", {self.trail} after them" if self.trail else ""))
        else:
            parts.append("all image tokens")
        parts.append(f"grid {'x'.join(map(str, self.grid))}" if self.grid else "grid unknown")
        if self.joint:
            parts.append(f"joint attention {self.joint.replace('_', ' ')}")
        facts = "; ".join(f"{fact}: {source}" for fact, source in self.sources.items())
        return ", ".join(parts) + (f" ({facts})" if facts else "")


# How a model class packs other tokens into its image input itself (a reference image's tokens in the same
# tensor), which no graph shows: class name -> function of the forward's arguments (by name) returning the
# slice of the image input's tokens that are the image's own. Keyed by name so that no import is needed.
INPUT_PACKINGS: dict[str, Callable[[dict[str, Any]], slice]] = {}


@dataclass(frozen=True)
class StreamTokens:
    """The tokens of a block's stream as the block runs: the full stream's ``layout`` and, where a route runs the
    block on a subset of them, the kept positions ``index`` (B, K) in the full stream (None: every token).
    ``order``: the name of a fixed order of every token that the whole batch shares (``index`` (1, L), a route
    that reorders the stream), so that what is read from it may be cached under that name; None: ``index`` is
    each sample's own draw."""

    layout: TokenLayout
    index: torch.Tensor | None = None
    order: str | None = None

    @property
    def shared(self) -> bool:
        """Whether every sample's tokens sit in the same places, the same in every forward (cacheable)."""
        return self.index is None or self.order is not None

    def grid_index(self, size: int | None = None, device: torch.device | None = None) -> torch.Tensor:
        """(B or 1, size): each entry's place on the image grid (row-major), -1 for tokens that are not image
        tokens. ``size``: the length of the sequence the block's attention sees, where joint attention adds
        other tokens (text) to the stream's on the side the layout's ``joint`` names; default the stream's."""
        layout = self.layout
        device = self.index.device if self.index is not None else device
        full = torch.full((layout.length,), -1, dtype=torch.long, device=device)
        full[layout.image_slice] = torch.arange(layout.image, device=device)
        tokens = full[None] if self.index is None else full[self.index]
        size = tokens.shape[1] if size is None else size
        if size == tokens.shape[1]:
            return tokens
        if size < tokens.shape[1] or layout.joint is None:
            raise RouteError(
                f"an attention sequence of {size} tokens holds the stream's {tokens.shape[1]} and "
                f"{size - tokens.shape[1]} others (text in joint attention), and the blocks do not say on which side "
                "the others sit; register the block class with tokenroute.BlockSpec(..., joint='text_first' or "
                "'text_last')")
        others = torch.full((tokens.shape[0], size - tokens.shape[1]), -1, dtype=torch.long, device=tokens.device)
        return torch.cat([others, tokens] if layout.joint == "text_first" else [tokens, others], dim=1)

    def image_span(self, size: int | None = None) -> tuple[int, int]:
        """The numbers of tokens before and after the image tokens in an attention sequence of ``size`` (the
        stream's, with joint attention's other tokens on the layout's ``joint`` side), where no route keeps a subset
        of the tokens (the image tokens are then contiguous); read from the layout, no device work."""
        layout = self.layout
        if self.index is not None and self.order is None:
            raise RouteError("the image tokens of a routed stream are not contiguous; they have no span")
        others = 0 if size is None else size - layout.length
        lead = layout.lead + (others if layout.joint == "text_first" else 0)
        return lead, layout.length + others - lead - layout.image

    def image_rows(self, size: int | None = None, device: torch.device | None = None) -> torch.Tensor | None:
        """(N,): where the grid's image tokens, row-major, sit in an attention sequence of ``size``, for a stream in
        a shared order (a reordered stream keeps its image tokens in their span, in another order); None where they
        sit row-major already (the span ``image_span`` gives)."""
        if self.index is None:
            return None
        if self.order is None:
            raise RouteError("the image tokens of a routed stream are a subset of the grid; they have no rows")
        places = self.grid_index(size, device)[0]
        positions = torch.nonzero(places >= 0).squeeze(1)
        return positions[torch.argsort(places[positions])]


def register_input_packing(model_class: type | str, image_tokens: Callable[[dict[str, Any]], slice]) -> None:
    """Declare that ``model_class``'s forward receives other tokens packed into its image input:
    ``image_tokens(arguments)`` returns the slice of the input's tokens that are the image's own (the same for
    every sample; raise a RouteError where it is not). The graph splice composes it with what it reads."""
    INPUT_PACKINGS[model_class if isinstance(model_class, str) else model_class.__name__] = image_tokens


def _joy_image_edit_plus(arguments: dict[str, Any]) -> slice:
    """JoyImage Edit Plus: per sample, the target's (t, h, w) patches first, then each reference image's."""
    shape_list = arguments.get("shape_list")
    targets = {t * h * w for t, h, w in (sample[0] for sample in shape_list or [])}
    if len(targets) != 1:
        raise RouteError(f"JoyImageEditPlusTransformer3DModel: shape_list={shape_list!r} gives targets of "
                         f"{sorted(targets)} tokens; routing needs one target size for the whole batch")
    return slice(0, targets.pop())


register_input_packing("JoyImageEditPlusTransformer3DModel", _joy_image_edit_plus)
