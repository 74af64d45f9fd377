"""A block's forward with some of its branches' values supplied instead of computed.

A feature cache that reuses a block's attention branch still runs what feeds it (the norm and the adaLN
modulation of the stream) unless the block's forward changes. Here the block's own forward is traced once per
input signature and per set of supplied branches (branches and every other submodule are leaves), each supplied
branch's call is replaced by a call that fetches its value, and dead code elimination drops what only fed it.
The program computes exactly what the forward computes, less the dead work.

A block whose forward cannot be traced, or that calls a supplied branch more than once, runs its forward as it
is; ``reason`` says why.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_unflatten

from . import signature_key
from .graph import ROOT, _Call
from .tracer import ConcreteTracer

Supply = Callable[[int], Any]  # branch index -> its value for this call


class BranchSupplier:
    """Runs ``block`` with the branches in a given set supplied by ``supply(index)`` (``paths[index]`` is the
    branch's submodule path in the block). Programs are kept per (supplied set, input signature), at most
    ``capacity`` of them."""

    def __init__(self, block: nn.Module, paths: list[str], supply: Supply, capacity: int = 16):
        self.block, self.paths, self.supply, self.capacity = block, list(paths), supply, capacity
        self.programs: OrderedDict[tuple, Any] = OrderedDict()
        self.reason: str | None = None if "forward" not in block.__dict__ else \
            "its forward is already replaced on the instance (another method wraps it)"

    def __call__(self, supplied: frozenset[int], forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """The block's output with the branches in ``supplied`` fetched instead of computed; ``forward(*args,
        **kwargs)`` where the block cannot run that way (``reason`` says why, from the first failure on)."""
        if self.reason is not None:
            return forward(*args, **kwargs)
        key, constants, tensors, spec = signature_key(False, args, kwargs)
        key = (supplied, key)
        program = self.programs.get(key)
        if program is None:
            try:
                program = self._trace(supplied, constants, tensors, spec)
            except Exception as err:  # noqa: BLE001 - any failure to trace leaves the forward as it is
                self.reason = f"its forward cannot be traced ({type(err).__name__}: {err})"
                return forward(*args, **kwargs)
            self.programs[key] = program
            if len(self.programs) > self.capacity:
                self.programs.popitem(last=False)
        else:
            self.programs.move_to_end(key)
        module, call = program
        return tree_unflatten(list(module(tuple(tensors))), call.out_spec)

    def fetch(self, index: int) -> Any:
        """The value of supplied branch ``index`` (called from the program)."""
        return self.supply(index)

    def _trace(self, supplied: frozenset[int], constants: list[Any], tensors: list[Any], spec: Any) -> Any:
        call = _Call(self.block, type(self.block).forward, spec, constants)
        graph = ConcreteTracer(traced={call, self.block}, leaves=set()).trace_with(call, tuple(tensors))
        module = fx.GraphModule(call, graph, class_name=f"Supplied{type(self.block).__name__}")
        for index in supplied:
            target = f"{ROOT}.{self.paths[index]}"
            calls = [n for n in module.graph.nodes if n.op == "call_module" and n.target == target]
            if len(calls) != 1:
                raise fx.proxy.TraceError(f"its forward calls branch {self.paths[index]} {len(calls)} times")
            with module.graph.inserting_before(calls[0]):
                fetched = module.graph.call_function(self.fetch, (index,))
            calls[0].replace_all_uses_with(fetched)
            module.graph.erase_node(calls[0])
        module.graph.eliminate_dead_code()
        for node in module.graph.nodes:  # the trace's fake values would pin memory
            node.meta.pop("concrete", None)
        module.recompile()
        return module, call
