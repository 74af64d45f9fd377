"""A torch.fx tracer that runs the model alongside the trace on fake tensors, so every Proxy knows the
shape, dtype and device of the value it stands for while nothing is computed for real.

Plain ``symbolic_trace`` fails on most diffusers transformers because their forward reads shapes
(``if self.height != height``, ``int(x.shape[1] ** 0.5)``) and branches on optional arguments. Here
each Proxy carries a concrete (fake) tensor: shape and dtype queries return real Python values and become
constants, so the graph is specialised to one input signature (the splice caches one graph per
signature). The values are fake tensors (``FakeTensorMode``): tracing allocates no activations and
counts no FLOPs, so the first routed step costs what every later one costs. Branching on tensor *values*
(``.item()``, ``if x.any()``) cannot be specialised and raises ``TraceError`` instead, which sends the
splice to its module-level fallback.

Only the owner's own forward is traced: every other submodule is a leaf and runs (on fake tensors) as it is.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeTensor,
                                           FakeTensorMode)
from torch.fx.node import map_aggregate
from torch.fx.proxy import TraceError
from torch.utils._python_dispatch import _disable_current_modes

_SHAPE_METHODS = frozenset({"size", "dim", "numel", "nelement", "ndimension", "stride", "element_size",
                            "is_contiguous", "is_floating_point", "is_complex", "get_device", "__len__"})
_RANDOM_FUNCTIONS = ("rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm",
                     "bernoulli", "multinomial", "normal", "poisson")


def _has_tensor(value: Any) -> bool:
    found = False

    def visit(v: Any) -> Any:
        nonlocal found
        found = found or isinstance(v, torch.Tensor)
        return v

    map_aggregate(value, visit)
    return found


class ConcreteProxy(fx.Proxy):
    """A Proxy whose node carries ``meta['concrete']``, the value it stands for in the traced call."""

    @property
    def concrete(self) -> Any:
        return self.node.meta["concrete"]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = getattr(self.node.meta["concrete"], name)
        if not callable(value) and not isinstance(value, torch.Tensor):
            return value  # shape, ndim, dtype, device: constants of this signature
        return super().__getattr__(name)

    def __len__(self) -> int:
        return len(self.concrete)

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self.concrete)))

    def __bool__(self) -> bool:
        raise TraceError("the forward branches on a tensor's value; it cannot be specialised by shape")

    def __index__(self) -> int:
        raise TraceError("the forward turns a tensor's value into a Python number")

    __int__ = __float__ = __index__


_TRACING = 0


def tracing() -> bool:
    """Whether a spliced forward is being traced now (on fake values): methods that keep state across calls (a
    feature cache counting steps) ignore the blocks' calls the trace makes."""
    return _TRACING > 0


class ConcreteTracer(fx.Tracer):
    """Traces ``root`` on real inputs; modules outside ``traced`` and everything in ``leaves`` stay leaves."""

    def __init__(self, traced: set[torch.nn.Module], leaves: set[torch.nn.Module]):
        super().__init__()
        self.traced_modules = traced
        self.leaf_modules = leaves
        self.example: Any = None
        self._depth = 0  # > 0 while running ops (on fake tensors) to compute concrete values
        # parameters and buffers stay real; the mode converts them where fake values meet them
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        """Run ops on fake tensors, outside the caller's dispatch modes (a FLOP counter sees nothing)."""
        self._depth += 1
        try:
            if self._depth > 1:
                yield
                return
            with _disable_current_modes(), self.fake_mode:
                try:
                    yield
                except (DataDependentOutputException, DynamicOutputShapeException) as err:
                    raise TraceError(f"the forward depends on a tensor's value ({err}); it cannot be "
                                     "specialised by shape") from err
                finally:
                    # autocast caches the low-precision copy of each weight for the rest of its region: copies
                    # made here are fake and must not serve the real forward that follows
                    torch.clear_autocast_cache()
        finally:
            self._depth -= 1

    def is_leaf_module(self, m: torch.nn.Module, qualified_name: str) -> bool:
        return m in self.leaf_modules or m not in self.traced_modules

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ConcreteProxy(node, self)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, fx.Proxy]) -> Any:
        if self._depth:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: torch.nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if self._depth:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def _concrete(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        def real(a: Any) -> Any:
            return a.node.meta["concrete"] if isinstance(a, fx.Proxy) else a

        args = map_aggregate(args, real)
        kwargs = map_aggregate(kwargs, real)
        with self._running():
            if kind == "placeholder":
                return self.example
            if kind == "get_attr":
                return operator.attrgetter(target)(self.root)
            if kind == "call_function":
                return target(*args, **kwargs)
            if kind == "call_method":
                return getattr(args[0], target)(*args[1:], **kwargs)
            if kind == "call_module":
                return _run_module(self.root.get_submodule(target), args, kwargs)
        raise TraceError(f"unexpected node kind {kind}")

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                     type_expr: Any = None, proxy_factory_fn: Any = None) -> Any:
        if kind == "output":
            return super().create_proxy(kind, target, args, kwargs, name, type_expr)
        value = self._concrete(kind, target, args, kwargs)
        if kind in ("call_function", "call_method") and not _has_tensor(value):
            shape_query = target in _SHAPE_METHODS or target in (getattr, len)
            if not shape_query and value is not None:
                raise TraceError(f"{getattr(target, '__name__', target)} turns a tensor into the Python value "
                                 f"{value!r}; the forward depends on tensor values")
            return value
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr)
        proxy.node.meta["concrete"] = value
        return proxy

    @contextlib.contextmanager
    def _recording_random_calls(self) -> Iterator[None]:
        """Random factories called with constant arguments would be baked into the graph as fixed
        tensors; record them as calls instead so every forward draws afresh."""
        originals = {name: getattr(torch, name) for name in _RANDOM_FUNCTIONS}

        def recorder(fn: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                if self._depth:
                    return fn(*args, **kwargs)
                return self.create_proxy("call_function", fn, args, kwargs)
            return call

        try:
            for name, fn in originals.items():
                setattr(torch, name, recorder(fn))
            yield
        finally:
            for name, fn in originals.items():
                setattr(torch, name, fn)

    def trace_with(self, root: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> fx.Graph:
        global _TRACING
        _TRACING += 1
        try:
            return self._trace_with(root, example)
        finally:
            _TRACING -= 1

    def _trace_with(self, root: torch.nn.Module, example: tuple[torch.Tensor, ...]) -> fx.Graph:
        """Trace ``root.forward(example)``, specialised to the shapes, dtypes and devices of ``example``.
        Tensors that modules stored on themselves while running on fake values (a lazily built cache) are
        put back as they were: the real forwards that follow must never meet a fake tensor."""
        with _disable_current_modes():
            self.example = tuple(self.fake_mode.from_tensor(t) for t in example)
        before = _stored_values(root)
        try:
            with self._recording_random_calls():
                return self.trace(root)
        finally:
            _restore_stored_tensors(root, before)


def _full_shape(parameter: torch.nn.Parameter) -> torch.Size | None:
    """The whole shape of a parameter FSDP2 shards (a DTensor); None for a parameter that is whole. (DeepSpeed
    ZeRO-3's partitioned owners are never traced: the splice refuses them before the trace.)"""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build without distributed
        return None
    return parameter.shape if isinstance(parameter, DTensor) else None  # a DTensor's shape is the whole one


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called")


@contextlib.contextmanager
def _hooks_off(module: torch.nn.Module) -> Iterator[None]:
    """The forward hooks of ``module`` and everything in it set aside, and put back after."""
    saved = [(m, name, getattr(m, name)) for m in module.modules() for name in _HOOK_DICTS if hasattr(m, name)]
    try:
        for m, name, hooks in saved:
            setattr(m, name, type(hooks)())
        yield
    finally:
        for m, name, hooks in saved:
            setattr(m, name, hooks)


def _run_module(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """Run a leaf module on fake values. A module whose parameters FSDP2 shards gathers them in forward hooks,
    collectives that must not run on fake values: it runs with its hooks (and its submodules', which may be sharded
    too) set aside, on fake parameters of the whole shape."""
    parameters = dict(module.named_parameters())
    shapes = {name: _full_shape(p) for name, p in parameters.items()}
    full = {name: torch.empty(shape, dtype=parameters[name].dtype, device=parameters[name].device)
            for name, shape in shapes.items() if shape is not None}
    if not full:
        return module(*args, **kwargs)
    from torch.nn.utils.stateless import _reparametrize_module

    with _hooks_off(module), _reparametrize_module(module, full):
        return module(*args, **kwargs)


def _stored_values(root: torch.nn.Module) -> dict[int, tuple[dict[str, Any], dict[str, Any]]]:
    """What each module of ``root`` holds as plain attributes and as buffers, by module."""
    return {id(m): (dict(vars(m)), dict(m._buffers)) for m in root.modules()}


def _restore_stored_tensors(root: torch.nn.Module, before: dict[int, tuple[dict[str, Any], dict[str, Any]]]) -> None:
    """Undo what running on fake values stored on the modules: the old value back, or the new attribute gone."""
    for module in root.modules():
        attributes, buffers = before.get(id(module), ({}, {}))
        for name, value in list(module._buffers.items()):
            if isinstance(value, FakeTensor):
                module._buffers[name] = buffers.get(name)
        for name, value in list(vars(module).items()):
            if isinstance(value, FakeTensor):
                if name in attributes:
                    setattr(module, name, attributes[name])
                else:
                    delattr(module, name)
