"""Splice by rewriting the owner's forward graph: trace it once per input signature (blocks as leaves),
put a route-start node before each segment's first block, a route-end node after its last, and a stage
node after a stage's block.

Dataflow decides what crosses a boundary: every value made before the segment and used inside it enters
through the start node (token-aligned ones are reduced by the segment's operation), every value made inside
and used after it leaves through the end node (routed ones are restored). That covers U-ViT's long skips,
rotary tables and masks as well as the main hidden state.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from ..blocks import BlockSpec, bind_arguments, with_stream_output
from ..layout import INPUT_PACKINGS, TokenLayout
from ..operations import check_table_group, needs_shared_selection
from ..route import RouteError
from ..stack import BlockStack
from .boundaries import Boundaries
from .layouts import LayoutReader, upstream
from .tracer import ConcreteTracer

ROOT = "owner"
TENSOR = object()  # marks where a call's tensor leaves go among its constant leaves


class _Call(nn.Module):
    """Holds the owner as a submodule and calls its original forward on flat tensor inputs, so the
    traced graph takes a tuple of tensors and returns a flat tuple (pytree specs rebuild the rest)."""

    def __init__(self, owner: nn.Module, forward: Callable[..., Any], in_spec: TreeSpec, constants: list[Any]):
        super().__init__()
        self.owner = owner
        self._forward = forward
        self._in_spec = in_spec
        self._constants = constants  # the call's leaves: constants, and TENSOR where a tensor goes
        self.out_spec: TreeSpec | None = None

    def forward(self, tensors: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
        given = iter(range(len(tensors)))
        leaves = [tensors[next(given)] if c is TENSOR else c for c in self._constants]
        args, kwargs = tree_unflatten(leaves, self._in_spec)
        flat, self.out_spec = tree_flatten(self._forward(self.owner, *args, **kwargs))
        return tuple(flat)


class RouteStart(nn.Module):
    """Segment ``index`` starts: its operation begins and reduces the values that enter it."""

    def __init__(self, boundaries: Boundaries, index: int, roles: list[str], layout: TokenLayout):
        super().__init__()
        self.boundaries, self.index, self.roles, self.layout = boundaries, index, roles, layout

    def forward(self, stream: torch.Tensor, *values: Any) -> tuple[Any, ...]:
        return self.boundaries.enter(self.index, stream, values, self.roles, self.layout)


class RouteEnd(nn.Module):
    """Segment ``index`` ends: the routed values that leave it go back through its operation."""

    def __init__(self, boundaries: Boundaries, index: int, routed: list[bool]):
        super().__init__()
        self.boundaries, self.index, self.routed = boundaries, index, routed

    def forward(self, *values: Any) -> tuple[Any, ...]:
        return self.boundaries.exit(self.index, values, self.routed)


class AfterBlock(nn.Module):
    """Runs stage ``index`` on the stream after its block."""

    def __init__(self, boundaries: Boundaries, index: int):
        super().__init__()
        self.boundaries, self.index = boundaries, index

    def forward(self, stream: torch.Tensor, **arguments: Any) -> torch.Tensor:
        return self.boundaries.after_block(self.index, stream, arguments)


@dataclass
class Boundary:
    """What one route's splice does, for explain()."""

    route: int
    stream: str
    layout: TokenLayout | None = None
    gathered: list[tuple[str, str]] = field(default_factory=list)  # (value, role)
    passed: list[str] = field(default_factory=list)
    scattered: list[str] = field(default_factory=list)
    returned: list[str] = field(default_factory=list)  # leave unchanged
    shared_selection: bool = False


@dataclass
class TracedForward:
    module: fx.GraphModule
    call: _Call
    boundaries: list[Boundary]
    tapped: dict[int, TokenLayout] = field(default_factory=dict)  # tapped block -> its stream's layout

    def __call__(self, tensors: tuple[torch.Tensor, ...]) -> Any:
        return tree_unflatten(list(self.module(tensors)), self.call.out_spec)


def trace(stack: BlockStack, forward: Callable[..., Any], boundaries: Boundaries, args: tuple, kwargs: dict,
          constants: list[Any], tensors: list[torch.Tensor], in_spec: TreeSpec) -> TracedForward:
    """Trace the owner's forward on this call and splice every route in. Raises on any mismatch."""
    call = _Call(stack.owner, forward, in_spec, constants)
    containers = {m for name, m in stack.owner.named_children() if isinstance(m, (nn.ModuleList, nn.Sequential))
                  and any(b is m2 for b in stack.blocks for m2 in m)}
    tracer = ConcreteTracer(traced={call, stack.owner, *containers}, leaves=set(stack.blocks))
    graph = tracer.trace_with(call, tuple(tensors))
    input_names, image_input = _input_names(forward, args, kwargs)
    for node in graph.nodes:  # name the inputs for explain(), mark the image input's tensors
        if node.op == "call_function" and node.target is operator.getitem and node.args[0].op == "placeholder":
            node.meta["label"] = f"input {input_names[node.args[1]]}"
            node.meta["image_input"] = input_names[node.args[1]].startswith(image_input)
    module = fx.GraphModule(call, graph, class_name=f"Routed{type(stack.owner).__name__}")
    described, tapped = splice(module, stack, boundaries, _bound(forward, stack.owner, args, kwargs))
    for node in module.graph.nodes:  # drop the traced call's tensors: they would pin its activations
        node.meta.pop("concrete", None)
    return TracedForward(module, call, described, tapped)


def _bound(forward: Callable[..., Any], owner: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by the forward's parameter names (for a declared input packing)."""
    import inspect

    try:
        bound = inspect.signature(forward).bind(owner, *args, **kwargs)
    except TypeError:
        return dict(kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _input_names(forward: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[list[str], str]:
    """Readable names of the call's tensor leaves (the argument's name, with the path inside it), and the
    name of the forward's first argument, the image input."""
    import inspect
    from torch.utils._pytree import keystr, tree_flatten_with_path

    params = [p.name for p in inspect.signature(forward).parameters.values()][1:]
    names = []
    for path, leaf in tree_flatten_with_path((args, kwargs))[0]:
        if isinstance(leaf, torch.Tensor):
            where, rest = path[0].idx, path[1:]
            head = params[rest[0].idx] if where == 0 and rest[0].idx < len(params) else keystr(rest[:1]).strip("[]'")
            names.append(head + keystr(rest[1:]))
    return names, params[0] if params else ""


def describe(node: fx.Node) -> str:
    """A node's value in words: 'input x', 'blocks.3 output', 'blocks.3 output[1]', else its name."""
    if "label" in node.meta:
        return node.meta["label"]
    if node.op == "call_module":
        return f"{node.target.removeprefix(ROOT + '.')} output"
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
            and node.args[0].op == "call_module":
        return f"{describe(node.args[0])}[{node.args[1]}]"
    return node.name


def _block_nodes(graph: fx.Graph, stack: BlockStack) -> list[fx.Node]:
    paths = [f"{ROOT}.{p}" for p in stack.paths]
    nodes = [n for n in graph.nodes if n.op == "call_module" and n.target in set(paths)]
    if [n.target for n in nodes] != paths:
        raise RouteError(
            f"the traced forward calls the blocks as {[n.target for n in nodes]}, not once each in the order "
            f"{paths}; name the stack with blocks=... or route with mechanism='hooks'"
        )
    return nodes


def _contains(value: Any, node: fx.Node) -> bool:
    found = False

    def visit(v: Any) -> Any:
        nonlocal found
        found = found or v is node
        return v

    fx.node.map_aggregate(value, visit)
    return found


def splice(module: fx.GraphModule, stack: BlockStack, boundaries: Boundaries,
           arguments: dict[str, Any] | None = None) -> tuple[list[Boundary], dict[int, TokenLayout]]:
    """Splice every segment's start and end nodes, then every stage, into the traced graph; returns what
    each segment's boundaries do, and the layout of each tapped block's stream (read before any splice)."""
    graph = module.graph
    blocks = _block_nodes(graph, stack)
    block_of = dict(zip(blocks, stack.blocks))
    spec_of = {node: with_stream_output(block_of[node], spec, _concrete(_argument(node, block_of[node], spec.stream)),
                                        node.meta.get("concrete"))
               for node, spec in zip(blocks, stack.specs)}
    packing = INPUT_PACKINGS.get(type(stack.owner).__name__)
    reader = LayoutReader(module, {n: (block_of[n], spec_of[n]) for n in blocks},
                          {n for n in graph.nodes if n.meta.get("image_input")}, describe,
                          packing=(type(stack.owner).__name__, packing(arguments or {})) if packing else None)
    layouts = []  # read from the graph as traced, before any splice changes it
    stack_paths = stack.paths
    for i, segment in enumerate(boundaries.plan.segments):
        first = blocks[segment.route.start]
        stream = _argument(first, block_of[first], spec_of[first].stream)
        if not isinstance(stream, fx.Node):
            raise RouteError(f"block {segment.route.start} gets no token stream '{spec_of[first].stream}' as a "
                             "traced value")
        if not isinstance(_concrete(stream), torch.Tensor) or _concrete(stream).dim() < 3:
            shape = tuple(_concrete(stream).shape) if isinstance(_concrete(stream), torch.Tensor) else None
            raise RouteError(
                f"the stream entering route {i} ({describe(stream)}, argument {spec_of[first].stream!r} of "
                f"{stack_paths[segment.route.start]}) has shape {shape}: tokenroute routes streams laid out "
                "(B, L, D), and a packed sequence with no batch axis has none to keep the draw per sample. Keep "
                "routes off these blocks, or register the block with the argument that carries (B, L, D) tokens: "
                "tokenroute.register_block(cls, tokenroute.BlockSpec(stream=name))")
        _refuse_sequence_first(graph, stream, i)
        entering = f"route {i} ({segment.method})"
        layouts.append(dataclasses.replace(reader.layout(stream, boundaries.plan, entering), joint=boundaries.joints[i]))
    tapped = {}
    for tap in boundaries.plan.taps:
        node = blocks[tap.block]
        stream = _argument(node, block_of[node], spec_of[node].stream)
        entering = f"block {tap.block} ({stack_paths[tap.block]}, read for {tap.method})"
        if not isinstance(stream, fx.Node) or not isinstance(_concrete(stream), torch.Tensor) \
                or _concrete(stream).dim() < 3:
            raise RouteError(f"the stream entering {entering} is not a traced (B, L, D) tensor")
        tapped[tap.block] = dataclasses.replace(reader.layout(stream, boundaries.plan, entering),
                                                joint=stack.specs[tap.block].joint)
    described = []
    for i, segment in enumerate(boundaries.plan.segments):
        region = _region(graph, blocks[segment.route.start], blocks[segment.route.end])
        boundary, start = _splice_start(module, boundaries, i, region, spec_of, block_of, layouts[i])
        _splice_end(module, boundaries, i, region, spec_of, set(start.users), boundary)
        described.append(boundary)
    for k, stage in enumerate(boundaries.plan.stages):
        node = blocks[stage.after]
        _splice_stage(module, boundaries, k, node, spec_of[node], block_of[node])
    graph.lint()
    module.recompile()
    return described, tapped


def _region(graph: fx.Graph, first: fx.Node, last: fx.Node) -> list[fx.Node]:
    """The nodes from the route's first block to its last, with the unpacking of the last one's tuple output
    (items by position; a slice of its tokens is taken after the route, from the restored stream)."""
    order = list(graph.nodes)
    begin, stop = order.index(first), order.index(last)
    while stop + 1 < len(order) and order[stop + 1].op == "call_function" \
            and order[stop + 1].target is operator.getitem and isinstance(order[stop + 1].args[1], int) \
            and order[stop + 1].args[0] in order[begin:stop + 1]:
        stop += 1
    return order[begin:stop + 1]


def _splice_start(module: fx.GraphModule, boundaries: Boundaries, i: int, region: list[fx.Node],
                  spec_of: dict[fx.Node, BlockSpec], block_of: dict[fx.Node, nn.Module],
                  layout: TokenLayout) -> tuple[Boundary, fx.Node]:
    """Every value made before the route and read inside it enters through one start node; the uses that
    need its tokens (by the role of the argument they feed) read the gathered version."""
    graph, first, inside = module.graph, region[0], set(region)
    stream_name = spec_of[first].stream
    stream = _argument(first, block_of[first], stream_name)  # checked to be a traced value when its layout was read
    entering: dict[fx.Node, dict[fx.Node, str]] = {}
    for node in region:
        for source in node.all_input_nodes:
            if source not in inside:
                entering.setdefault(source, {})[node] = _role(source, node, spec_of.get(node), block_of.get(node))
    gather = [(src, uses) for src, uses in entering.items() if any(r != "pass" for r in uses.values())]
    roles = [_merge(uses.values()) for _, uses in gather]
    traced_stream = _concrete(stream)
    for node in region:  # table arguments built from several traced values are checked as one group
        spec = spec_of.get(node)
        if spec is not None:
            for name, value in bind_arguments(block_of[node], node.args, dict(node.kwargs)).items():
                if spec.role(name) == "table" and isinstance(value, (tuple, list)):
                    check_table_group([_concrete(v) for v in value], *traced_stream.shape[:2])
    shared = needs_shared_selection([_concrete(src) for src, _ in gather], roles, *traced_stream.shape[:2])
    boundary = Boundary(i, describe(stream), layout, shared_selection=shared,
                        passed=[describe(src) for src, uses in entering.items() if (src, uses) not in gather])
    with graph.inserting_before(first):
        module.add_submodule(f"route{i}_start", RouteStart(boundaries, i, roles, layout))
        start = graph.call_module(f"route{i}_start", (stream, *[src for src, _ in gather]))
        for k, ((src, uses), role) in enumerate(zip(gather, roles)):
            got = graph.call_function(operator.getitem, (start, k))
            boundary.gathered.append((describe(src), role))
            for user, use_role in uses.items():
                if use_role != "pass":
                    user.replace_input_with(src, got)
    return boundary, start


def _swaps_first_axes(node: fx.Node) -> bool:
    """A transpose or permute that exchanges axes 0 and 1."""
    if node.op == "call_method" and node.target in ("transpose", "swapaxes"):
        dims = set(node.args[1:3])
    elif node.op == "call_function" and node.target in (torch.transpose, torch.swapaxes):
        dims = set(node.args[1:3])
    elif node.op == "call_method" and node.target == "permute" or node.op == "call_function" and node.target is torch.permute:
        order = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        return len(order) >= 2 and tuple(order[:2]) == (1, 0)
    else:
        return False
    return dims == {0, 1}


def _refuse_sequence_first(graph: fx.Graph, stream: fx.Node, i: int) -> None:
    """A stream laid out (L, B, D), tokens first, would have its batch axis routed: refuse it. Read from the
    graph: the stream (through the blocks and the values of its layout, joined on axis 0 or not) comes from a
    transpose of axes 0 and 1 of a tensor whose axis 0 is the batch of the model's image, video or token inputs
    (3-D and more)."""
    placeholder = next(n for n in graph.nodes if n.op == "placeholder")
    batches = {t.shape[0] for t in placeholder.meta.get("concrete", ()) if isinstance(t, torch.Tensor) and t.dim() >= 3}
    traced = _concrete(stream)

    def same_layout(n: fx.Node) -> bool:  # the same axes after the first (joined on axis 0 or not), or a tuple
        value = _concrete(n)
        return isinstance(value, torch.Tensor) and value.shape[1:] == traced.shape[1:] or isinstance(value, (tuple, list))

    for node in upstream(stream, same_layout):
        if _swaps_first_axes(node) and isinstance(_concrete(node.args[0]), torch.Tensor) \
                and _concrete(node.args[0]).shape[0] in batches:
            raise RouteError(
                f"the stream entering route {i} has shape {tuple(traced.shape)} and comes from {describe(node)}, a "
                f"transpose of a batch-first tensor: its tokens lie on axis 0 (sequence first). tokenroute routes "
                "streams laid out (B, L, ...); keep routes off the blocks that take a sequence-first stream")


def _splice_end(module: fx.GraphModule, boundaries: Boundaries, i: int, region: list[fx.Node],
                spec_of: dict[fx.Node, BlockSpec], gathered: set[fx.Node], boundary: Boundary) -> None:
    """Every value made inside the route and read after it leaves through one end node; the routed ones
    (carrying the stream's tokens) are scattered back."""
    graph, inside = module.graph, set(region)
    routed = _routed_flags(region, spec_of, gathered)
    leaving = [n for n in region if any(u not in inside for u in n.users)]
    flags = [routed.get(n, False) for n in leaving]
    with graph.inserting_after(region[-1]):
        module.add_submodule(f"route{i}_end", RouteEnd(boundaries, i, flags))
        end = graph.call_module(f"route{i}_end", tuple(leaving))
    with graph.inserting_after(end):
        for k, (node, flag) in enumerate(zip(leaving, flags)):
            got = graph.call_function(operator.getitem, (end, k))
            got.meta["label"] = describe(node)  # the same value, back at full length where it was routed
            got.meta["concrete"] = node.meta.get("concrete")  # the trace ran unrouted: full length too
            for user in list(node.users):
                if user not in inside and user is not end:
                    user.replace_input_with(node, got)
            (boundary.scattered if _carries(flag) else boundary.returned).append(describe(node))


def _splice_stage(module: fx.GraphModule, boundaries: Boundaries, k: int, node: fx.Node, spec: BlockSpec,
                  block: nn.Module) -> None:
    """Run stage ``k`` on the stream right after block ``node`` (and after a segment ending there), with the
    block's other arguments as they were before any segment reduced them."""
    graph = module.graph
    value = node if spec.stream_output is None else next(
        u for u in node.users if u.op == "call_function" and u.target is operator.getitem
        and u.args[1] == spec.stream_output)
    ends = [u for u in value.users if u.op == "call_module" and isinstance(module.get_submodule(u.target), RouteEnd)]
    if ends:
        position_in_end = ends[0].args.index(value)
        value = next(u for u in ends[0].users if u.args[1] == position_in_end)
    originals = {}
    for start in graph.nodes:
        if start.op == "call_module" and isinstance(module.get_submodule(start.target), RouteStart):
            for user in start.users:
                originals[user] = start.args[1 + user.args[1]]
    bound = bind_arguments(block, node.args, dict(node.kwargs))
    bound.pop(spec.stream)
    others = {n: fx.node.map_arg(v, lambda a: originals.get(a, a)) for n, v in bound.items() if not n.startswith("*")}
    module.add_submodule(f"stage{k}", AfterBlock(boundaries, k))
    with graph.inserting_after(value):
        call = graph.call_module(f"stage{k}", (value,), others)
    value.replace_all_uses_with(call, delete_user_cb=lambda user: user is not call)


def _concrete(value: Any) -> Any:
    return value.meta.get("concrete") if isinstance(value, fx.Node) else value


def _argument(node: fx.Node, block: nn.Module, name: str) -> Any:
    bound = bind_arguments(block, node.args, dict(node.kwargs))
    return bound.get(name)


def _role(source: fx.Node, user: fx.Node, spec: BlockSpec | None, block: nn.Module | None) -> str:
    if spec is None:
        return "auto"
    bound = bind_arguments(block, user.args, dict(user.kwargs))
    roles = {spec.role(name) for name, v in bound.items() if _contains(v, source)}
    return _merge(roles)


def _merge(roles: Any) -> str:
    roles = set(roles)
    for role in ("tokens", "table", "modulation", "auto"):
        if role in roles:
            return role
    return "pass"


def _routed_flags(region: list[fx.Node], spec_of: dict[fx.Node, BlockSpec], gathered: set[fx.Node]) -> dict[fx.Node, Any]:
    """Which parts of each region node's value carry routed tokens: True (all of it), False, or a tuple of
    flags for a tuple value. Routed are the gathered inputs, the stream output of every block, whatever is
    computed from them, and the same tensors wherever the forward regroups a block's outputs (slices,
    reversed tuples, unpacking: followed by the identity of the traced values). A block's other outputs
    (text tokens) are not."""
    flags: dict[fx.Node, Any] = {node: True for node in gathered}
    stream_values: set[int] = set()  # ids of the traced (fake) stream tensors

    def of_value(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            inner = tuple(of_value(v) for v in value)
            return True if inner and all(f is True for f in inner) else inner
        return isinstance(value, torch.Tensor) and id(value) in stream_values

    for node in region:
        concrete = node.meta.get("concrete")
        spec = spec_of.get(node)
        if spec is not None:
            stream = concrete if spec.stream_output is None else concrete[spec.stream_output]
            stream_values.add(id(stream))
            flags[node] = of_value(concrete)
        elif node.op == "call_function" and node.target is operator.getitem:
            parent = flags.get(node.args[0], False)
            flags[node] = parent if isinstance(parent, bool) else of_value(concrete)
        else:
            routed = any(_carries(flags.get(src, False)) for src in node.all_input_nodes)
            flags[node] = routed
            if routed and isinstance(concrete, torch.Tensor):
                stream_values.add(id(concrete))
    return flags


def _carries(flag: Any) -> bool:
    return flag is True or (isinstance(flag, tuple) and any(_carries(f) for f in flag))
