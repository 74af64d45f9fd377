"""Per-block-class facts: which argument carries the token stream, which output returns it, which
arguments are other token-aligned tensors, batch-free token tables, or conditioning that is never routed,
and, inside the block, which submodules compute its residual branches (attention, MLP).

Keyed by class name so that registering diffusers' blocks needs no diffusers import.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .route import RouteError


@dataclass(frozen=True)
class Branch:
    """A residual branch inside a block: the submodule that computes it (``path``, relative to the block)
    and which of its outputs is the branch's value before the block gates it and adds it to the stream
    (``output``: an index into a tuple output, None when the submodule returns the value itself).

    Feature caching reuses these values across sampling steps; local attention replaces the attention.
    """

    kind: str  # "attention", "cross_attention" or "mlp"
    path: str
    output: int | None = None
    optional: bool = False  # absent (or None) in some configurations of the block class


@dataclass(frozen=True)
class BlockSpec:
    """How tokens flow through one block class.

    stream: name of the argument that carries the routed token stream (B, L, D).
    stream_output: index of the stream in a tuple output; None when the block returns the stream itself.
    token_args: other arguments aligned with the stream's tokens on axis 1 (U-ViT's skip).
    table_args: batch-free tables aligned with the tokens on axis 0 (rotary embeddings); may hold extra
        leading rows for tokens that are not routed (text tokens in joint attention).
    context_args: arguments that are never routed (conditioning, text tokens, their masks).
    modulation_args: conditioning given either once per sample or per token (a per-token timestep
        modulation (B, L, ...)): gathered with the tokens when its axis 1 runs along them, passed otherwise.
    branches: the block's residual branches (``Branch``); None: found by the submodules' names, and a
        block with none found is treated as a whole (its residual, output minus input).
    joint: where the block's attention puts the other tokens (text) beside the stream's when it joins them:
        "text_first" ([text, image], Flux) or "text_last" ([image, text], HunyuanVideo). Attention masks and
        rotary tables spanning the joined sequence are then reduced at the stream's positions in it. None:
        not joined, or not known (a batch-free table with extra rows is read text first, as Flux's).
    """

    stream: str
    stream_output: int | None = None
    token_args: tuple[str, ...] = ()
    table_args: tuple[str, ...] = ()
    context_args: tuple[str, ...] = ()
    branches: tuple[Branch, ...] | None = None
    joint: str | None = None
    modulation_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.joint not in (None, "text_first", "text_last"):
            raise RouteError(f"BlockSpec(joint={self.joint!r}): give 'text_first', 'text_last' or None")

    def role(self, name: str) -> str:
        """'tokens', 'table', 'modulation', 'pass', or 'auto' (decided at run time by the tensor's shape)."""
        if name == self.stream or name in self.token_args:
            return "tokens"
        if name in self.table_args:
            return "table"
        if name in self.modulation_args:
            return "modulation"
        if name in self.context_args:
            return "pass"
        return "auto"


_CONTEXT = ("c", "cond", "emb", "temb", "t", "timestep", "y", "context", "encoder_hidden_states",
            "encoder_attention_mask", "class_labels", "cross_attention_kwargs", "added_cond_kwargs",
            "joint_attention_kwargs")
_TOKEN_ARGS = ("skip",)
_TABLES = ("image_rotary_emb", "rotary_emb", "freqs_cis", "rope", "rotary_pos_emb")

# submodule names that compute a block's attention and MLP branches, by convention (timm, DiT, diffusers)
_ATTENTION_NAMES = ("attn", "attn1", "self_attn", "attention")
_MLP_NAMES = ("mlp", "ff", "feed_forward", "ffn")

_JOINT = dict(stream="hidden_states", stream_output=1, table_args=_TABLES, context_args=_CONTEXT, joint="text_first")
_TEXT_LAST = dict(stream="hidden_states", table_args=_TABLES, context_args=_CONTEXT, joint="text_last")
_JOINT_BRANCHES = (Branch("attention", "attn", output=0), Branch("attention", "attn2", optional=True),
                   Branch("mlp", "ff"))
BLOCK_REGISTRY: dict[str, BlockSpec] = {
    # diffusers
    "BasicTransformerBlock": BlockSpec("hidden_states", context_args=_CONTEXT, branches=(
        Branch("attention", "attn1"), Branch("cross_attention", "attn2", optional=True), Branch("mlp", "ff"))),
    "PixArtTransformerBlock": BlockSpec("hidden_states", context_args=_CONTEXT),
    # SD3's JointAttnProcessor2_0 attends over [image, text], Flux's processor over [text, image]
    "JointTransformerBlock": BlockSpec(**(_JOINT | dict(joint="text_last")), branches=_JOINT_BRANCHES),
    "FluxTransformerBlock": BlockSpec(**_JOINT, branches=_JOINT_BRANCHES),
    # attention and MLP run in parallel and are gated together: the block is one branch (its residual)
    "FluxSingleTransformerBlock": BlockSpec(**_JOINT, branches=()),
    # attention over [image, text]: masks and rotary tables span both (read from their attention processors)
    "HunyuanVideoTransformerBlock": BlockSpec(**_TEXT_LAST, stream_output=0),
    "HunyuanVideoSingleTransformerBlock": BlockSpec(**_TEXT_LAST, stream_output=0, branches=()),
    "HunyuanImageTransformerBlock": BlockSpec(**_TEXT_LAST, stream_output=0),
    "HunyuanImageSingleTransformerBlock": BlockSpec(**_TEXT_LAST, stream_output=0, branches=()),
    "HiDreamBlock": BlockSpec(**_TEXT_LAST),
    "NucleusMoEImageTransformerBlock": BlockSpec(**_TEXT_LAST),
    # timestep modulation per token ((B, L, 6, D) in video models that denoise frames at different levels)
    "AnyFlowTransformerBlock": BlockSpec("hidden_states", table_args=_TABLES, modulation_args=("temb",),
                                         context_args=tuple(n for n in _CONTEXT if n != "temb")),
    "SanaWMLTX2RefinerTransformerBlock": BlockSpec("hidden_states", table_args=_TABLES + ("video_rotary_emb",),
                                                   modulation_args=("temb",),
                                                   context_args=tuple(n for n in _CONTEXT if n != "temb")),
}


def register_block(block_class: type | str, spec: BlockSpec) -> None:
    """Teach tokenroute how tokens flow through ``block_class`` (a class or its name)."""
    name = block_class if isinstance(block_class, str) else block_class.__name__
    BLOCK_REGISTRY[name] = spec


def forward_parameters(block: nn.Module) -> list[inspect.Parameter]:
    """The parameters of the block class's forward (without ``self``): a method that wraps the instance's
    forward (a feature cache) leaves the signature the block is called with as it was."""
    return list(inspect.signature(type(block).forward).parameters.values())[1:]


def spec_for(block: nn.Module) -> BlockSpec:
    """The registered spec of the block's class (or of a base class), else one read from its signature:
    the first positional argument is the stream, the output is the stream."""
    for cls in type(block).__mro__:
        if cls.__name__ in BLOCK_REGISTRY:
            return BLOCK_REGISTRY[cls.__name__]
    params = forward_parameters(block)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional:
        raise RouteError(
            f"cannot tell which argument of {type(block).__name__}.forward carries the tokens (its signature "
            f"is {inspect.signature(block.forward)}); register it: tokenroute.register_block("
            f"{type(block).__name__}, tokenroute.BlockSpec(stream='x'))"
        )
    return BlockSpec(positional[0].name, token_args=_TOKEN_ARGS, table_args=_TABLES, context_args=_CONTEXT)


def block_branches(block: nn.Module, spec: BlockSpec | None = None) -> tuple[Branch, ...]:
    """The residual branches inside ``block``: the registered ones, else an attention and an MLP submodule
    found by their conventional names (``attn``/``attn1``/``self_attn``/``attention`` and ``mlp``/``ff``/
    ``feed_forward``/``ffn``, direct children); empty when the block has no such pair (a Mamba block), in
    which case methods treat the block as a whole (its residual). Registered paths are checked."""
    spec = spec or spec_for(block)
    if spec.branches is not None:
        found = []
        for branch in spec.branches:
            try:
                present = isinstance(block.get_submodule(branch.path), nn.Module)
            except AttributeError:
                present = False
            if present:
                found.append(branch)
            elif not branch.optional:
                raise RouteError(
                    f"{type(block).__name__} is registered with a {branch.kind} branch at {branch.path!r}, but it "
                    f"has no such submodule; fix the BlockSpec's branches in tokenroute.register_block")
        return tuple(found)
    children = dict(block.named_children())
    attention = next((n for n in _ATTENTION_NAMES if n in children), None)
    mlp = next((n for n in _MLP_NAMES if n in children), None)
    if attention is None or mlp is None:
        return ()
    return Branch("attention", attention), Branch("mlp", mlp)


def with_stream_output(block: nn.Module, spec: BlockSpec, stream_in: Any, output: Any) -> BlockSpec:
    """``spec`` with the index of the stream in the block's tuple output, where the spec leaves it open.

    A block that returns a tuple and has no ``stream_output`` registered (e.g. ``(hidden_states,
    encoder_hidden_states)``) returns the stream at the one position whose tensor has the shape of the stream
    it received; when no position or several have it (text as long as the image), it cannot be told apart and
    is refused, never guessed."""
    if spec.stream_output is not None or not isinstance(output, (tuple, list)):
        return spec
    shape = getattr(stream_in, "shape", None)
    matches = [k for k, o in enumerate(output) if isinstance(o, torch.Tensor) and o.shape == shape]
    if len(matches) == 1:
        return dataclasses.replace(spec, stream_output=matches[0])
    shapes = [tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__ for o in output]
    raise RouteError(
        f"{type(block).__name__} returns a tuple {shapes} and {len(matches) or 'none'} of its items have the shape "
        f"{tuple(shape) if shape is not None else None} of the stream it received ({spec.stream!r}), so tokenroute "
        f"cannot tell which one carries the stream; register it: tokenroute.register_block({type(block).__name__}, "
        f"tokenroute.BlockSpec({spec.stream!r}, stream_output=K)) with K the index of the stream in the output")


def bind_arguments(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Map a call's positional and keyword arguments to the block's parameter names."""
    names = [p.name for p in forward_parameters(block) if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    bound = dict(zip(names, args))
    extra = args[len(names):]
    if extra:
        bound.update({f"*{i}": value for i, value in enumerate(extra)})
    bound.update(kwargs)
    return bound
