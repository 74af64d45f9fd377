"""Read a route's token layout from the traced graph: where the image tokens sit in the stream entering it,
and their grid.

The image tokens are those that come from the model's image input (the first argument of the owner's forward)
through the stream outputs of the blocks. Walking back from the stream along the values of the same length,
a concatenation on the token axis says where the other tokens (time, label, class, register, text) sit: the
one part that carries image tokens holds them. The patch embedding (a convolution whose output has as many
positions as there are image tokens) gives the grid. Where the graph does not say, the declared prefix
decides, and where nothing is declared the route is refused: never guessed.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..blocks import BlockSpec, bind_arguments
from ..layout import TokenLayout
from ..plan import Plan
from ..route import RouteError

_CONCATENATIONS = (torch.cat, torch.concat, torch.concatenate)
_CONVOLUTIONS = (F.conv2d, F.conv3d)
# operations that can place image tokens among others (joined per sample, written into a buffer, selected)
_JOINS = {torch.cat, torch.concat, torch.concatenate, torch.stack, torch.where, torch.index_copy,
          torch.nn.utils.rnn.pad_sequence, torch.Tensor.index_copy, torch.Tensor.index_put,
          torch.Tensor.masked_scatter, torch.Tensor.scatter}
_JOIN_METHODS = {"index_copy", "index_copy_", "index_put", "index_put_", "masked_scatter", "masked_scatter_",
                 "scatter", "scatter_", "where"}


class _Unreadable(Exception):
    """The graph does not say where the image tokens are; the message says why."""


def upstream(start: fx.Node, follow: Callable[[fx.Node], bool]) -> Iterator[fx.Node]:
    """``start`` and the nodes it is computed from, each once, going up only through inputs ``follow`` accepts."""
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        yield node
        todo.extend(n for n in node.all_input_nodes if follow(n))


def _length(node: Any) -> int | None:
    value = node.meta.get("concrete") if isinstance(node, fx.Node) else None
    return value.shape[1] if isinstance(value, torch.Tensor) and value.dim() >= 2 else None


def _value(module: fx.GraphModule, node: fx.Node) -> Any:
    """A node's traced value; for a constant the graph holds (a buffer made from shapes), the constant."""
    if node.op == "get_attr":
        target: Any = module
        for name in str(node.target).split("."):
            target = getattr(target, name, None)
        return target
    return node.meta.get("concrete")


def _token_slice(node: fx.Node) -> range | None:
    """For ``x[:, a:b]`` (a slice of a value's token axis, step 1): range(a, len(x)) clipped to b; else None."""
    if not (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)):
        return None
    index, source = node.args[1], node.args[0].meta.get("concrete")
    if not (isinstance(source, torch.Tensor) and source.dim() >= 2 and isinstance(index, tuple) and len(index) >= 2
            and index[0] == slice(None) and isinstance(index[1], slice) and index[1].step in (None, 1)
            and all(i in (slice(None), Ellipsis) for i in index[2:])):
        return None
    return range(source.shape[1])[index[1]]


class LayoutReader:
    """Reads layouts from one traced graph. ``blocks``: block node -> (module, spec with its stream output);
    ``image_inputs``: the graph's nodes for the image input's tensors."""

    def __init__(self, module: fx.GraphModule, blocks: dict[fx.Node, tuple[nn.Module, BlockSpec]],
                 image_inputs: set[fx.Node], describe: Any, packing: tuple[str, slice] | None = None):
        self.module, self.blocks, self.describe = module, blocks, describe
        self.image_inputs, self.packing = image_inputs, packing  # (model class, the input's own image tokens)
        self.carries = self._carries(module.graph, image_inputs)

    def _stream_argument(self, block_node: fx.Node) -> Any:
        block, spec = self.blocks[block_node]
        return bind_arguments(block, block_node.args, dict(block_node.kwargs)).get(spec.stream)

    def _block_stream(self, node: fx.Node) -> fx.Node | None | bool:
        """For a block's output (or an item of it): the block's stream argument if it is the stream output,
        False if it is another output (text), None if ``node`` is not a block output."""
        if node in self.blocks:
            return self._stream_argument(node) if self.blocks[node][1].stream_output is None else None
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in self.blocks \
                and self.blocks[node.args[0]][1].stream_output is not None:  # an item of a tuple output
            if self.blocks[node.args[0]][1].stream_output == node.args[1]:
                return self._stream_argument(node.args[0])
            return False
        return None

    def _carries(self, graph: fx.Graph, image_inputs: set[fx.Node]) -> dict[fx.Node, bool]:
        """Which values carry image tokens: the image input, the stream outputs of blocks fed one, and what is
        computed from them outside the blocks (a block's other outputs, text, do not)."""
        carries: dict[fx.Node, bool] = {}
        for node in graph.nodes:
            through = self._block_stream(node)
            if node in image_inputs:
                carries[node] = True
            elif through is False:
                carries[node] = False
            elif isinstance(through, fx.Node):
                carries[node] = carries.get(through, False)
            else:
                carries[node] = any(carries.get(n, False) for n in node.all_input_nodes)
        return carries

    def span(self, node: fx.Node) -> tuple[int, int, fx.Node, list[str]]:
        """(lead, image tokens, the node they start from, how) in ``node``'s tokens."""
        length = _length(node)
        how: list[str] = []
        while True:
            if node.op == "call_function" and node.target in _CONCATENATIONS:
                value = node.meta["concrete"]
                dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
                parts = node.args[0] if node.args else node.kwargs.get("tensors")
                if dim in (1, 1 - value.dim()) and isinstance(parts, (list, tuple)) and len(parts) > 1:
                    lengths = [_length(p) for p in parts]
                    image = [k for k, p in enumerate(parts) if isinstance(p, fx.Node) and self.carries.get(p)
                             and self._image_count(p) != 0]
                    if len(image) != 1 or None in lengths:
                        raise _Unreadable(f"{self.describe(node)} joins parts of {lengths} tokens on the token axis "
                                          f"and {len(image)} of them carry image tokens")
                    k = image[0]
                    lead, count, source, inner = self.span(parts[k])
                    how.append(f"{self.describe(node)} joins parts of {lengths} tokens, part {k} from the image input")
                    return sum(lengths[:k]) + lead, count, source, how + inner
            through = self._block_stream(node)
            if isinstance(through, fx.Node) and _length(through) == length:
                node = through
                continue
            taken = _token_slice(node)
            if taken is not None:  # x[:, a:b] of a value whose layout is read: the image tokens inside [a, b)
                lead, count, source, inner = self.span(node.args[0])
                start, stop = max(lead, taken.start), min(lead + count, taken.start + length)
                how.append(f"{self.describe(node)} takes tokens {taken.start}..{taken.start + length - 1}")
                return max(start - taken.start, 0), max(stop - start, 0), source, how + inner
            self._refuse_merged(node, length)
            same = [n for n in node.all_input_nodes if self.carries.get(n) and _length(n) == length]
            if not same:
                self._refuse_mixed(node)
                packed = self._packed(length)
                if packed is not None:
                    return packed.start, packed.stop - packed.start, node, how + [
                        f"{self.packing[0]} packs other tokens into its image input (registered): tokens "
                        f"{packed.start}..{packed.stop - 1} are the image's"]
                return 0, length, node, how
            if len(same) == 1:
                node = same[0]
                continue
            spans = {self.span(n)[:2] for n in same}
            if len(spans) == 1:
                lead, count, source, inner = self.span(same[0])
                return lead, count, source, how + inner
            raise _Unreadable(f"{self.describe(node)} combines values with different layouts {sorted(spans)}")

    def _packed(self, length: int) -> range | None:
        """The registered packing of the image input, where the stream holds the input's tokens one for one."""
        if self.packing is None:
            return None
        lengths = {_length(n) for n in self.image_inputs}
        if lengths != {length}:
            return None
        return range(length)[self.packing[1]]

    def _image_count(self, node: fx.Node) -> int | None:
        """How many image tokens ``node`` holds, where its layout can be read; None where it cannot."""
        try:
            return self.span(node)[1]
        except _Unreadable:
            return None

    def _refuse_merged(self, node: fx.Node, length: int) -> None:
        """Another input's tokens added into the image tokens' positions (text rows of a packed sequence added
        under a mask): a sum with a per-sample, per-token tensor of the stream's length that carries no image
        tokens. Positional tables shared by the batch ((1, L, D)) and per-token scalars ((B, L, 1)) are fine."""
        if not (node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)):
            return
        values = [_value(self.module, n) for n in node.all_input_nodes]
        batch = next((v.shape[0] for n, v in zip(node.all_input_nodes, values)
                      if self.carries.get(n) and isinstance(v, torch.Tensor)), None)
        for n, v in zip(node.all_input_nodes, values):
            if not self.carries.get(n) and isinstance(v, torch.Tensor) and v.dim() >= 3 and v.shape[0] == batch \
                    and batch not in (None, 1) and v.shape[1] == length and v.shape[-1] > 1:
                raise _Unreadable(f"{self.describe(node)} adds {self.describe(n)}, per-token values of {length} "
                                  "positions that do not come from the image input, into the stream: another "
                                  "input's tokens may share its positions")

    def _refuse_mixed(self, source: fx.Node) -> None:
        """The stream's tokens all come from ``source``; they are all image tokens only if nothing on the way
        from the image input joined other tokens in: a join of image tokens with others (per sample, then
        padded into a batch; written into a buffer; selected by a mask) cannot be read. A single token
        broadcast into positions (a learned pad token) replaces values, not positions, and passes."""
        for node in upstream(source, lambda n: bool(self.carries.get(n))):
            joins = (node.op == "call_function" and node.target in _JOINS) or \
                (node.op == "call_method" and node.target in _JOIN_METHODS)
            inputs = [n for n in node.all_input_nodes if isinstance(_value(self.module, n), torch.Tensor)]
            if joins and any(not self.carries.get(n) and _value(self.module, n).dim() >= 2
                             and _value(self.module, n).shape[-2] > 1 for n in inputs) \
                    and any(self.carries.get(n) for n in inputs):
                raise _Unreadable(f"{self.describe(node)} ({node.target if isinstance(node.target, str) else node.target.__name__}) "
                                  "places the image tokens among other tokens in a way the graph does not lay out")

    def grid(self, source: fx.Node, count: int) -> tuple[tuple[int, ...], str] | None:
        """The grid of ``count`` image tokens made at ``source``: a convolution upstream (the patch embedding)
        whose output has ``count`` positions."""
        for node in upstream(source, lambda n: bool(self.carries.get(n))):
            conv = (node.op == "call_module" and isinstance(self.module.get_submodule(node.target), (nn.Conv2d, nn.Conv3d))) \
                or (node.op == "call_function" and node.target in _CONVOLUTIONS)
            value = node.meta.get("concrete")
            if conv and isinstance(value, torch.Tensor) and math.prod(value.shape[2:]) == count:
                return tuple(value.shape[2:]), f"the patch embedding {self.describe(node)}"
            inner = self._inner_patch_grid(node, count)
            if inner is not None:
                return inner, f"the patch embedding {self.describe(node)} (its convolution's stride)"
        return None

    def _inner_patch_grid(self, node: fx.Node, count: int) -> tuple[int, ...] | None:
        """The grid made by a patch-embedding module called as a whole (timm's PatchEmbed: a strided
        convolution inside, then flatten): its input's spatial size over the convolution's stride."""
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        convs = [m for m in self.module.get_submodule(node.target).modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
        image = node.args[0].meta.get("concrete")
        if len(convs) != 1 or not isinstance(image, torch.Tensor) or image.dim() != convs[0].weight.dim():
            return None
        grid = tuple(size // stride for size, stride in zip(image.shape[2:], convs[0].stride))
        return grid if math.prod(grid) == count else None

    def layout(self, stream: fx.Node, plan: Plan, entering: str) -> TokenLayout:
        """The layout of the stream ``entering`` ('route 0 (tread)', 'block 3 (local attention)'): read from
        the graph, checked against a declared prefix; the declared prefix where the graph does not say; refused
        where neither does."""
        length = _length(stream)
        try:
            lead, count, source, how = self.span(stream)
        except _Unreadable as why:
            if plan.prefix_declared:
                return TokenLayout.declared(length, plan.prefix_tokens, True)
            raise RouteError(
                f"the stream entering {entering} has {length} tokens, and which "
                f"of them are image tokens cannot be read from the graph: {why}. Declare the tokens that must never "
                "be routed: prefix_tokens=K for K leading ones (time, label, class or text tokens), or "
                "prefix_tokens=0 if every token may be routed") from None
        if plan.prefix_declared and (lead, count) != (plan.prefix_tokens, length - plan.prefix_tokens):
            raise RouteError(
                f"prefix_tokens={plan.prefix_tokens} is declared, but the graph shows the stream entering "
                f"{entering} with its {count} image tokens after {lead} others and before {length - lead - count} "
                f"more ({'; '.join(how)}). Drop the declaration (tokenroute reads the layout) or correct it")
        grid = self.grid(source, count)
        sources = {"image tokens": "; ".join(how) if how else f"all {length} tokens come from the image input"}
        if grid is not None:
            sources["grid"] = grid[1]
        return TokenLayout(length, lead, count, grid[0] if grid else None, sources)
