"""Splice a plan into the block stack. While segments or stages are applied, the owner's forward runs one
traced graph per input signature (``graph``, kept in a bounded cache), or the original forward with hooks
on the blocks where it cannot be traced (``hooks``); both carry out the plan through one ``Boundaries``."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import SUPPORTED_NODES, keystr, tree_flatten, tree_flatten_with_path, tree_structure

from ..plan import Plan
from ..route import RouteError
from ..stack import BlockStack
from . import graph
from .boundaries import Boundaries
from .hooks import HookSplice

MECHANISMS = ("auto", "fx", "hooks")


def _joint(stack: BlockStack, route: Any) -> str | None:
    """How the route's blocks join other tokens to the stream's in their attention (their specs' ``joint``)."""
    joints = {spec.joint for spec in stack.specs[route.start:route.end + 1]}
    if len(joints) > 1:
        raise RouteError(f"route {route}: its blocks join text to the stream on different sides {sorted(map(str, joints))}; "
                         "split the route where the block class changes")
    return joints.pop()


class OriginalForward:
    """The owner's forward as it was before any patch, to call it and to put it back exactly."""

    def __init__(self, owner: nn.Module):
        self.owner = owner
        self.had_instance_forward = "forward" in owner.__dict__
        self.bound = owner.__dict__.get("forward")
        self.function = type(owner).forward if self.bound is None else getattr(self.bound, "__func__", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.bound is not None:
            return self.bound(*args, **kwargs)
        return type(self.owner).forward(self.owner, *args, **kwargs)

    def restore(self) -> None:
        if self.had_instance_forward:
            self.owner.forward = self.bound
        else:
            self.owner.__dict__.pop("forward", None)


class _ByValue:
    """An unhashable constant in a signature key, equal to any equal constant of its type: a fresh but equal
    object finds the graph traced for the first one."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __hash__(self) -> int:
        return hash(type(self.value))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _ByValue) or type(other.value) is not type(self.value):
            return False
        if other.value is self.value:
            return True
        try:
            return bool(self.value == other.value)
        except Exception:  # noqa: BLE001 - an object without a usable == is never equal to another one
            return False


def _structure(value: Any) -> Any:
    """The nesting of a call's arguments as plain tuples (the part of its pytree spec the key needs), so the
    key hashes under torch.compile as in eager: tuples, lists and dicts by type and keys, another registered
    pytree node by its exact spec, anything else by its type (the leaves' values and tensor metadata follow in
    the key)."""
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_structure(v) for v in value))
    if isinstance(value, dict):
        return (type(value), tuple(value), tuple(_structure(v) for v in value.values()))
    if type(value) in SUPPORTED_NODES:
        return tree_structure(value)
    return type(value)


def signature_key(training: bool, args: tuple, kwargs: dict) -> tuple[tuple, list[Any], list[torch.Tensor], Any]:
    """A call's signature: grad/autocast modes, structure, tensor metadata and constant values (by value,
    hashable or not). Returns the key, the constant leaves (``graph.TENSOR`` where tensors go),
    the tensor leaves and the structure."""
    leaves, spec = tree_flatten((args, kwargs))
    key: list[Any] = [training, torch.is_grad_enabled(), torch.is_autocast_enabled(), _structure((args, kwargs))]
    constants, tensors = [], []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            tensors.append(leaf)
            constants.append(graph.TENSOR)
            key.append((tuple(leaf.shape), leaf.dtype, leaf.device, leaf.requires_grad))
        else:
            constants.append(leaf)
            try:
                hash(leaf)
                key.append((type(leaf), leaf))
            except TypeError:
                key.append(_ByValue(leaf))
    return tuple(key), constants, tensors, spec


class SignatureCache:
    """Traced graphs by signature, least recently used first out, at most ``capacity`` of them."""

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self.graphs: OrderedDict[tuple, graph.TracedForward] = OrderedDict()
        self.traces = 0  # graphs traced in all
        self.evictions = 0

    def __deepcopy__(self, memo: dict) -> SignatureCache:
        """A deep copy of the model (an EMA twin) starts with no graphs and traces its own on first use."""
        return SignatureCache(self.capacity)

    def get(self, key: tuple) -> graph.TracedForward | None:
        traced = self.graphs.get(key)
        if traced is not None:
            self.graphs.move_to_end(key)
        return traced

    def put(self, key: tuple, traced: graph.TracedForward) -> bool:
        """Store a new graph; True when an older one had to go."""
        self.traces += 1
        self.graphs[key] = traced
        if len(self.graphs) > self.capacity:
            self.graphs.popitem(last=False)
            self.evictions += 1
            return True
        return False

    def __len__(self) -> int:
        return len(self.graphs)

    def describe(self) -> str:
        return (f"{len(self.graphs)} of at most {self.capacity} input signatures cached "
                f"({self.traces} traced, {self.evictions} evicted)")


def _changed_arguments(new: tuple, old: tuple, args: tuple, kwargs: dict) -> list[str]:
    """Names of the arguments whose value (a constant) or metadata (a tensor) differs between two
    signatures of one structure."""
    if len(new) != len(old) or new[3] != old[3]:
        return []
    paths = [keystr(path) for path, _ in tree_flatten_with_path((args, kwargs))[0]]
    return [paths[k] for k, (a, b) in enumerate(zip(new[4:], old[4:])) if a != b]


class Splice:
    """Replaces the owner's forward while a plan is applied. Eval forwards call the original forward unless a
    stage must run; spliced forwards run the traced graph of their signature, or the original forward with
    hooks on the blocks."""

    def __init__(self, stack: BlockStack, plan: Plan, mechanism: str, original: OriginalForward,
                 capacity: int = 8):
        if mechanism not in MECHANISMS:
            raise RouteError(f"mechanism {mechanism!r} is not one of {MECHANISMS}")
        self.stack, self.original = stack, original
        self.boundaries = Boundaries(plan, joints=[_joint(stack, s.route) for s in plan.segments])
        self.requested = mechanism
        self.mechanism = "hooks" if mechanism == "hooks" else "fx"
        self.fallback_reason: str | None = None
        self.signatures = SignatureCache(capacity)
        self.warned = False
        self.hooks = HookSplice(stack, self.boundaries)
        if mechanism == "hooks":
            self.hooks.install()

    @property
    def plan(self) -> Plan:
        return self.boundaries.plan

    def close(self) -> None:
        self.hooks.remove()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        boundaries = self.boundaries
        routing = boundaries.active(self.stack.owner.training)
        boundaries.begin_forward(routing)
        if not routing and not boundaries.plan.needed_in_eval:
            return self.original(*args, **kwargs)
        try:
            if self.mechanism == "fx":
                traced = self.graph_for(args, kwargs, self.stack.owner.training)
                if traced is not None:
                    return traced
            self.hooks.begin()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.hooks.active = False
        except RouteError:
            raise
        except Exception as err:
            explained = boundaries.explain_failure(err, self.stack.paths)
            if explained is None:
                raise
            try:
                raise explained from err
            finally:  # its traceback holds this frame: a local naming it would be a cycle pinning the activations
                del explained
        finally:
            boundaries.end_forward()

    def graph_for(self, args: tuple, kwargs: dict, training: bool, run: bool = True) -> Any:
        """Run (or, with ``run=False``, only trace) the graph of this call's signature; None when the forward
        cannot be traced and the splice fell back to hooks."""
        key, constants, tensors, spec = signature_key(training, args, kwargs)
        traced = self.signatures.get(key)
        if traced is None:
            traced = self._trace(key, args, kwargs, constants, tensors, spec)
            if traced is None:
                return None
        if not run:
            return traced
        self.boundaries.tapped = traced.tapped
        return traced(tuple(tensors))

    @torch.compiler.disable
    def _trace(self, key: tuple, args: tuple, kwargs: dict, constants: list[Any], tensors: list[torch.Tensor],
               spec: Any) -> graph.TracedForward | None:
        function = self.original.function
        if function is None:
            raise RouteError("the owner's forward is not a method; apply tokenroute before patching forward")
        cuda = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
        try:
            # the trace runs the forward once, in the caller's grad mode (the forward may branch on it);
            # leave the caller's random streams as they were
            if any(hasattr(p, "ds_shape") for p in self.stack.owner.parameters()):
                raise fx.proxy.TraceError(
                    "DeepSpeed ZeRO-3 partitions its parameters, and the graph splice does not run under ZeRO-3 yet "
                    "(its gathered parameters came back empty); module hooks do")
            with torch.random.fork_rng(devices=cuda):
                traced = graph.trace(self.stack, function, self.boundaries, args, kwargs, constants, tensors,
                                            spec)
        except RouteError:
            raise
        except Exception as err:  # untraceable forward: fall back to hooks, with the same semantics
            if self.requested == "fx":
                with torch.no_grad(), torch.random.fork_rng(devices=cuda):
                    self.original(*args, **kwargs)  # the model's own error on bad input surfaces here
                raise RouteError(f"torch.fx could not trace {type(self.stack.owner).__name__}.forward: {err}") from err
            if not self.boundaries.plan.prefix_declared and self.boundaries.plan.routed:
                raise RouteError(
                    f"torch.fx could not trace {type(self.stack.owner).__name__}.forward ({type(err).__name__}: "
                    f"{err}), so the token layout (which tokens of the stream are image tokens) cannot be read from "
                    "its graph. Declare it and tokenroute routes with module hooks instead: prefix_tokens=K for K "
                    "leading tokens that must never be routed, prefix_tokens=0 if every token of the stream is an "
                    "image token") from err
            self.fallback_reason = f"{type(err).__name__}: {err}"
            self.mechanism = "hooks"
            self.hooks.install()
            return None
        previous = next(reversed(self.signatures.graphs), None)
        if self.signatures.put(key, traced) and not self.warned:
            self.warned = True
            changed = _changed_arguments(key, previous, args, kwargs) if previous is not None else []
            why = (f"; {', '.join(changed)} changed since the last call (a Python number is specialised into "
                   "the graph: pass a changing one as a tensor)" if changed else "")
            warnings.warn(
                f"tokenroute traced {type(self.stack.owner).__name__}.forward for more than "
                f"{self.signatures.capacity} input signatures and evicts the oldest graphs: each new signature "
                f"is traced again{why}, or use mechanism='hooks'", stacklevel=3)
        return traced

    def describe(self) -> list[str]:
        lines = []
        if self.mechanism == "fx":
            lines.append("  mechanism: torch.fx graph rewrite of the owner's forward (blocks as leaves, one graph per "
                         "input signature, traced at the first spliced forward); "
                         + self.signatures.describe())
        else:
            why = f" (tracing failed: {self.fallback_reason})" if self.fallback_reason else ""
            lines.append(f"  mechanism: module hooks on the blocks{why}")
            plan = self.boundaries.plan
            lines.append(f"  layout: {plan.prefix_tokens} leading tokens never routed ("
                         + ("declared" if plan.prefix_declared else "assumed: hooks cannot read the graph; a stream "
                            "joined between the stack's first block and a route is refused")
                         + "), the rest image tokens")
        return lines
