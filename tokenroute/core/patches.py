"""The patch registry on a model (the counterpart of diffusers' HookRegistry): methods apply to one block
stack in a defined order, several at once, and come off by name; removing the last one restores the
original forward and state dict exactly.

A method is a ``Patch``: it says what it adds to the splice (segments of the stack and the token
operation each applies, stages after blocks), which submodules it registers (saved with the model), which
hooks it attaches inside blocks, and how to reset state that lasts across forwards. The registry merges
every patch's contribution into one plan, checks it as a whole before changing anything, and rebuilds the
splice whenever a patch comes or goes.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch.nn as nn

from .plan import Plan, Segment, Stage, Tap
from .route import RouteError
from .selection import RoutingGenerator
from .splice import MECHANISMS, OriginalForward, Splice
from .stack import BlockStack, find_stack

ATTRIBUTE = "_tokenroute"


@dataclass(kw_only=True)
class SpliceOptions:
    """What every method that splices routes into the stack is given, besides its own settings.

    seed: seed of the method's routing generator (default: torch's initial seed); offset by the distributed
        rank and the method's name, so two methods given one seed draw independently.
    prefix_tokens: leading tokens never routed (time/label/class tokens); default: the owner's or the
        model's ``num_prefix_tokens`` attribute (timm's convention), else 0. Every method must agree.
    mechanism: "auto" (graph rewrite, falling back to module hooks where the forward cannot be traced),
        "fx" (graph rewrite or error) or "hooks".
    blocks: dotted path(s) of the block container(s) when the stack is not found automatically.
    """

    seed: int | None = None
    prefix_tokens: int | None = None
    mechanism: str = "auto"
    blocks: str | Sequence[str] | None = None


class Patch:
    """One method applied to a model. Subclasses override what they need; the defaults add nothing.

    ``order``: patches run in ascending order whatever order they were applied in (ties: applied first, first).
    """

    name: str = "patch"
    order: int = 100
    title: str = "patch"  # for explain

    def __init__(self) -> None:
        self.segments: list[Segment] = []
        self.stages: list[Stage] = []
        self.taps: list[Tap] = []  # blocks whose stream layout this method reads (Boundaries.tokens_at)
        self.modules: dict[str, nn.Module] = {}  # registered on the stack's owner
        self.generator: RoutingGenerator | None = None
        self.prefix_tokens: int | None = None  # None: the stack's
        self.mechanism: str = "auto"
        self.registry: PatchRegistry | None = None  # set when applied: the splice running now, the stack

    def take_options(self, options: SpliceOptions) -> None:
        """Adopt the shared options: a routing generator of this method's own, the layout, the mechanism."""
        self.generator = RoutingGenerator(options.seed, stream=self.name)
        self.prefix_tokens = options.prefix_tokens
        self.mechanism = options.mechanism

    def attach(self, stack: BlockStack) -> None:
        """Install hooks inside the blocks (called in patch order, after every rebuild)."""

    def detach(self, stack: BlockStack) -> None:
        """Remove what ``attach`` installed."""

    def reset_state(self) -> None:
        """Forget state that lasts across forwards (a cache); routing methods have none."""

    def describe(self, stack: BlockStack) -> list[str]:
        """Lines for explain, after the stack and its segments."""
        return []


def wrap_forward(module: nn.Module, installed: list[tuple[nn.Module, Any]], wrapper: Callable[[Any], Any]) -> None:
    """Replace ``module``'s forward (on the instance) with ``wrapper(current forward)``; ``installed`` remembers
    what to put back."""
    installed.append((module, module.__dict__.get("forward")))
    module.forward = wrapper(module.forward)


def unwrap_forwards(installed: list[tuple[nn.Module, Any]]) -> None:
    """Put back every forward ``wrap_forward`` replaced, last first."""
    for module, previous in reversed(installed):
        if previous is None:
            del module.forward
        else:
            module.forward = previous
    installed.clear()


def default_prefix_tokens(model: nn.Module, stack: BlockStack) -> int:
    """Leading tokens never routed: the owner's or the model's ``num_prefix_tokens`` (timm's convention)."""
    return getattr(stack.owner, "num_prefix_tokens", getattr(model, "num_prefix_tokens", 0))


class PatchRegistry:
    """The patches applied to one model's block stack, and the splice they make together."""

    def __init__(self, model: nn.Module, stack: BlockStack):
        self.model, self.stack = model, stack
        self.patches: dict[str, Patch] = {}
        self.original = OriginalForward(stack.owner)
        self.splice: Splice | None = None
        self.prefix_default = default_prefix_tokens(model, stack)
        self.prefix_declared = any(hasattr(m, "num_prefix_tokens") for m in (stack.owner, model))

    # -- lookup ----------------------------------------------------------------------------------------------
    @staticmethod
    def of(model: nn.Module) -> PatchRegistry | None:
        return model.__dict__.get(ATTRIBUTE)

    @classmethod
    def for_model(cls, model: nn.Module, blocks: str | Sequence[str] | None = None) -> PatchRegistry:
        """The model's registry, or a new (not yet attached) one on the stack ``blocks`` names or finds."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"tokenroute expects an nn.Module, got {type(model).__name__}")
        registry = cls.of(model)
        stack = find_stack(model, blocks) if registry is None or blocks is not None else registry.stack
        if registry is not None:
            if stack.owner is not registry.stack.owner or stack.paths != registry.stack.paths:
                raise RouteError(
                    f"{type(model).__name__} already has methods applied to the blocks {registry.stack.paths[0]}.."
                    f"{registry.stack.paths[-1]}; blocks= names another stack. Remove them first "
                    "(tokenroute.unwrap(model)) or name the same stack")
            return registry
        if ATTRIBUTE in stack.owner.__dict__:
            raise RouteError("the block stack's owner already has methods applied through another model; "
                             "call tokenroute.unwrap on that model first")
        return cls(model, stack)

    def __iter__(self) -> Iterator[Patch]:
        return iter(sorted(self.patches.values(), key=lambda p: p.order))  # stable: ties keep applied order

    def __contains__(self, name: str) -> bool:
        return name in self.patches

    def get(self, name: str) -> Patch:
        if name not in self.patches:
            applied = ", ".join(self.patches) or "none"
            raise RouteError(f"{type(self.model).__name__} has no method {name!r} applied (applied: {applied})")
        return self.patches[name]

    # -- the plan ----------------------------------------------------------------------------------------------
    def _plan(self, patches: list[Patch]) -> tuple[Plan, str]:
        """Merge the patches' contributions; raise on any conflict."""
        segments = sorted((s for p in patches for s in p.segments if not s.optional), key=lambda s: s.route.start)
        for a, b in zip(segments, segments[1:]):
            if b.route.start <= a.route.end:
                raise RouteError(
                    f"routes {a.route.start}..{a.route.end} ({a.method}) and {b.route.start}..{b.route.end} "
                    f"({b.method}) overlap; routes apply one after the other, so each block may belong to one "
                    "route at most")
        stages = sorted((s for p in patches for s in p.stages), key=lambda s: s.after)
        for optional in (s for p in patches for s in p.segments if s.optional):
            segments += _clipped(optional, segments, stages)
        segments.sort(key=lambda s: s.route.start)
        for stage in stages:
            inside = [s for s in segments if s.route.start <= stage.after < s.route.end]
            if inside:
                raise RouteError(f"{stage.method} runs a stage after block {stage.after}, inside the route "
                                 f"{inside[0].route.start}..{inside[0].route.end} ({inside[0].method})")
        prefixes = {self.prefix_default if p.prefix_tokens is None else p.prefix_tokens for p in patches}
        if len(prefixes) > 1:
            given = ", ".join(f"{p.name}: {self.prefix_default if p.prefix_tokens is None else p.prefix_tokens}"
                              for p in patches)
            raise RouteError(f"the methods applied give different prefix_tokens ({given}; the model's own is "
                             f"{self.prefix_default}); a stack has one token layout: give every method the same")
        prefix = prefixes.pop() if prefixes else self.prefix_default
        if not isinstance(prefix, int) or isinstance(prefix, bool) or prefix < 0:
            raise RouteError(f"prefix_tokens {prefix!r} must be a non-negative integer")
        mechanisms = {p.mechanism for p in patches} - {"auto"}
        if not mechanisms <= set(MECHANISMS):
            raise RouteError(f"mechanism {sorted(mechanisms)[0]!r} is not one of {MECHANISMS}")
        if len(mechanisms) > 1:
            raise RouteError(f"the methods applied ask for different mechanisms {sorted(mechanisms)}")
        declared = self.prefix_declared or any(p.prefix_tokens is not None for p in patches)
        taps = sorted({tap for p in patches for tap in p.taps}, key=lambda tap: (tap.block, tap.method))
        return Plan(segments, stages, taps, prefix, declared), mechanisms.pop() if mechanisms else "auto"

    def _rebuild(self, patches: list[Patch]) -> None:
        """Swap in a splice for ``patches`` (already checked) and re-attach every patch's hooks in order."""
        for patch in self:
            patch.detach(self.stack)
        if self.splice is not None:
            self.splice.close()
            self.splice = None
        plan, mechanism = self._plan(patches)
        if plan.segments or plan.stages or plan.taps:
            self.splice = Splice(self.stack, plan, mechanism, self.original)
        for patch in sorted(patches, key=lambda p: p.order):
            patch.attach(self.stack)

    # -- apply and remove --------------------------------------------------------------------------------------
    def apply(self, patch: Patch) -> None:
        """Add ``patch``; on any error nothing has changed."""
        if patch.name in self.patches:
            raise RouteError(f"{type(self.model).__name__} already has {patch.name!r} applied; remove it first "
                             f"(tokenroute.remove_{patch.name}(model)) or use another name")
        owner = self.stack.owner
        taken = [name for name in patch.modules if hasattr(owner, name)]
        if taken:
            raise RouteError(f"{type(owner).__name__} already has an attribute {taken[0]!r}")
        patches = [*self.patches.values(), patch]
        self._plan(patches)  # check before changing anything
        first = not self.patches
        patch.registry = self
        self.patches[patch.name] = patch
        like = next((p for p in owner.parameters() if p.is_floating_point()), None)
        for name, module in patch.modules.items():  # on the model's device and in its dtype, wherever it is now
            owner.add_module(name, module if like is None else module.to(device=like.device, dtype=like.dtype))
        if first:
            self._install()
        self._rebuild(patches)

    def remove(self, name: str) -> Patch:
        """Take ``name`` off; the last one out restores the owner's original forward."""
        patch = self.get(name)
        rest = [p for n, p in self.patches.items() if n != name]
        self._rebuild(rest)
        del self.patches[name]
        for module_name in patch.modules:
            delattr(self.stack.owner, module_name)
        if not self.patches:
            self._uninstall()
        return patch

    def reset_state(self) -> None:
        for patch in self:
            patch.reset_state()

    # -- the owner's forward -------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.splice is None:
            return self.original(*args, **kwargs)
        return self.splice(*args, **kwargs)

    def _install(self) -> None:
        owner = self.stack.owner
        signature_source = self.original.bound or types.MethodType(type(owner).forward, owner)

        def patched_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return self.__dict__[ATTRIBUTE].forward(*args, **kwargs)  # via self: deep copies use their own

        functools.update_wrapper(patched_forward, signature_source)
        patched_forward.__signature__ = inspect.signature(signature_source)
        owner.forward = types.MethodType(patched_forward, owner)
        object.__setattr__(self.model, ATTRIBUTE, self)
        object.__setattr__(owner, ATTRIBUTE, self)

    def _uninstall(self) -> None:
        if self.splice is not None:
            self.splice.close()
            self.splice = None
        self.original.restore()
        for module in (self.model, self.stack.owner):
            module.__dict__.pop(ATTRIBUTE, None)


def registry_of(model: nn.Module) -> PatchRegistry:
    """The model's registry, or an error saying no method is applied."""
    registry = PatchRegistry.of(model)
    if registry is None:
        raise RouteError(f"{type(model).__name__} is not wrapped: no tokenroute method is applied; call "
                         "tokenroute.wrap(model, routes) (or a method's apply_...) first")
    return registry


def apply_patch(model: nn.Module, patch: Patch, blocks: str | Sequence[str] | None = None) -> nn.Module:
    """Apply ``patch`` to ``model``'s block stack (found, or named by ``blocks``) and return the model."""
    PatchRegistry.for_model(model, blocks).apply(patch)
    return model


def remove_patch(model: nn.Module, name: str) -> Patch:
    """Remove the method ``name`` from ``model``; returns its patch."""
    return registry_of(model).remove(name)


def reset_state(model: nn.Module) -> None:
    """Reset every applied method's state that lasts across forwards (caches); call between generations."""
    registry_of(model).reset_state()


def _clipped(segment: Segment, taken: list[Segment], stages: list[Stage]) -> list[Segment]:
    """The pieces of an optional segment that no other segment spans, none holding a stage inside."""
    busy = {b for s in taken for b in range(s.route.start, s.route.end + 1)}
    cuts = {stage.after for stage in stages}
    pieces: list[Segment] = []
    start = None
    for block in range(segment.route.start, segment.route.end + 2):
        free = block <= segment.route.end and block not in busy
        if free and start is None:
            start = block
        if start is not None and (not free or block in cuts):
            end = block if free else block - 1
            pieces.append(dataclasses.replace(segment, route=dataclasses.replace(segment.route, start=start, end=end)))
            start = None
    return pieces
