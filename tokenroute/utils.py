"""Small helpers shared across the package: what a model returned, and a value described for an error."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def output_tensor(out: Any) -> Tensor:
    """The prediction in a model's output: a tensor, a diffusers output's ``.sample``, or a tuple's first item."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"The model returned {type(out).__name__}; expected a tensor, a tuple or an output with .sample.")


def describe_value(value: object) -> str:
    """'float32 of shape (2, 3)' for a tensor, else the type's name: for error messages."""
    return f"{value.dtype} of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
