"""explain(model): the plan of a model with tokenroute methods applied, in words."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .patches import registry_of


def explain(model: nn.Module, *example_args: Any, **example_kwargs: Any) -> str:
    """The methods applied, the blocks found, which route covers which blocks, what each boundary gathers
    and scatters, the mechanism and its graph cache. With example inputs (those of a forward call) the
    graph is traced for them first, as a training forward would be."""
    registry = registry_of(model)
    stack, splice = registry.stack, registry.splice
    if splice is not None and splice.mechanism == "fx" and (example_args or example_kwargs):
        was_training = stack.owner.training
        stack.owner.train()  # trace as a training forward would
        try:
            splice.graph_for(example_args, example_kwargs, training=True, run=False)
        finally:
            stack.owner.train(was_training)
    owner = stack.owner_path or "<model>"
    plan = splice.plan if splice is not None else None
    prefix = plan.prefix_tokens if plan is not None else registry.prefix_default
    lines = [f"tokenroute plan for {type(model).__name__}",
             f"  methods: {', '.join(f'{p.title} ({p.name})' for p in registry)}",
             f"  stack: {len(stack)} blocks run by {owner} ({type(stack.owner).__name__}), found as {stack.found}; "
             f"declared prefix tokens: {prefix}"]
    route_of = plan.route_of() if plan is not None else {}
    for position, (path, block, spec) in enumerate(zip(stack.paths, stack.blocks, stack.specs)):
        tag = f"route {route_of[position]}" if position in route_of else ""
        out = "output" if spec.stream_output is None else f"output[{spec.stream_output}]"
        lines.append(f"  [{position:>2}] {path:<28} {type(block).__name__:<26} stream: {spec.stream} -> {out}  {tag}")
    for i, segment in enumerate(plan.segments if plan is not None else []):
        route = segment.route
        lines.append(f"  route {i} ({segment.method}): {segment.operation.span(route)}; {stack.paths[route.start]} .. {stack.paths[route.end]}; "
                     f"{segment.operation.describe()}")
    for patch in registry:
        lines += patch.describe(stack)
    if splice is None:
        return "\n".join(lines)
    lines += splice.describe()
    graphs = list(splice.signatures.graphs.values())
    for n, traced in enumerate(graphs):
        lines.append(f"  traced signature {n + 1} of {len(graphs)}:")
        for b in traced.boundaries:
            route = plan.segments[b.route].route
            gathered = ", ".join(f"{name} ({role})" for name, role in b.gathered) or "nothing"
            if b.layout is not None:
                lines.append(f"    route {b.route} layout: {b.layout.describe()}")
            lines.append(f"    route {b.route} start, before {stack.paths[route.start]}: stream {b.stream}; "
                         f"gathers {gathered}; passes {', '.join(b.passed) or 'nothing'}"
                         + ("; one selection shared by the batch (a batch-free token table crosses)"
                            if b.shared_selection else ""))
            lines.append(f"    route {b.route} end, after {stack.paths[route.end]}: scatters back "
                         f"{', '.join(b.scattered) or 'nothing'}; returns {', '.join(b.returned) or 'nothing'} unchanged")
    if splice.mechanism == "fx" and not graphs:
        lines.append("  boundaries: not traced yet; pass example inputs to explain() or run one training forward")
    return "\n".join(lines)
