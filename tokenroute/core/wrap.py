"""wrap / unwrap: patch the owner's forward in place so that training forwards route tokens."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import types
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from . import graph_splice
from .boundary import RoutingState
from .hook_splice import HookSplice
from .route import RouteError, check_ratio, normalize_routes
from .stack import BlockStack, find_stack

ATTRIBUTE = "_tokenroute"
MECHANISMS = ("auto", "fx", "hooks")


@dataclass
class Extension:
    """What a method built on routing adds to the splice (masked training uses all of it).

    fills: per route, what skipped tokens return as (None: their route-start values).
    modules: submodules registered on the owner (saved with the model, removed by unwrap).
    after_stack: run on the stream right after the last block, with the last block's other arguments.
    always_splice: eval forwards run the splice too, with nothing dropped (needed with after_stack).
    """

    fills: list[Any] | None = None
    modules: dict[str, nn.Module] = field(default_factory=dict)
    after_stack: nn.Module | None = None
    always_splice: bool = False
    name: str = "routing"


class Routing:
    """The wrap's record on the model: stack, state, splice, traced graphs and how to undo it all."""

    def __init__(self, model: nn.Module, stack: BlockStack, state: RoutingState, mechanism: str,
                 extension: Extension):
        self.model, self.stack, self.state, self.extension = model, stack, state, extension
        self.requested = mechanism
        self.mechanism = "hooks" if mechanism == "hooks" else "fx"
        self.fallback_reason: str | None = None
        self.traced: dict[tuple, graph_splice.TracedForward] = {}
        self.hooks = HookSplice(stack, state, extension.after_stack)
        owner = stack.owner
        self.had_instance_forward = "forward" in owner.__dict__
        self.original_forward = owner.__dict__.get("forward")
        self.original_function = type(owner).forward if self.original_forward is None else \
            getattr(self.original_forward, "__func__", None)

    # -- forward -------------------------------------------------------------------------------
    def call_original(self, *args: Any, **kwargs: Any) -> Any:
        owner = self.stack.owner
        if self.original_forward is not None:
            return self.original_forward(*args, **kwargs)
        return type(owner).forward(owner, *args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        owner, state = self.stack.owner, self.state
        routing = state.active(owner.training)
        state.begin_forward(routing)
        if not routing and not self.extension.always_splice:
            return self.call_original(*args, **kwargs)
        try:
            if routing:
                return self._spliced(args, kwargs)
            with routing_override(state, ratios=[0.0] * len(state.routes)):  # the splice, nothing dropped
                return self._spliced(args, kwargs)
        finally:
            state.end_forward()

    def _spliced(self, args: tuple, kwargs: dict) -> Any:
        owner = self.stack.owner
        if self.mechanism == "fx":
            key, constants, tensors, spec = graph_splice.signature_key(owner.training, args, kwargs)
            traced = self.traced.get(key)
            if traced is None:
                traced = self._trace(key, args, kwargs, constants, tensors, spec)
            if traced is not None:
                return traced(tuple(tensors))
        self.hooks.begin()
        try:
            return self.call_original(*args, **kwargs)
        finally:
            self.hooks.routing = False

    def prepare(self, args: tuple, kwargs: dict) -> graph_splice.TracedForward | None:
        """Trace for this call's signature as a training forward would, without running routing."""
        owner = self.stack.owner
        was_training = owner.training
        owner.train()
        try:
            key, constants, tensors, spec = graph_splice.signature_key(True, args, kwargs)
            return self.traced.get(key) or self._trace(key, args, kwargs, constants, tensors, spec)
        finally:
            owner.train(was_training)

    @torch.compiler.disable
    def _trace(self, key, args, kwargs, constants, tensors, spec) -> graph_splice.TracedForward | None:
        function = self.original_function
        if function is None:
            raise RouteError("the owner's forward is not a method; wrap before patching forward")
        cuda = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
        try:
            # the trace runs the forward once, in the caller's grad mode (the forward may branch on it);
            # leave the caller's random streams as they were
            with torch.random.fork_rng(devices=cuda):
                traced = graph_splice.trace(self.stack, function, self.state, args, kwargs, constants, tensors, spec,
                                            after_stack=self.extension.after_stack)
        except RouteError:
            raise
        except Exception as err:  # untraceable forward: fall back to hooks, with the same semantics
            with torch.no_grad(), torch.random.fork_rng(devices=cuda):
                self.call_original(*args, **kwargs)  # the model's own error on bad input surfaces here
            if self.requested == "fx":
                raise RouteError(f"torch.fx could not trace {type(self.stack.owner).__name__}.forward: {err}") from err
            self.fallback_reason = f"{type(err).__name__}: {err}"
            self.mechanism = "hooks"
            self.hooks.install()
            return None
        self.traced[key] = traced
        return traced

    # -- undo ----------------------------------------------------------------------------------
    def remove(self) -> None:
        owner = self.stack.owner
        self.hooks.remove()
        if self.had_instance_forward:
            owner.forward = self.original_forward
        else:
            del owner.forward
        for name in self.extension.modules:
            delattr(owner, name)
        for module in (self.model, owner):
            module.__dict__.pop(ATTRIBUTE, None)


def wrap(
    model: nn.Module,
    routes: Sequence[Any],
    *,
    blocks: str | Sequence[str] | None = None,
    seed: int | None = None,
    prefix_tokens: int | None = None,
    protect: torch.Tensor | Any = None,
    mechanism: str = "auto",
    _extension: Extension | None = None,
) -> nn.Module:
    """Turn on TREAD token routing for ``model`` in place and return it.

    routes: ``(start, end, ratio)`` tuples or ``Route`` objects; ``end`` inclusive, negative indices
        count from the end of the stack, ``ratio`` is the fraction of tokens that skip the route.
    blocks: dotted path(s) of the block container(s) when the stack is not found automatically.
    seed: seed of the routing generator (default: torch's initial seed); offset by the distributed rank.
    prefix_tokens: leading tokens never routed (time/label/class tokens); default: the owner's or the
        model's ``num_prefix_tokens`` attribute (timm's convention), else 0.
    protect: bool (N,) or (B, N) tensor, or a callable of the routable tokens returning one: True marks
        tokens that are never routed.
    mechanism: "auto" (graph rewrite, falling back to module hooks where the forward cannot be traced),
        "fx" (graph rewrite or error) or "hooks".
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap expects an nn.Module, got {type(model).__name__}")
    if hasattr(model, ATTRIBUTE):
        raise RouteError(f"{type(model).__name__} is already wrapped; call tokenroute.unwrap(model) first")
    if mechanism not in MECHANISMS:
        raise RouteError(f"mechanism {mechanism!r} is not one of {MECHANISMS}")
    stack = find_stack(model, blocks)
    if hasattr(stack.owner, ATTRIBUTE):
        raise RouteError("the block stack's owner is already wrapped; call tokenroute.unwrap first")
    resolved = normalize_routes(routes, len(stack))
    if prefix_tokens is None:
        prefix_tokens = getattr(stack.owner, "num_prefix_tokens", getattr(model, "num_prefix_tokens", 0))
    if not isinstance(prefix_tokens, int) or prefix_tokens < 0:
        raise RouteError(f"prefix_tokens {prefix_tokens!r} must be a non-negative integer")
    if protect is not None and not (callable(protect) or isinstance(protect, torch.Tensor)):
        raise RouteError("protect must be a bool tensor (N,) or (B, N), or a callable returning one")
    extension = _extension or Extension()
    taken = [name for name in extension.modules if hasattr(stack.owner, name)]
    if taken:
        raise RouteError(f"{type(stack.owner).__name__} already has an attribute {taken[0]!r}")
    state = RoutingState(resolved, seed=seed, prefix_tokens=prefix_tokens, protect=protect, fills=extension.fills)
    record = Routing(model, stack, state, mechanism, extension)

    owner = stack.owner
    signature_source = record.original_forward or types.MethodType(type(owner).forward, owner)

    def routed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__[ATTRIBUTE].forward(*args, **kwargs)  # via self: deep copies route themselves

    functools.update_wrapper(routed_forward, signature_source)
    routed_forward.__signature__ = inspect.signature(signature_source)
    routed_forward.__tokenroute__ = True
    owner.forward = types.MethodType(routed_forward, owner)
    for name, module in extension.modules.items():
        owner.add_module(name, module)
    if mechanism == "hooks":
        record.hooks.install()
    object.__setattr__(model, ATTRIBUTE, record)
    object.__setattr__(owner, ATTRIBUTE, record)
    return model


def _record(model: nn.Module) -> Routing:
    record = getattr(model, ATTRIBUTE, None)
    if record is None:
        raise RouteError(f"{type(model).__name__} is not wrapped; call tokenroute.wrap(model, routes) first")
    return record


def unwrap(model: nn.Module) -> nn.Module:
    """Remove routing: the owner's original forward comes back exactly, hooks and graphs are dropped."""
    _record(model).remove()
    return model


def is_wrapped(model: nn.Module) -> bool:
    return hasattr(model, ATTRIBUTE)


def routing_masks(model: nn.Module) -> list[torch.Tensor]:
    """After a routed forward: one bool (B, N) tensor per route, True where the token skipped it.
    Empty when the last forward did not route."""
    return _record(model).state.masks()


@contextlib.contextmanager
def routing_override(state: RoutingState, *, ratios: list[float] | None = None,
                     enabled: bool | None = None) -> Iterator[None]:
    saved = state.force, state.ratio_override
    state.force = enabled if enabled is not None else state.force
    state.ratio_override = ratios if ratios is not None else state.ratio_override
    try:
        yield
    finally:
        state.force, state.ratio_override = saved


def _ratios(state: RoutingState, ratio: float | Sequence[float]) -> list[float]:
    ratios = [ratio] * len(state.routes) if isinstance(ratio, (int, float)) else list(ratio)
    if len(ratios) != len(state.routes):
        raise RouteError(f"{len(ratios)} ratios given for {len(state.routes)} routes")
    return [check_ratio(r) for r in ratios]


def routing(model: nn.Module, *, ratio: float | Sequence[float] | None = None,
            enabled: bool | None = None) -> contextlib.AbstractContextManager[None]:
    """Override routing for the calls inside the block: ``enabled=True`` routes in eval mode too (routing
    guidance at sampling), ``False`` never routes, ``ratio`` replaces every route's ratio (a float, or
    one per route)."""
    state = _record(model).state
    return routing_override(state, ratios=None if ratio is None else _ratios(state, ratio), enabled=enabled)


def set_ratio(model: nn.Module, ratio: float | Sequence[float]) -> None:
    """Change every route's ratio (a float, or one per route) from now on; e.g. 0.0 to finish masked
    training unmasked (MaskDiT's unmasking tuning) or to anneal TREAD's ratio with a schedule."""
    state = _record(model).state
    state.routes = [dataclasses.replace(r, ratio=q) for r, q in zip(state.routes, _ratios(state, ratio))]


def routing_state_dict(model: nn.Module) -> dict[str, Any]:
    """The routing generators' states, to save with a checkpoint so that a resumed run draws the same masks."""
    return _record(model).state.generator.state_dict()


def load_routing_state_dict(model: nn.Module, state: dict[str, Any]) -> None:
    _record(model).state.generator.load_state_dict(state)
