"""diffusers' image and video transformer classes, each built from the tiny configuration of its own diffusers
test, with the facts the family test checks them against (where the image tokens sit in each stack's stream).

A group module (``cases_*.py``) defines ``CASES: dict[str, Case]``, keyed by the class name.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn


@dataclass
class Case:
    """One class of the family.

    build: returns the model (seeded, random weights) and the keyword inputs of one forward (batch of 2).
    image: per block container (its name on the owner), the positions of the image tokens in the stream its
        blocks receive, as read from the model's code; containers not named hold image tokens only.
    blocks: the ``blocks=`` a user must give (a model with two candidate stacks); None: the one-line wrap.
    prefix_tokens: the declaration a user must give where the forward cannot be traced (so its token layout
        cannot be read): 0 when every token of the stream is an image token.
    refuses: a pattern of the RouteError expected where routing the class cannot be made correct.
    known_failure: why the class does not route correctly yet (the test is expected to fail, strictly: a fix
        shows up as an unexpected pass); the backbone table lists it.
    stream: the block argument that carries the image stream (for the hooks that check it from outside).
    """

    build: Callable[[], tuple[nn.Module, dict[str, Any]]]
    image: dict[str, slice] = field(default_factory=dict)
    blocks: tuple[str, ...] | None = None
    prefix_tokens: int | None = None
    refuses: str | None = None
    known_failure: str | None = None
    stream: str = "hidden_states"
    note: str = ""


def all_cases() -> dict[str, Case]:
    cases: dict[str, Case] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("cases_"):
            module = importlib.import_module(f"{__name__}.{info.name}")
            for name, case in module.CASES.items():
                assert name not in cases, f"{name} is defined twice"
                cases[name] = case
    from .verdicts import DECLARATIONS, KNOWN_FAILURES, REFUSED

    for name, declared in DECLARATIONS.items():
        cases[name] = dataclasses.replace(cases[name], **declared)
    for name, pattern in REFUSED.items():
        cases[name] = dataclasses.replace(cases[name], refuses=pattern)
    for name, why in KNOWN_FAILURES.items():
        cases[name] = dataclasses.replace(cases[name], known_failure=why)
    return cases
