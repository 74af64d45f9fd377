"""What a forward was called with: a method whose work depends on the call (a temporal schedule reads the timestep
or noise level the model receives) reads the model's argument here, by name, at every call.

The argument is found by name in the forward's signature; where none or several of the usual names are there,
the method is refused with the names found and how to declare the argument.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch
import torch.nn as nn

from .route import RouteError
from .splice.tracer import tracing

TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas", "noise_level")


class ForwardArgument:
    """One argument of ``module``'s forward, read by a pre-hook at each call (``value``; None before the first).

    name: the parameter's name; None: the one of ``names`` the forward takes (refused if none or several).
    """

    def __init__(self, module: nn.Module, name: str | None = None, names: Sequence[str] = TIMESTEP_NAMES,
                 what: str = "timestep"):
        self.module, self.what = module, what
        self.signature = inspect.signature(type(module).forward)
        parameters = [p for p in self.signature.parameters if p != "self"]
        if name is None:
            found = [n for n in names if n in parameters]
            if len(found) != 1:
                raise RouteError(
                    f"{type(module).__name__}.forward({', '.join(parameters)}): "
                    + (f"several arguments may carry the {what} ({', '.join(found)})" if found else
                       f"no argument named like a {what} ({', '.join(names)})")
                    + "; declare it: timestep_arg='<name>'")
            name = found[0]
        elif name not in parameters:
            raise RouteError(f"timestep_arg={name!r}: {type(module).__name__}.forward takes "
                             f"({', '.join(parameters)}); name one of them")
        self.name = name
        self.value: Any = None
        self._distinct: list[float] | None = None
        self._handle: Any = None

    def attach(self) -> None:
        self._handle = self.module.register_forward_pre_hook(self._read, with_kwargs=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.value, self._distinct = None, None

    def _read(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if tracing():
            return
        bound = self.signature.bind_partial(module, *args, **kwargs).arguments
        self.value, self._distinct = bound.get(self.name), None

    def values(self) -> list[float]:
        """The distinct values of the argument in this call (one per sample, or one for the batch)."""
        if self.value is None:
            raise RouteError(f"{type(self.module).__name__} was run without its {self.what} argument "
                             f"{self.name!r} being seen: call the model (model(...)), not model.forward(...), and "
                             f"pass {self.name}")
        if self._distinct is None:  # read once per call, however many routes ask (a host sync for a tensor)
            value = self.value
            self._distinct = value.detach().float().flatten().unique().tolist() if isinstance(value, torch.Tensor) \
                else [float(value)]
        return self._distinct
