"""What a routed forward leaves behind: nothing that waits for Python's cycle collector.

A tensor held in a reference cycle stays on the GPU until the collector happens to run. A step that runs
out of memory half-way would then pin the activations made so far (the autograd graph hangs off them), and
the retry at a smaller batch, as a batch-size search or a user's own loop does, runs out again. Checked from
outside: a weak reference to the stream where the route starts, taken by a forward hook on the block before
it, with the collector switched off.
"""

from __future__ import annotations

import contextlib
import gc
import weakref

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import tokenroute
from tokenroute import RouteError
from tokenroute.core import find_stack

from helpers import backbone_inputs, make_backbone, twin

BACKBONES = ["dit", "uvit", "mamba"]
MODELS = {name: make_backbone(name, depth=6) for name in BACKBONES}  # wrapped copies per test
INPUTS = backbone_inputs(2, seed=3)
ROUTE = (1, 3, 0.5)  # block 0's output is the stream the route starts on


@contextlib.contextmanager
def collector_off():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def stream(out):
    """A block's stream output (a tuple's first item, as Mamba's blocks return)."""
    return out[0] if isinstance(out, tuple) else out


def watch_route_start(model: torch.nn.Module, fail_in: int | None = None,
                      error: type[Exception] = RuntimeError) -> list[weakref.ref]:
    """Weak references to block 0's real outputs; with ``fail_in``, that block raises ``error`` after its
    forward."""
    blocks = find_stack(model).blocks
    seen: list[weakref.ref] = []

    def keep(module, args, out):
        if not isinstance(stream(out), FakeTensor):  # the graph splice's trace runs the blocks on fake tensors
            seen.append(weakref.ref(stream(out)))

    def fail(module, args, out):
        if not isinstance(stream(out), FakeTensor):
            raise error("failed on purpose")

    blocks[0].register_forward_hook(keep)
    if fail_in is not None:
        blocks[fail_in].register_forward_hook(fail)
    return seen


def variant(name: str, routed: bool, mechanism: str | None) -> torch.nn.Module:
    model = twin(MODELS[name]).train()
    if routed:
        tokenroute.wrap(model, [ROUTE], seed=0, mechanism=mechanism)
    return model


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("routed, mechanism", [(False, None), (True, "fx"), (True, "hooks")])
def test_a_training_step_frees_the_route_start_stream_without_the_collector(name, routed, mechanism):
    model = variant(name, routed, mechanism)
    seen = watch_route_start(model)
    model(*INPUTS).square().mean().backward()  # the first call traces: step once before watching
    with collector_off():
        seen.clear()
        model(*INPUTS).square().mean().backward()
        assert seen and all(ref() is None for ref in seen), "the route-start stream outlived the step"


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("routed, mechanism", [(False, None), (True, "fx"), (True, "hooks")])
@pytest.mark.parametrize("fail_in", [2, 4])  # inside the route, after it
@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError])  # passed on; explained inside a route
def test_a_forward_that_fails_frees_what_it_made_without_the_collector(name, routed, mechanism, fail_in, error):
    model = variant(name, routed, mechanism)
    seen = watch_route_start(model, fail_in, error)
    raised = RouteError if routed and error is RuntimeError and fail_in <= ROUTE[1] else error
    for _ in range(2):  # the first call traces the graph, the second runs a traced one
        with collector_off():
            seen.clear()
            with pytest.raises(raised):
                model(*INPUTS)
            assert seen and all(ref() is None for ref in seen), \
                f"a forward that failed in block {fail_in} left the route-start stream alive"
