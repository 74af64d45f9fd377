"""Learned feature caching at sampling (HarmoniCa, arXiv 2410.01723): at each sampling step, each cache slot
(a block's attention-branch or MLP-branch output before its gate, or the whole block's residual where its
branches are not known) is either computed or taken from the previous step that computed it.

    router = CacheRouter(num_steps=20, num_slots=len(cache_slots(model)))      # learned, or CacheRouter.every(k)
    apply_caching(model, CachingConfig(router=router))
    for step in range(20): ...model(x, t, y)...                              # one generation
    tokenroute.reset_state(model)                                             # between generations
    remove_caching(model)

The plan is a fixed table read once from the router (slot k at step t computes iff sigmoid(logit) > threshold;
the first step always computes), so a sampling step does no host synchronisation. Steps are counted per
generation and per call context (``caching_context(model, "uncond")`` for classifier-free guidance run as
separate calls; a batched guidance call keeps its whole batch in one cache). A call past the router's steps, or
a generation reset before its last step, is refused.

Training the router (``train_router``) follows HarmoniCa's step-wise denoising training on the sampler's
real trajectory: a teacher that computes everything, a student that mixes ``s * fresh + (1 - s) * cached``,
loss ``lambda_t * MSE + beta * sum(s)``, the trajectory following the student, only the router trained, and
lambda_t refreshed from the increase of the final-image error that caching at step t causes.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

from ..core.blocks import Branch, bind_arguments, block_branches
from ..core.patches import Patch, PatchRegistry, registry_of, remove_patch, unwrap_forwards, wrap_forward
from ..core.route import RouteError
from ..core.splice.branches import BranchSupplier
from ..core.splice.tracer import tracing
from ..core.stack import BlockStack

NAME = "caching"


@dataclass(frozen=True)
class Slot:
    """What one cache slot holds: a branch of block ``block`` (``branch``), or the block's residual (None)."""

    block: int
    path: str  # the block's path relative to the stack's owner
    branch: Branch | None

    def describe(self) -> str:
        return f"{self.path}.{self.branch.path} ({self.branch.kind})" if self.branch else f"{self.path} (residual)"


def _slot_module(stack: BlockStack, slot: Slot) -> nn.Module:
    block = stack.blocks[slot.block]
    return block.get_submodule(slot.branch.path) if slot.branch else block


def cache_slots(model_or_stack: nn.Module | BlockStack) -> list[Slot]:
    """The cache slots of a model's block stack, in block order: each block's branches where they are known
    (``tokenroute.block_branches``), else the block as a whole."""
    from ..core.stack import find_stack

    stack = model_or_stack if isinstance(model_or_stack, BlockStack) else find_stack(model_or_stack)
    slots = []
    for position, (path, block, spec) in enumerate(zip(stack.paths, stack.blocks, stack.specs)):
        branches = block_branches(block, spec)
        slots += [Slot(position, path, b) for b in branches] if branches else [Slot(position, path, None)]
    return slots


class CacheRouter(nn.Module):
    """Logits [sampling steps, slots]: slot k computes at step t iff sigmoid(logits[t, k]) > threshold. The first
    step always computes (its row is not used). Saved and loaded as a state dict (safetensors)."""

    def __init__(self, num_steps: int, num_slots: int, init: float = 5.0):
        super().__init__()
        if num_steps < 1 or num_slots < 1:
            raise RouteError(f"a cache router needs at least one step and one slot, got {num_steps} x {num_slots}")
        self.logits = nn.Parameter(torch.full((num_steps, num_slots), float(init)))

    @property
    def num_steps(self) -> int:
        return self.logits.shape[0]

    @property
    def num_slots(self) -> int:
        return self.logits.shape[1]

    @classmethod
    def every(cls, k: int, num_steps: int, num_slots: int) -> "CacheRouter":
        """A fixed pattern (FORA): every slot computes at every k-th step and is reused in between."""
        if k < 1:
            raise RouteError(f"CacheRouter.every(k={k}): k must be at least 1")
        router = cls(num_steps, num_slots, init=-5.0)
        with torch.no_grad():
            router.logits[::k] = 5.0
        return router

    def save(self, path: str) -> None:
        """Write the logits as safetensors."""
        from safetensors.torch import save_file

        save_file({"logits": self.logits.detach().cpu().contiguous()}, path)

    @classmethod
    def load(cls, path: str) -> "CacheRouter":
        """A router from a safetensors file written by ``save``."""
        from safetensors.torch import load_file

        logits = load_file(path)["logits"]
        router = cls(*logits.shape)
        with torch.no_grad():
            router.logits.copy_(logits)
        return router

    def plan(self, threshold: float) -> list[tuple[bool, ...]]:
        """The fixed table: one tuple of compute flags per step (read once, on the host)."""
        compute = (torch.sigmoid(self.logits.detach().float()) > threshold).cpu()
        compute[0] = True
        return [tuple(row) for row in compute.tolist()]


@dataclass(kw_only=True)
class CachingConfig:
    """router: the plan's logits (``CacheRouter``); threshold: a slot computes where sigmoid(logit) exceeds it
    (HarmoniCa: 0.1); blocks: the block container(s) when the stack is not found automatically."""

    router: CacheRouter
    threshold: float = 0.1
    blocks: str | list[str] | None = None
    skip_inputs: bool = True  # at a reused branch, compute nothing that only feeds it (its norm, its modulation)


class CachingPatch(Patch):
    """Wraps each slot's module so that, in eval forwards, it computes or returns its cached output as the plan
    says for the current step; a pre-hook on the stack's first block advances the step."""

    name = NAME
    order = 30
    title = "feature cache"

    def __init__(self, config: CachingConfig, stack: BlockStack):
        super().__init__()
        if not isinstance(config.router, CacheRouter):
            raise RouteError(f"CachingConfig.router must be a CacheRouter, got {type(config.router).__name__}")
        if not 0.0 < config.threshold < 1.0:
            raise RouteError(f"CachingConfig.threshold={config.threshold} must lie in (0, 1)")
        self.slots = cache_slots(stack)
        if config.router.num_slots != len(self.slots):
            raise RouteError(
                f"the router has {config.router.num_slots} slots but {type(stack.owner).__name__}'s stack has "
                f"{len(self.slots)} (tokenroute.methods.caching.cache_slots lists them); build the router for "
                "this model")
        self.router, self.threshold, self.skip_inputs = config.router, config.threshold, config.skip_inputs
        self.table = config.router.plan(config.threshold)
        self.context = "default"
        self.current: str | None = None  # the context of the forward under way (None: not a cached forward)
        self.steps: dict[str, int] = {}  # context -> index of its current step
        self.cache: dict[tuple[str, int], Any] = {}
        self.shapes: dict[tuple[str, int], Any] = {}  # the input shapes each cached output was made for
        self.installed: list[tuple[nn.Module, Any]] = []
        self.suppliers: dict[int, BranchSupplier] = {}  # block position -> runs it with reused branches supplied
        self.handles: list[Any] = []
        self.bridge: Any = None  # diffusers' cache context and reset, where the model is a diffusers model
        self.paused = False  # forwards compute everything and leave the steps alone (a teacher's)
        self.scores: torch.Tensor | None = None  # router training: soft compute scores [steps, slots], with grad
        self.costs: list[float] = []  # each slot's share of the slots' work (its parameters), mean 1

    # -- installation ----------------------------------------------------------------------------------------
    def attach(self, stack: BlockStack) -> None:
        weights = [sum(p.numel() for p in _slot_module(stack, slot).parameters()) for slot in self.slots]
        self.costs = [w / max(sum(weights) / len(weights), 1) for w in weights]  # mean 1: what skipping saves
        by_block: dict[int, list[int]] = {}
        for k, slot in enumerate(self.slots):
            if slot.branch is not None:
                by_block.setdefault(slot.block, []).append(k)
        if self.skip_inputs:
            for position, ks in by_block.items():
                block = stack.blocks[position]
                supplier = BranchSupplier(block, [self.slots[k].branch.path for k in ks],
                                          functools.partial(self._supply, ks))
                if supplier.reason is None:
                    self.suppliers[position] = supplier
                    wrap_forward(block, self.installed,
                                  lambda original, p=position, ks=ks: functools.partial(self._block, p, ks, original))
        for k, slot in enumerate(self.slots):
            block, spec = stack.blocks[slot.block], stack.specs[slot.block]
            call = self._branch if slot.branch else self._residual
            wrap_forward(_slot_module(stack, slot), self.installed,
                          lambda original: functools.partial(call, k, original, spec.stream, spec.stream_output, block))
        self.handles.append(stack.blocks[0].register_forward_pre_hook(self._advance))
        self.bridge = _DiffusersBridge.install(self, stack)

    def detach(self, stack: BlockStack) -> None:
        if self.bridge is not None:
            self.bridge.uninstall(stack)
            self.bridge = None
        unwrap_forwards(self.installed)
        self.suppliers.clear()
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.cache.clear()
        self.shapes.clear()
        self.steps.clear()

    # -- steps -----------------------------------------------------------------------------------------------
    def _advance(self, block: nn.Module, args: tuple) -> None:
        """A forward of the model starts (its first block is called): in eval, the context's next step."""
        if block.training or self.paused or tracing():
            self.current = None
            return
        context = (self.bridge.context(len(self.table)) if self.bridge is not None else None) or self.context
        step = self.steps.get(context, -1) + 1
        if step >= len(self.table):
            raise RouteError(
                f"call {step + 1} of the generation (context {context!r}) is past the {len(self.table)} steps the "
                "cache router was made for. Reset between generations (tokenroute.reset_state(model)); run "
                "classifier-free guidance in one batched call or inside tokenroute.methods.caching_context(model, "
                "'uncond'); or train a router for this many steps")
        self.steps[context] = step
        self.current = context

    def reset_state(self, check: bool = True) -> None:
        """Forget the cached outputs and step counts; refuses (``check``) a generation stopped before the router's
        last step (a sampler with fewer steps than the router was made for)."""
        short = {c: s + 1 for c, s in self.steps.items() if s + 1 != len(self.table)} if check else {}
        self.cache.clear()
        self.shapes.clear()
        self.steps.clear()
        self.current = None
        if short:
            raise RouteError(
                f"the generation just reset ran {short} steps (by call context) but the cache router was made for "
                f"{len(self.table)}; sample with {len(self.table)} steps or train a router for your step count")

    # -- the slots -------------------------------------------------------------------------------------------
    def _computes(self, k: int, args: tuple, kwargs: dict, reducing: bool) -> bool:
        """Whether slot k computes now: the plan says so, nothing is cached yet, or a route is running its block
        on a subset of the tokens (``reducing``: drawn anew each call, another subset's outputs cannot be
        reused). A cached output made for inputs of another shape (a changed batch) is refused."""
        key = (self.current, k)
        if self.table[self.steps[self.current]][k] or key not in self.cache or reducing:
            return True
        shapes = _shapes(args, kwargs)
        if shapes != self.shapes.get(key):
            raise RouteError(
                f"cache slot {self.slots[k].describe()} is called with inputs of shapes {shapes} at step "
                f"{self.steps[self.current]}, but its cached output was made for {self.shapes.get(key)}: the batch or "
                "token count changed within a generation. Keep them fixed, or reset between generations")
        return False

    def _reducing(self) -> bool:
        splice = self.registry.splice
        return splice is not None and splice.boundaries.reducing() is not None

    def _block(self, position: int, ks: list[int], original: Any, *args: Any, **kwargs: Any) -> Any:
        """A block with known branches: where the plan reuses some of them (and they are cached), run the block
        with their values supplied, so that their inputs are not computed either."""
        if self.current is None or self.scores is not None or tracing():
            return original(*args, **kwargs)
        step, key = self.steps[self.current], (self.current, "block", position)
        shapes = _shapes(args, kwargs)
        supplied = frozenset(i for i, k in enumerate(ks) if not self.table[step][k] and (self.current, k) in self.cache)
        if not supplied or self._reducing():
            self.shapes[key] = shapes
            return original(*args, **kwargs)
        if shapes != self.shapes.get(key):
            raise RouteError(
                f"block {self.slots[ks[0]].path} is called with inputs of shapes {shapes} at step {step}, but its "
                f"cached branch outputs were made for {self.shapes.get(key)}: the batch or token count changed "
                "within a generation. Keep them fixed, or reset between generations")
        return self.suppliers[position](supplied, original, args, kwargs)

    def _supply(self, ks: list[int], index: int) -> Any:
        """The cached value of block branch ``index`` (of slots ``ks``), for a block run with it supplied."""
        return self.cache[(self.current, ks[index])]

    def _branch(self, k: int, original: Any, stream: str, stream_output: int | None, block: nn.Module,
                *args: Any, **kwargs: Any) -> Any:
        if self.current is None or tracing():
            return original(*args, **kwargs)
        key = (self.current, k)
        if self.scores is not None:
            return self._mixed(k, key, original(*args, **kwargs))
        reducing = self._reducing()
        if self._computes(k, args, kwargs, reducing):
            out = original(*args, **kwargs)
            if not reducing:
                self.cache[key], self.shapes[key] = out, _shapes(args, kwargs)
            return out
        return self.cache[key]

    def _residual(self, k: int, original: Any, stream: str, stream_output: int | None, block: nn.Module,
                  *args: Any, **kwargs: Any) -> Any:
        """A block whose branches are not known: cache its change to the stream (output minus input)."""
        if self.current is None or tracing():
            return original(*args, **kwargs)
        entering = bind_arguments(block, args, kwargs)[stream]
        key = (self.current, k)
        reducing = self._reducing()
        if self.scores is not None or self._computes(k, args, kwargs, reducing):
            out = original(*args, **kwargs)
            leaving = out if stream_output is None else out[stream_output]
            if self.scores is None:
                if not reducing:
                    self.cache[key], self.shapes[key] = (leaving - entering, out), _shapes(args, kwargs)
                return out
            change = self._mixed(k, key, leaving - entering)
            leaving = entering + change
        else:
            change, out = self.cache[key]
            leaving = entering + change
        if stream_output is None:
            return leaving
        out = list(out)
        out[stream_output] = leaving
        return tuple(out)

    def _mixed(self, k: int, key: tuple[str, int], fresh: Any) -> Any:
        """Router training (the student): ``s * fresh + (1 - s) * cached`` with s the slot's soft score at this
        step; the cache takes the fresh value where the plan computes, as it would at inference."""
        step = self.steps[self.current]
        cached = self.cache.get(key)
        if cached is None or step == 0:
            self.cache[key] = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, fresh)
            return fresh
        score = self.scores[step, k]
        out = tree_map(lambda f, c: score * f + (1 - score) * c if isinstance(f, torch.Tensor) else f, fresh, cached)
        if self.table[step][k]:
            self.cache[key] = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, fresh)
        return out

    def describe(self, stack: BlockStack) -> list[str]:
        computed = sum(sum(row) for row in self.table)
        total = len(self.table) * len(self.slots)
        skipped = sum(w for row in self.table for w, c in zip(self.costs, row) if not c) / (len(self.costs) * len(self.table))
        lines = [f"  feature cache: {len(self.slots)} slots over {len(self.table)} steps, threshold {self.threshold}; "
                 f"computes {computed} of {total} slot calls ({1 - computed / total:.0%} reused, about {skipped:.0%} of "
                 "the slots' FLOPs skipped, weighting each slot by its parameters)"]
        for t, row in enumerate(self.table):
            lines.append(f"    step {t:>3}: " + "".join("#" if c else "." for c in row))
        branched = sorted({slot.block for slot in self.slots if slot.branch is not None})
        if branched:
            skipping = [p for p in branched if p in self.suppliers and self.suppliers[p].reason is None]
            lines.append(f"    inputs of reused branches skipped in {len(skipping)} of {len(branched)} blocks"
                         + ("" if self.skip_inputs else " (skip_inputs=False)"))
            for p, supplier in self.suppliers.items():
                if supplier.reason is not None:
                    lines.append(f"      {stack.paths[p]}: computed, {supplier.reason}")
        return lines


class _DiffusersBridge:
    """Where the model is a diffusers model: a stateful diffusers hook on the stack's first block, so that a
    pipeline's ``transformer.cache_context("cond" / "uncond", num_inference_steps=...)`` names the call context
    (and a step count other than the router's is refused) and its reset of stateful hooks at the end of a call
    resets the cache."""

    NAME = "tokenroute_caching"

    def __init__(self, patch: CachingPatch, hook: Any, registry: Any):
        self.patch, self.hook, self.registry = patch, hook, registry

    @classmethod
    def install(cls, patch: CachingPatch, stack: BlockStack) -> "_DiffusersBridge | None":
        if not any(type(m).__module__.startswith("diffusers.") for m in (stack.owner,)):
            return None
        try:
            from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager
        except ImportError:
            return None

        class ContextHook(ModelHook):
            _is_stateful = True

            def __init__(self) -> None:
                super().__init__()
                self.state = StateManager(BaseState)  # receives the pipeline's cache context

            def reset_state(self, module: nn.Module) -> nn.Module:
                patch.reset_state(check=False)  # the pipeline's call ended
                return module

        hook = ContextHook()
        registry = HookRegistry.check_if_exists_or_initialize(stack.blocks[0])
        registry.register_hook(hook, cls.NAME)
        cls._invalidate(stack)
        return cls(patch, hook, registry)

    def context(self, num_steps: int) -> str | None:
        """The pipeline's context name for this call, checked against the router's step count; None: none."""
        context = getattr(self.hook.state, "_context", None)
        if context is None:
            return None
        given = getattr(context, "num_inference_steps", None)
        if given is not None and given != num_steps:
            raise RouteError(f"the pipeline samples with {given} steps but the cache router was made for {num_steps}; "
                             f"sample with {num_steps} steps or train a router for {given}")
        return context.name

    def uninstall(self, stack: BlockStack) -> None:
        self.registry.remove_hook(self.NAME, recurse=False)
        self._invalidate(stack)

    @staticmethod
    def _invalidate(stack: BlockStack) -> None:
        for module in (stack.owner, *stack.owner.modules()):
            registry = module.__dict__.get("_diffusers_hook")
            if registry is not None and hasattr(registry, "invalidate_child_registries_cache"):
                registry.invalidate_child_registries_cache()
                return


def apply_caching(model: nn.Module, config: CachingConfig) -> nn.Module:
    """Turn on the feature cache for ``model``'s eval forwards, in place, and return it."""
    registry = PatchRegistry.for_model(model, config.blocks)
    if NAME in registry:
        raise RouteError(f"{type(model).__name__} already has a feature cache; remove_caching(model) first")
    registry.apply(CachingPatch(config, registry.stack))
    return model


def _shapes(args: tuple, kwargs: dict) -> tuple:
    """The shapes of a call's tensor arguments (what a cached output was made for)."""
    leaves = [*args, *kwargs.values()]
    return tuple(tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor))


def remove_caching(model: nn.Module) -> nn.Module:
    """Take the feature cache off ``model``; other methods stay."""
    remove_patch(model, NAME)
    return model


@contextlib.contextmanager
def caching_context(model: nn.Module, name: str) -> Iterator[None]:
    """Calls inside count their steps and keep their cache under ``name`` (classifier-free guidance run as
    separate conditional and unconditional calls); nested contexts compose ("uncond/routing_weak")."""
    patch = registry_of(model).get(NAME)
    saved = patch.context
    patch.context = name if saved == "default" else f"{saved}/{name}"
    try:
        yield
    finally:
        patch.context = saved


# -- a training-free baseline: FirstBlockCache's rule --------------------------------------------------------------

FIRST_BLOCK = "first_block_cache"


@dataclass(kw_only=True)
class FirstBlockCacheConfig:
    """threshold: the rest of the stack is skipped at a step where the first block's change to the stream moved
    by less than this (mean absolute difference over mean absolute value) since the last step that ran it."""

    threshold: float = 0.05
    blocks: str | list[str] | None = None


class FirstBlockCachePatch(Patch):
    """diffusers' FirstBlockCache rule on any block stack: every eval forward runs the first block; where its
    residual barely changed since the last full step, the other blocks are skipped and the stream leaving the
    stack is the first block's output plus the rest's change cached at that step. One host synchronisation per
    call (the comparison), as in diffusers."""

    name = FIRST_BLOCK
    order = 31
    title = "first-block cache"

    def __init__(self, config: FirstBlockCacheConfig):
        super().__init__()
        if config.threshold < 0:
            raise RouteError(f"FirstBlockCacheConfig.threshold={config.threshold} must be non-negative")
        self.threshold = config.threshold
        self.installed: list[tuple[nn.Module, Any]] = []
        self.reset_state()

    def reset_state(self) -> None:
        self.first: torch.Tensor | None = None  # the first block's residual at the last full step
        self.rest: torch.Tensor | None = None  # the other blocks' change to the stream at that step
        self.outputs: dict[int, Any] = {}  # each block's full output then (its other items: text)
        self.skipping = False
        self.entering: torch.Tensor | None = None
        self.calls = self.skipped = 0

    def attach(self, stack: BlockStack) -> None:
        for position, (block, spec) in enumerate(zip(stack.blocks, stack.specs)):
            wrap_forward(block, self.installed, lambda original: functools.partial(
                self._block, position, len(stack.blocks), original, spec.stream, spec.stream_output, block))

    def detach(self, stack: BlockStack) -> None:
        unwrap_forwards(self.installed)
        self.reset_state()

    def _block(self, position: int, depth: int, original: Any, stream: str, stream_output: int | None,
               block: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if block.training or tracing():
            return original(*args, **kwargs)
        entering = bind_arguments(block, args, kwargs)[stream]
        if position == 0:
            out = original(*args, **kwargs)
            leaving = out if stream_output is None else out[stream_output]
            residual = leaving - entering
            self.calls += 1
            self.skipping = self.first is not None and self.first.shape == residual.shape and bool(
                (residual - self.first).abs().mean() < self.threshold * self.first.abs().mean())
            if not self.skipping:
                self.first, self.entering = residual, leaving
            else:
                self.skipped += 1
            return out
        if not self.skipping:
            out = original(*args, **kwargs)
            self.outputs[position] = out
            if position == depth - 1:
                leaving = out if stream_output is None else out[stream_output]
                self.rest = leaving - self.entering
            return out
        cached = self.outputs[position]
        leaving = entering + self.rest if position == depth - 1 else entering
        if stream_output is None:
            return leaving
        out = list(cached)
        out[stream_output] = leaving
        return tuple(out)

    def describe(self, stack: BlockStack) -> list[str]:
        return [f"  first-block cache: threshold {self.threshold}; skipped the rest of the stack in {self.skipped} of "
                f"{self.calls} eval forwards since the last reset"]


def apply_first_block_cache(model: nn.Module, config: FirstBlockCacheConfig | None = None) -> nn.Module:
    """FirstBlockCache's rule on ``model``'s block stack (a training-free baseline for the learned cache)."""
    config = config or FirstBlockCacheConfig()
    registry = PatchRegistry.for_model(model, config.blocks)
    if FIRST_BLOCK in registry or NAME in registry:
        raise RouteError(f"{type(model).__name__} already has a feature cache; remove it first")
    registry.apply(FirstBlockCachePatch(config))
    return model


def remove_first_block_cache(model: nn.Module) -> nn.Module:
    """Take FirstBlockCache's rule off ``model``; other methods stay."""
    remove_patch(model, FIRST_BLOCK)
    return model


# -- router training ---------------------------------------------------------------------------------------------

@dataclass
class Sampler:
    """A sampler's trajectory, as router training and generation need it: ``predict(model, x, i, condition)``
    is the model's output at step i (the call the sampler makes), ``update(i, x, output)`` the next state."""

    num_steps: int
    predict: Callable[[nn.Module, torch.Tensor, int, Any], torch.Tensor]
    update: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]

    @classmethod
    def flow_euler(cls, num_steps: int, call: Callable[[nn.Module, torch.Tensor, float, Any], torch.Tensor]) -> "Sampler":
        """Euler steps of the rectified-flow ODE from t = 1 to 0 (the project's ``flow_euler_sampler``);
        ``call(model, x, t, condition)`` returns the velocity at time t."""
        ts = torch.linspace(1.0, 0.0, num_steps + 1).tolist()
        return cls(num_steps, lambda model, x, i, c: call(model, x, ts[i], c),
                   lambda i, x, v: x + (ts[i + 1] - ts[i]) * v)

    @classmethod
    def from_scheduler(cls, scheduler: Any, num_steps: int,
                       call: Callable[[nn.Module, torch.Tensor, Any, Any], torch.Tensor]) -> "Sampler":
        """A diffusers scheduler's loop (set to ``num_steps``); ``call(model, x, timestep, condition)``."""
        scheduler.set_timesteps(num_steps)
        timesteps = list(scheduler.timesteps)
        return cls(num_steps, lambda model, x, i, c: call(model, scheduler.scale_model_input(x, timesteps[i]),
                                                          timesteps[i], c),
                   lambda i, x, out: scheduler.step(out, timesteps[i], x).prev_sample)


@dataclass(kw_only=True)
class RouterTrainingConfig:
    """iterations: router updates (each one trajectory of a fresh batch); lr: AdamW (weight decay 0);
    sparsity: beta, the weight of sum(s) against the lambda-weighted error (lambda normalised to mean 1);
    weigh_by_cost: each slot's s counts by its share of the work (its parameters, mean 1), so that the router
    prefers to reuse the expensive branches (HarmoniCa counts every slot alike: False);
    refresh_every: iterations between lambda refreshes (the image-error proxy); threshold: the plan's.

    An AdamW step moves a logit by about ``lr``: HarmoniCa's lr 0.01 suits its 20K iterations; over a few hundred,
    0.05 lets a logit travel from the router's start (5 computes everything) to below the threshold."""

    iterations: int = 200
    lr: float = 0.05
    sparsity: float = 1e-3
    weigh_by_cost: bool = True
    refresh_every: int = 50
    threshold: float = 0.1
    progress: bool = False
    history: list[float] = field(default_factory=list)


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """The model in eval mode with its parameters frozen (only the router trains); restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


@torch.no_grad()
def generate(model: nn.Module, sampler: Sampler, x: torch.Tensor, condition: Any,
             table: list[tuple[bool, ...]] | None = None, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Run the sampler from ``x`` with the cache following ``table`` (default: the router's plan; every slot
    computing where the model has no cache) and return the final state; the cache is reset before and after.
    ``scores`` [steps, slots]: mix fresh and cached outputs by these soft scores instead, as router training's
    student does (1 computes, 0 reuses)."""
    registry = PatchRegistry.of(model)
    patch = registry.get(NAME) if registry is not None and NAME in registry else None
    saved = patch.table if patch is not None else None
    if patch is not None:
        patch.table = table if table is not None else saved
        patch.scores = scores
        patch.reset_state(check=False)
    try:
        for i in range(sampler.num_steps):
            x = sampler.update(i, x, sampler.predict(model, x, i, condition))
    finally:
        if patch is not None:
            patch.reset_state(check=False)
            patch.table, patch.scores = saved, None
    return x


def image_error_weights(model: nn.Module, sampler: Sampler, x: torch.Tensor, condition: Any,
                        router: CacheRouter, threshold: float) -> torch.Tensor:
    """lambda_t (HarmoniCa's image-error proxy): how much mixing by the router's current soft scores at step t
    increases the final image's error against the uncached generation, switched on cumulatively from the last
    step back. Normalised to mean 1; uniform where no step changes the image (yet)."""
    steps, slots = router.num_steps, router.num_slots
    everything = [tuple([True] * slots)] * steps
    soft = torch.sigmoid(router.logits.detach().float())
    reference = generate(model, sampler, x, condition, everything)
    errors = torch.zeros(steps + 1)
    plan = router.plan(threshold)
    for t in range(steps - 1, 0, -1):
        scores = soft.clone()
        scores[:t] = 1.0
        errors[t] = (generate(model, sampler, x, condition, everything[:t] + plan[t:], scores=scores)
                     - reference).float().square().mean()
    increase = (errors[:-1] - errors[1:]).clamp_min(0.0)
    increase[0] = 0.0
    if float(increase[1:].sum()) <= 0.0:
        return torch.ones(steps)
    return increase / increase[1:].mean()


def train_router(model: nn.Module, sampler: Sampler, inputs: Callable[[torch.Generator], tuple[torch.Tensor, Any]],
                 config: RouterTrainingConfig | None = None, seed: int = 0) -> CacheRouter:
    """Train the router of ``model``'s feature cache on ``sampler``'s trajectory and return it.

    ``inputs(generator)`` returns a fresh batch: the initial noise and the condition (labels; batch them with
    their null labels for classifier-free guidance). Each iteration runs one trajectory: at every step after
    the first, a teacher forward computing everything and a student forward mixing fresh and cached slot
    outputs by the router's soft scores; the step's loss ``lambda_t * MSE(student, teacher) + sparsity *
    sum(s)`` is back-propagated into the router alone; the next state follows the student."""
    config = config or RouterTrainingConfig()
    patch: CachingPatch = registry_of(model).get(NAME)
    router = patch.router
    if router.num_steps != sampler.num_steps:
        raise RouteError(f"the router has {router.num_steps} steps but the sampler takes {sampler.num_steps}; "
                         "build the router for the sampler's step count")
    reach = float(router.logits.detach()[1:].min()) - config.lr * config.iterations if router.num_steps > 1 else 0.0
    floor = math.log(config.threshold / (1 - config.threshold))
    if reach > floor:
        raise RouteError(
            f"the router's logits start at {reach + config.lr * config.iterations:g} or more, and {config.iterations} "
            f"AdamW steps of lr {config.lr:g} move a logit by about {config.lr * config.iterations:g}: none can fall "
            f"below the threshold's logit {floor:.3g}, so no slot could ever be reused. Raise "
            "RouterTrainingConfig.lr or .iterations, or start the router lower (CacheRouter(..., init=0.0))")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([router.logits], lr=config.lr, weight_decay=0.0)
    weights = torch.ones(router.num_steps)
    costs = torch.tensor(patch.costs if config.weigh_by_cost else [1.0] * router.num_slots,
                         device=router.logits.device)
    iterations = range(config.iterations)
    if config.progress:
        from tqdm.auto import tqdm

        iterations = tqdm(iterations, desc="router", unit="it")
    with _frozen(model):
        for iteration in iterations:
            x, condition = inputs(generator)
            if iteration % config.refresh_every == 0:
                weights = image_error_weights(model, sampler, x, condition, router, config.threshold)
            patch.table = router.plan(config.threshold)
            patch.reset_state(check=False)
            total = 0.0
            try:
                for i in range(sampler.num_steps):
                    patch.paused = True
                    with torch.no_grad():
                        teacher = sampler.predict(model, x, i, condition)
                    patch.paused = False
                    if i == 0:  # the first step always computes: no scores to learn
                        with torch.no_grad():
                            student = sampler.predict(model, x, i, condition)
                    else:
                        patch.scores = torch.sigmoid(router.logits)
                        student = sampler.predict(model, x, i, condition)
                        patch.scores = None
                        scores = torch.sigmoid(router.logits[i])
                        loss = weights[i] * (student.float() - teacher.float()).square().mean() \
                            + config.sparsity * (costs * scores).sum()
                        loss.backward()
                        total += float(loss.detach())
                    x = sampler.update(i, x, student.detach())
            finally:
                patch.paused, patch.scores = False, None
                patch.reset_state(check=False)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                router.logits.clamp_(-5.0, 5.0)
            config.history.append(total)
            if config.progress:
                iterations.set_postfix(loss=f"{total:.4g}", computes=f"{_share(router, config.threshold):.0%}")
    patch.table = router.plan(patch.threshold)
    return router


def _share(router: CacheRouter, threshold: float) -> float:
    """The share of slot calls the router's plan computes."""
    table = router.plan(threshold)
    return sum(map(sum, table)) / (len(table) * len(table[0]))
