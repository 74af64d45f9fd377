"""Route with module hooks when the owner's forward cannot be traced: the same boundaries, applied at
block calls. The first block of a route gathers its token-aligned arguments, every later block of the
route gathers full-length ones it receives (skips made before the route), the last block's stream output
is scattered back, and blocks after the route scatter kept-length arguments (skips made inside it)."""

from __future__ import annotations

import weakref
from typing import Any

import torch.nn as nn

from .boundary import RoutingState, gather_value, scatter_value
from .registry import bind_arguments, forward_parameters
from .stack import BlockStack


class HookSplice:
    """Installs and removes the hooks; ``routing`` is set by the owner's forward for each call."""

    def __init__(self, stack: BlockStack, state: RoutingState, after_stack: nn.Module | None = None):
        self.stack, self.state, self.after_stack = stack, state, after_stack
        self.routing = False
        self.handles: list[Any] = []
        self.made: list[dict[int, weakref.ref]] = [{} for _ in state.routes]  # outputs made inside each route
        self.route_of: dict[int, int] = {}
        for i, route in enumerate(state.routes):
            for b in range(route.start, route.end + 1):
                self.route_of[b] = i

    def begin(self) -> None:
        """Start of a routed forward."""
        self.routing = True
        for made in self.made:
            made.clear()

    def _made_in(self, j: int, value: Any) -> bool:
        ref = self.made[j].get(id(value))
        return ref is not None and ref() is value

    def install(self) -> None:
        for position, block in enumerate(self.stack.blocks):
            self.handles.append(block.register_forward_pre_hook(self._pre_hook(position), with_kwargs=True))
            if position in self.route_of or (self.after_stack is not None and position == len(self.stack) - 1):
                self.handles.append(block.register_forward_hook(self._post_hook(position), with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _pre_hook(self, position: int):
        spec = self.stack.specs[position]
        block = self.stack.blocks[position]
        names = [p.name for p in forward_parameters(block) if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if not self.routing:
                return None
            new = bind_arguments(module, args, kwargs)
            for j, run in enumerate(self.state.runs):  # values made inside finished routes come back
                if run is None or self.state.routes[j].end >= position or run.kept_length == run.length:
                    continue
                for n, v in new.items():
                    if n != spec.stream and spec.role(n) != "pass" and self._made_in(j, v):
                        new[n] = scatter_value(run, v)
            route = self.route_of.get(position)
            if route is not None and self.state.routes[route].start == position:
                run = self.state.start(route, new[spec.stream], shared=any(
                    spec.role(n) == "table" and v is not None for n, v in new.items()))
                new = {n: gather_value(run, v, spec.role(n)) for n, v in new.items()}
            elif route is not None:  # values made before the route enter it
                run = self.state.runs[route]
                new = {n: v if n == spec.stream or spec.role(n) == "pass" else
                       gather_value(run, v, "table" if spec.role(n) == "table" else "auto")
                       for n, v in new.items()}
            positional = [names[k] if k < len(names) else f"*{k - len(names)}" for k in range(len(args))]
            return tuple(new[n] for n in positional), {k: new[k] for k in kwargs}

        return hook

    def _post_hook(self, position: int):
        """Inside a route: remember the block's output (it may be kept as a skip); at its end: scatter;
        after the last block: run the extension's added stack."""
        spec = self.stack.specs[position]
        route = self.route_of.get(position)
        last = route is not None and self.state.routes[route].end == position
        final = self.after_stack is not None and position == len(self.stack) - 1

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if not self.routing:
                return None
            stream = output if spec.stream_output is None else output[spec.stream_output]
            if route is not None and not last:
                self.made[route][id(stream)] = weakref.ref(stream)
                return None
            if last:
                stream = scatter_value(self.state.runs[route], stream)
            if final:
                bound = bind_arguments(module, args, kwargs)
                bound.pop(spec.stream)
                stream = self.after_stack(stream, **bound)
            if spec.stream_output is None:
                return stream
            out = list(output)
            out[spec.stream_output] = stream
            return type(output)(out) if isinstance(output, tuple) else out

        return hook
