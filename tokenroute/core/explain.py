"""explain(model): the plan of a wrapped model in words."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .wrap import _record


def explain(model: nn.Module, *example_args: Any, **example_kwargs: Any) -> str:
    """The blocks found, which route covers which blocks, what each boundary gathers and scatters, and
    the mechanism. With example inputs (those of a forward call) the graph is traced for them first."""
    record = _record(model)
    stack, state = record.stack, record.state
    if example_args or example_kwargs:
        record.prepare(example_args, example_kwargs)
    owner = stack.owner_path or "<model>"
    lines = [f"tokenroute plan for {type(model).__name__}",
             f"  stack: {len(stack)} blocks run by {owner} ({type(stack.owner).__name__}); "
             f"prefix tokens never routed: {state.prefix_tokens}"]
    route_of = {b: i for i, r in enumerate(state.routes) for b in range(r.start, r.end + 1)}
    for position, (path, block, spec) in enumerate(zip(stack.paths, stack.blocks, stack.specs)):
        tag = f"route {route_of[position]}" if position in route_of else ""
        out = "output" if spec.stream_output is None else f"output[{spec.stream_output}]"
        lines.append(f"  [{position:>2}] {path:<28} {type(block).__name__:<26} stream: {spec.stream} -> {out}  {tag}")
    for i, route in enumerate(state.routes):
        back = "as the mask token" if state.fills[i] is not None else "with their route-start values"
        lines.append(f"  route {i}: {route}; {stack.paths[route.start]} .. {stack.paths[route.end]}; "
                     f"skipped tokens come back {back}")
    extension = record.extension
    for name, module in extension.modules.items():
        count = sum(p.numel() for p in module.parameters())
        parts = ", ".join(f"{n} {tuple(p.shape)}" if p.dim() <= 1 else n for n, p in module.named_parameters()
                          if n.count(".") <= 1)
        lines.append(f"  {extension.name} adds {owner}.{name}: {count:,} parameters ({parts})")
    if extension.after_stack is not None:
        after = extension.after_stack
        width = f", width {after.width}" if hasattr(after, "width") else ""
        lines.append(f"  after the last block: {type(after).__name__} ({len(getattr(after, 'blocks', []))} blocks{width}); "
                     "eval runs it with nothing dropped")
    if record.mechanism == "fx":
        lines.append("  mechanism: torch.fx graph rewrite of the owner's forward (blocks as leaves, one graph per "
                     "input signature, traced at the first routed forward)")
    else:
        why = f" (tracing failed: {record.fallback_reason})" if record.fallback_reason else ""
        lines.append(f"  mechanism: module hooks on the blocks{why}")
    for n, traced in enumerate(record.traced.values()):
        lines.append(f"  traced signature {n + 1} of {len(record.traced)}:")
        for b in traced.boundaries:
            route = state.routes[b.route]
            gathered = ", ".join(f"{name} ({role})" for name, role in b.gathered) or "nothing"
            lines.append(f"    route {b.route} start, before {stack.paths[route.start]}: stream {b.stream}; "
                         f"gathers {gathered}; passes {', '.join(b.passed) or 'nothing'}"
                         + ("; one selection shared by the batch (a batch-free token table crosses)" if b.shared_selection else ""))
            lines.append(f"    route {b.route} end, after {stack.paths[route.end]}: scatters back "
                         f"{', '.join(b.scattered) or 'nothing'}; returns {', '.join(b.returned) or 'nothing'} unchanged")
    if record.mechanism == "fx" and not record.traced:
        lines.append("  boundaries: not traced yet; pass example inputs to explain() or run one training forward")
    return "\n".join(lines)
