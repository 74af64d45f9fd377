"""Splice with module hooks when the owner's forward cannot be traced: the same boundaries, found at block
calls instead of in a graph. The first block of a segment starts it, every later block of the segment
passes the full-length values it receives (skips made before the segment) through it, the last block's
stream output leaves it, blocks after the segment send back values made inside it (skips), and a stage
runs after its block.

Hooks cannot see the forward's graph, so the token layout is the declared prefix; where none is declared and
the stream entering a route is longer or shorter than the stream the stack's first block received (text
joined between two stacks), the route is refused rather than routing the joined tokens."""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch
import torch.nn as nn

from ..blocks import bind_arguments, forward_parameters, with_stream_output
from ..route import RouteError
from ..stack import BlockStack
from .boundaries import Boundaries


class HookSplice:
    """Installs and removes the hooks; ``active`` is set by the owner's forward for each spliced call.

    Hooks are bound methods (through ``functools.partial``), so a deep copy of the model carries hooks that
    call the copy's own splice."""

    def __init__(self, stack: BlockStack, boundaries: Boundaries):
        self.stack, self.boundaries = stack, boundaries
        self.active = False
        self.first_length: int | None = None  # tokens in the stream the stack's first block received
        self.handles: list[Any] = []
        plan = boundaries.plan
        self.made: list[dict[int, weakref.ref]] = [{} for _ in plan.segments]  # outputs made inside each segment
        self.route_of = plan.route_of()
        self.stage_of = {stage.after: k for k, stage in enumerate(plan.stages)}

    def begin(self) -> None:
        """Start of a spliced forward."""
        self.active = True
        for made in self.made:
            made.clear()

    def install(self) -> None:
        for position, block in enumerate(self.stack.blocks):
            self.handles.append(block.register_forward_pre_hook(functools.partial(self._pre_hook, position),
                                                                with_kwargs=True, prepend=True))
            if position in self.route_of or position in self.stage_of:
                self.handles.append(block.register_forward_hook(functools.partial(self._post_hook, position),
                                                                with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _made_in(self, j: int, value: Any) -> bool:
        ref = self.made[j].get(id(value))
        return ref is not None and ref() is value

    def _pre_hook(self, position: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self.active:
            return None
        spec, boundaries = self.stack.specs[position], self.boundaries
        segments = boundaries.plan.segments
        new = bind_arguments(module, args, kwargs)
        stream = new.get(spec.stream)
        length = stream.shape[1] if isinstance(stream, torch.Tensor) and stream.dim() >= 2 else None
        if position == 0:
            self.first_length = length
        for j, run in enumerate(boundaries.runs):  # values made inside finished segments come back
            if run is None or segments[j].route.end >= position:
                continue
            for n, v in new.items():
                if n != spec.stream and spec.role(n) != "pass" and self._made_in(j, v):
                    (new[n],) = boundaries.exit(j, (v,), [True])
        i = self.route_of.get(position)
        names = list(new)
        if i is not None and segments[i].route.start == position:
            if not isinstance(stream, torch.Tensor) or stream.dim() < 3:
                raise RouteError(
                    f"the stream entering route {i} (argument {spec.stream!r} of {self.stack.paths[position]}) has "
                    f"shape {tuple(getattr(stream, 'shape', ()))}: tokenroute routes streams laid out (B, L, D), and "
                    "a packed sequence with no batch axis has none to keep the draw per sample. Keep routes off "
                    "these blocks, or register the block with the argument that carries (B, L, D) tokens")
            if not boundaries.plan.prefix_declared and length != self.first_length:
                raise RouteError(
                    f"the stream entering route {i} ({self.stack.paths[position]}) has {length} tokens, the stack's "
                    f"first block received {self.first_length}: tokens were joined between them, and module hooks "
                    "cannot read which are image tokens. Declare prefix_tokens=K for the K leading tokens that must "
                    "never be routed, or let the graph splice read the layout (mechanism='fx')")
            new = dict(zip(names, boundaries.enter(i, new[spec.stream], tuple(new.values()),
                                                   [spec.role(n) for n in names])))
        elif i is not None:  # values made before the segment enter it
            roles = ["pass" if n == spec.stream or spec.role(n) == "pass" else
                     spec.role(n) if spec.role(n) in ("table", "modulation") else "auto" for n in names]
            new = dict(zip(names, boundaries.reduce(i, tuple(new.values()), roles)))
        positional = [p.name for p in forward_parameters(module) if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        order = [positional[k] if k < len(positional) else f"*{k - len(positional)}" for k in range(len(args))]
        return tuple(new[n] for n in order), {k: new[k] for k in kwargs}

    def _post_hook(self, position: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Inside a segment: remember the block's output (it may be kept as a skip); at its end: the stream
        leaves it; after a stage's block: run the stage."""
        if not self.active:
            return None
        spec, boundaries = self.stack.specs[position], self.boundaries
        spec = with_stream_output(module, spec, bind_arguments(module, args, kwargs).get(spec.stream), output)
        i = self.route_of.get(position)
        last = i is not None and boundaries.plan.segments[i].route.end == position
        stage = self.stage_of.get(position)
        stream = output if spec.stream_output is None else output[spec.stream_output]
        if i is not None and not last:
            self.made[i][id(stream)] = weakref.ref(stream)
            return None
        if last:
            (stream,) = boundaries.exit(i, (stream,), [True])
        if stage is not None:
            bound = bind_arguments(module, args, kwargs)
            bound.pop(spec.stream)
            stream = boundaries.after_block(stage, stream, bound)
        if spec.stream_output is None:
            return stream
        out = list(output)
        out[spec.stream_output] = stream
        return type(output)(out) if isinstance(output, tuple) else out
