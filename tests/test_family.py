"""The one-line wrap across diffusers' image and video transformer family (``tests/family``): each class from the
tiny configuration of its own diffusers test, a route in the middle of each of its stacks.

Checked from outside, against an unwrapped copy: eval output bitwise equal; in a training forward, the stream
entering each route's first block (a hook on the block) holds every non-image token and the kept share of the
image tokens, each row equal to the unwrapped stream's row at that position; FLOPs of a forward and backward
fall; gradients reach the same parameters. A class that cannot be routed correctly raises a RouteError.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")

import tokenroute  # noqa: E402
from tokenroute import RouteError  # noqa: E402
from tokenroute.core.patches import registry_of  # noqa: E402
from tokenroute.training import flop_counter  # noqa: E402
from tokenroute.utils import output_tensor  # noqa: E402

from family import Case, all_cases  # noqa: E402
from helpers import randomize  # noqa: E402

CASES = all_cases()
RATIO = 0.5


def build(case: Case):
    torch.manual_seed(0)
    model, inputs = case.build()
    return randomize(model, seed=0), inputs


def middle_routes(stack) -> list[tuple[int, int, float]]:
    """One route in the middle of each container of the stack (double and single stacks each get one)."""
    containers: dict[str, list[int]] = {}
    for position, path in enumerate(stack.paths):
        containers.setdefault(path.split(".")[0], []).append(position)
    routes = []
    for positions in containers.values():
        n = len(positions)
        inner = positions[1:-1] if n >= 3 else positions
        routes.append((inner[0], inner[-1], RATIO))
    return routes


def forward(model, inputs, seed: int = 0) -> torch.Tensor:
    """The model's prediction, flattened into one tensor where it returns one per sample (a list)."""
    torch.manual_seed(seed)  # some models drop labels or add noise in training
    out = model(**inputs)
    sample = getattr(out, "sample", out[0] if isinstance(out, (tuple, list)) else out)
    if isinstance(sample, (list, tuple)):
        return torch.cat([s.flatten() for s in sample])
    return output_tensor(out)


def capture_streams(model, stack_paths, positions, stream_name):
    """Hooks on the blocks at ``positions``: the stream each receives, read from its arguments."""
    seen, handles = {}, []
    for p in positions:
        block = model.get_submodule(stack_paths[p])

        def hook(module, args, kwargs, p=p):
            seen[p] = kwargs[stream_name] if stream_name in kwargs else args[0]

        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def kept_positions(full: torch.Tensor, reduced: torch.Tensor) -> list[int]:
    """Positions in ``full`` (L, D) of the rows of ``reduced`` (K, D), matched in order, bitwise."""
    positions, start = [], 0
    for row in reduced:
        equal = (full[start:] == row).flatten(1).all(1).nonzero()
        assert len(equal), "a row of the routed stream is not a row of the unwrapped stream"
        positions.append(start + int(equal[0]))
        start = positions[-1] + 1
    return positions


def flops(model, inputs) -> int:
    with flop_counter() as counter:  # attention counted on the CPU too
        forward(model, inputs).float().square().mean().backward()
    return counter.get_total_flops()


def check(case: Case) -> dict:
    """Run every check on ``case``; returns what was found (stack, routes, layouts) for the backbone table."""
    model, inputs = build(case)
    plain = copy.deepcopy(model)
    if case.refuses is not None:
        with pytest.raises(RouteError, match=case.refuses) as refused:
            stack = tokenroute.core.find_stack(model, case.blocks)
            tokenroute.wrap(model, middle_routes(stack), seed=0, blocks=case.blocks, prefix_tokens=case.prefix_tokens)
            forward(model.train(), inputs)
        return {"status": "refused", "why": str(refused.value).split(". ")[0][:240]}
    stack = tokenroute.core.find_stack(model, case.blocks)
    routes = middle_routes(stack)
    paths = [f"{stack.owner_path}.{p}" if stack.owner_path else p for p in stack.paths]
    tokenroute.wrap(model, routes, seed=0, blocks=case.blocks, prefix_tokens=case.prefix_tokens)

    plain.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(forward(model, inputs), forward(plain, inputs)), "eval output differs from the unwrapped"

    plain.train(), model.train()
    firsts = [start for start, _, _ in routes]
    full, handles = capture_streams(plain, paths, firsts, case.stream)
    plain_flops = flops(plain, inputs)
    for h in handles:
        h.remove()
    assert flops(model, inputs) < plain_flops
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in plain.named_parameters() if p.grad is not None}

    layouts = []
    for route in routes:  # one route at a time: the stream entering it is then the unwrapped one, reduced
        start = route[0]
        tokenroute.unwrap(model)
        tokenroute.wrap(model, [route], seed=0, blocks=case.blocks, prefix_tokens=case.prefix_tokens)
        routed, handles = capture_streams(model, paths, [start], case.stream)
        forward(model, inputs)
        for h in handles:
            h.remove()
        container = stack.paths[start].split(".")[0]
        length = full[start].shape[1]
        image = range(length)[case.image.get(container, slice(None))]
        others = set(range(length)) - set(image)
        num_keep = len(image) - int(len(image) * RATIO)
        assert routed[start].shape[1] == len(others) + num_keep, f"route at {paths[start]}"
        for b in range(full[start].shape[0]):
            kept = kept_positions(full[start][b].detach(), routed[start][b].detach())
            assert others <= set(kept), f"non-image tokens routed at {paths[start]}"
        layouts += [b.layout.describe() for traced in registry_of(model).splice.signatures.graphs.values()
                    for b in traced.boundaries if b.layout is not None][:1]
    return {"status": "routes", "stack": stack.containers, "found": stack.found, "routes": routes, "layouts": layouts}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.xfail(reason=case.known_failure, strict=True))
                                  if case.known_failure else name for name, case in sorted(CASES.items())])
def test_one_line_wrap(name):
    check(CASES[name])
