"""Find the block stack of a model: the module that calls the blocks (the owner) and the blocks in the order
the hidden state flows through them.

The owner is the module whose block containers hold the most parameters. Which of its containers form the
stack, and in what order, is read from its forward: the loops over containers whose blocks take and give back
the same variable as the largest container's blocks do (double and single stacks, a refiner of the image
tokens), in the order the forward runs them. Containers run on another variable (text refiners, VACE blocks,
caption projections) are left out. Where the forward's source cannot be read, every container is taken in
registration order, and the first trace checks that order.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass, field
from typing import Sequence

import torch.nn as nn

from .blocks import BlockSpec, forward_parameters, spec_for
from .route import RouteError

_CONTAINERS = (nn.ModuleList, nn.Sequential)


@dataclass
class BlockStack:
    """The owner module whose forward runs the blocks, and the blocks in the order it runs them. ``found``
    says how the stack was chosen (for explain)."""

    owner: nn.Module
    owner_path: str
    paths: list[str]  # each block's path relative to the owner, in stack order
    blocks: list[nn.Module]
    specs: list[BlockSpec] = field(default_factory=list)
    found: str = ""

    def __len__(self) -> int:
        return len(self.blocks)

    def width(self) -> int:
        """The stream's channel width: the owner's ``hidden_size``, ``embed_dim``, ``inner_dim`` or ``dim`` (or its
        config's), else the first block's first LayerNorm; refused where neither says."""
        for name in ("hidden_size", "embed_dim", "inner_dim", "dim"):
            value = getattr(self.owner, name, None) or getattr(getattr(self.owner, "config", None), name, None)
            if isinstance(value, int):
                return value
        norms = [m for m in self.blocks[0].modules() if isinstance(m, nn.LayerNorm)]
        if norms:
            return norms[0].normalized_shape[-1]
        raise RouteError(f"cannot tell the token width of {type(self.owner).__name__}'s stream; give the owner a "
                         "hidden_size attribute")

    @property
    def containers(self) -> list[str]:
        """The owner's children holding the blocks, in stack order (one per stack: double, single)."""
        return list(dict.fromkeys(path.split(".")[0] for path in self.paths))


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_layer(module: nn.Module) -> bool:
    """One of torch's own leaf layers (Linear, Conv, a norm): a list of them is projections, not a stack,
    unless the owner holds nothing else."""
    return type(module).__module__.startswith("torch.nn") and next(module.children(), None) is None


def _candidates(owner: nn.Module) -> list[str]:
    found = [n for n, m in owner.named_children() if isinstance(m, _CONTAINERS) and len(m) > 0
             and all(_has_params(b) for b in m)]
    composite = [n for n in found if not all(_is_layer(b) for b in getattr(owner, n))]
    return composite or found


@dataclass
class _Loop:
    """A loop (or a direct call) in the owner's forward that runs blocks of ``containers``."""

    line: int
    containers: list[str]
    stream: str | None  # the variable the blocks take as their stream and give back; None: not one variable


def _forward_tree(owner: nn.Module) -> ast.AST | None:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(type(owner).forward)))
    except (OSError, TypeError, SyntaxError):
        return None


def _self_attributes(node: ast.AST) -> list[str]:
    return [n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "self"]


def _assigned(target: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}


def _stream_variable(call: ast.Call, block: nn.Module, shift: int, assigned: set[str],
                     tuples: dict[str, list[ast.expr]] | None = None) -> str | None:
    """The variable passed as the block's stream argument, if the call's result is assigned back to it.
    ``tuples``: tuples the loop builds by name, for calls that unpack one (``block(*args)``)."""
    stream = spec_for(block).stream
    names = [p.name for p in forward_parameters(block)]
    args = list(call.args)
    for k, arg in enumerate(args):
        if isinstance(arg, ast.Starred) and isinstance(arg.value, ast.Name) and arg.value.id in (tuples or {}):
            args[k:k + 1] = tuples[arg.value.id]
            break
    value = next((k.value for k in call.keywords if k.arg == stream), None)
    if value is None and stream in names and names.index(stream) + shift < len(args):
        value = args[names.index(stream) + shift]
    return value.id if isinstance(value, ast.Name) and value.id in assigned else None


def _block_loops(owner: nn.Module, candidates: list[str], singles: list[str]) -> list[_Loop] | None:
    """The loops of the owner's forward over ``candidates`` and its direct calls of ``singles``, in source order."""
    tree = _forward_tree(owner)
    if tree is None:
        return None
    children = dict(owner.named_children())
    aliases = {}  # local names bound to a container: `blocks = self.blocks` (or a slice of it)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            held = [n for n in _self_attributes(node.value) if n in candidates]
            if len(held) == 1 and not isinstance(node.value, ast.Call):
                aliases[node.targets[0].id] = held[0]
    loops = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.For, ast.AsyncFor)):
            named = _self_attributes(node.iter) + [aliases[n.id] for n in ast.walk(node.iter)
                                                   if isinstance(n, ast.Name) and n.id in aliases]
            containers = [n for n in dict.fromkeys(named) if n in candidates]
            if not containers:
                continue
            loop_vars = _assigned(node.target)
            tuples = {a.targets[0].id: list(a.value.elts) for statement in node.body for a in ast.walk(statement)
                      if isinstance(a, ast.Assign) and len(a.targets) == 1 and isinstance(a.targets[0], ast.Name)
                      and isinstance(a.value, ast.Tuple)}
            stream = None
            for statement in node.body:
                for assign in ast.walk(statement):
                    if not isinstance(assign, ast.Assign):
                        continue
                    for call in ast.walk(assign.value):
                        if not isinstance(call, ast.Call):
                            continue
                        direct = isinstance(call.func, ast.Name) and call.func.id in loop_vars
                        wrapped = call.args and isinstance(call.args[0], ast.Name) and call.args[0].id in loop_vars
                        if direct or wrapped:  # block(...) or checkpoint(block, ...)
                            block = children[containers[0]][0]
                            found = _stream_variable(call, block, 0 if direct else 1,
                                                     set().union(*(_assigned(t) for t in assign.targets)), tuples)
                            stream = stream or found
            loops.append(_Loop(node.lineno, containers, stream))
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            func = node.value.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "self" \
                    and func.attr in singles:
                assigned = set().union(*(_assigned(t) for t in node.targets))
                loops.append(_Loop(node.lineno, [func.attr],
                                   _stream_variable(node.value, children[func.attr], 0, assigned)))
    return sorted(loops, key=lambda loop: loop.line)


def _flow_variables(owner: nn.Module, main: str) -> set[str]:
    """The variables the image flows through on its way to ``main`` (the largest container's stream): those
    computed from the forward's first argument (the image input) from which ``main`` is computed, by the
    forward's assignments (a joined ``combined = cat([text, hidden_states])`` for a single stack)."""
    tree = _forward_tree(owner)
    function = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if function is None or len(function.args.args) < 2:
        return {main}
    edges: list[tuple[set[str], set[str]]] = []  # (variables read, variables assigned)
    for node in ast.walk(function):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if len(targets) == 1 and isinstance(targets[0], ast.Name):  # a tuple unpacked from a call that
                edges.append(({n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)},  # reads several
                              {targets[0].id}))  # inputs does not say which output came from which

    def closure(start: set[str], forward: bool) -> set[str]:
        found, changed = set(start), True
        while changed:
            changed = False
            for read, assigned in edges:
                source, target = (read, assigned) if forward else (assigned, read)
                if source & found and not target <= found:
                    found |= target
                    changed = True
        return found

    image = function.args.args[1].arg
    return (closure({image}, True) & closure({main}, False)) | {main}


def _interleave(owner: nn.Module, names: list[str]) -> tuple[list[str], list[nn.Module]]:
    """Blocks of containers one loop runs together (zip): the i-th of each in turn."""
    children = dict(owner.named_children())
    paths, blocks = [], []
    if len(names) == 1 and not isinstance(children[names[0]], _CONTAINERS):
        return [names[0]], [children[names[0]]]
    for i in range(max(len(children[n]) for n in names)):
        for n in names:
            if i < len(children[n]):
                paths.append(f"{n}.{i}")
                blocks.append(children[n][i])
    return paths, blocks


def _stack_of(owner: nn.Module, container_names: Sequence[str] | None) -> tuple[list[str], list[nn.Module], str]:
    """The owner's blocks in flow order, and how they were found."""
    children = dict(owner.named_children())
    named = container_names is not None
    candidates = list(container_names) if named else _candidates(owner)
    if not candidates:
        return [], [], ""
    block_classes = {type(b) for n in candidates for b in children[n]}
    singles = [n for n, m in children.items() if n not in candidates and type(m) in block_classes
               and not _is_layer(m)]
    loops = _block_loops(owner, candidates, singles)
    main = max(candidates, key=lambda n: sum(p.numel() for p in children[n].parameters()))
    flow = next((loop.stream for loop in loops or [] if main in loop.containers), None)
    if loops is not None and flow is not None:
        variables = _flow_variables(owner, flow)
        chosen = [loop for loop in loops if loop.stream in variables
                  or (named and set(loop.containers) & set(candidates))]
        seen: set[str] = set()
        paths, blocks = [], []
        for loop in chosen:  # a container looped over twice (a gradient-checkpointing branch) counts once
            names = [n for n in loop.containers if n not in seen]
            if not names:
                continue
            seen.update(names)
            more_paths, more_blocks = _interleave(owner, names)
            paths += more_paths
            blocks += more_blocks
        left_out = [n for n in candidates if n not in seen]
        how = (f"the containers {type(owner).__name__}.forward runs on {flow!r} ({', '.join(dict.fromkeys(p.split('.')[0] for p in paths))})"
               + (f"; left out {', '.join(left_out)} (run on other variables)" if left_out else ""))
        if not named or not left_out:
            return paths, blocks, how
    paths, blocks = [], []  # the forward cannot be read: registration order, checked by the first trace
    for name, child in children.items():
        if name in candidates:
            paths += [f"{name}.{i}" for i in range(len(child))]
            blocks += list(child)
        elif name in singles:
            paths.append(name)
            blocks.append(child)
    return paths, blocks, "every block container in registration order (the forward's loops could not be read)"


def find_stack(model: nn.Module, blocks: str | Sequence[str] | None = None) -> BlockStack:
    """Locate the block stack. ``blocks`` names the container(s) (dotted paths from ``model``, sharing
    one parent); by default the owner is the module whose block containers hold the most parameters."""
    if blocks is not None:
        names = [blocks] if isinstance(blocks, str) else list(blocks)
        parents = {n.rpartition(".")[0] for n in names}
        if len(parents) != 1:
            raise RouteError(f"blocks={names} do not share one parent module; name containers of one module")
        owner_path = parents.pop()
        try:
            owner = model.get_submodule(owner_path)
            containers = [model.get_submodule(n) for n in names]
        except AttributeError as err:
            raise RouteError(f"blocks={names}: {err}; give dotted paths such as 'transformer_blocks'") from None
        for name, module in zip(names, containers):
            if not isinstance(module, _CONTAINERS):
                raise RouteError(f"blocks: {name} is a {type(module).__name__}, not a ModuleList or Sequential")
        paths, found, how = _stack_of(owner, [n.rpartition(".")[2] for n in names])
        how = f"named by blocks={names}"
    else:
        best = None
        for owner_path, owner in model.named_modules():
            if isinstance(owner, _CONTAINERS):
                continue
            candidates = _candidates(owner)
            size = sum(p.numel() for n in candidates for p in owner.get_submodule(n).parameters())
            if sum(len(owner.get_submodule(n)) for n in candidates) >= 2 and (best is None or size > best[0]):
                best = (size, owner_path, owner)
        if best is None:
            raise RouteError(
                f"no block stack found in {type(model).__name__}: no module holds a ModuleList or Sequential of "
                "two or more blocks; name it with blocks='path.to.blocks'"
            )
        _, owner_path, owner = best
        paths, found, how = _stack_of(owner, None)
    if len(found) == 0:
        raise RouteError(f"the named block containers of {type(model).__name__} are empty")
    specs = [spec_for(b) for b in found]
    return BlockStack(owner, owner_path, paths, found, specs, how)
