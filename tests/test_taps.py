"""Taps: a method reads, while a block runs, where its stream's tokens sit (the layout read from the graph and,
inside a route, the kept positions). Checked from outside: hooks on the blocks see the rows the positions name."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenroute
from tokenroute.core import Patch, RouteError, Tap, apply_patch, remove_patch
from tokenroute.core.splice.tracer import tracing

from helpers import backbone_inputs, make_backbone

MODELS = {name: make_backbone(name, depth=6) for name in ("dit", "uvit")}


class Reader(Patch):
    """A method that taps blocks and records what ``tokens_at`` says as each of them starts."""

    name = "reader"

    def __init__(self, blocks: list[int]):
        super().__init__()
        self.taps = [Tap(b, self.name) for b in blocks]
        self.seen: dict[int, list] = {b: [] for b in blocks}
        self.handles = []

    def attach(self, stack):
        registry = self.registry
        for tap in self.taps:
            def record(module, args, b=tap.block):
                if tracing():  # the trace runs the blocks on fake values first
                    return
                self.seen[b].append((registry.splice.boundaries.tokens_at(b), args[0]))
            self.handles.append(stack.blocks[tap.block].register_forward_pre_hook(record))

    def detach(self, stack):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def tapped(name: str, blocks: list[int], routes=None):
    model = copy.deepcopy(MODELS[name])
    if routes:
        tokenroute.wrap(model, routes=routes)
    reader = Reader(blocks)
    apply_patch(model, reader)
    return model, reader


@pytest.mark.parametrize("name, lead", [("dit", 0), ("uvit", None)])
def test_a_tapped_block_knows_its_layout_in_eval(name, lead):
    """Eval forwards: every token is there, the layout comes from the graph (U-ViT's time and label tokens lead)."""
    model, reader = tapped(name, [1, 4])
    x, t, y = backbone_inputs(2)
    model.eval()(x, t, y)
    for b, ((tokens, stream),) in reader.seen.items():
        assert tokens.index is None
        assert tokens.layout.length == stream.shape[1]
        assert tokens.layout.grid is not None and tokens.layout.image == tokens.layout.grid[0] * tokens.layout.grid[1]
        if lead is not None:
            assert tokens.layout.lead == lead
        index = tokens.grid_index()
        assert index.shape == (1, stream.shape[1])
        assert (index[0, tokens.layout.image_slice] == torch.arange(tokens.layout.image)).all()
        assert (index[0, : tokens.layout.lead] == -1).all()
    remove_patch(model, "reader")
    assert not reader.handles


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), ratio=st.sampled_from([0.25, 0.5, 0.75]), name=st.sampled_from(["dit", "uvit"]))
def test_inside_a_route_the_positions_name_the_rows_the_block_sees(seed, ratio, name):
    """Training with a TREAD route over blocks 2..4: the positions index the full stream that left block 1
    (hooked from outside) row for row; image tokens map to their grid places, the others to -1."""
    model, reader = tapped(name, [2, 3], routes=[(2, 4, ratio)])
    full = []
    model.get_submodule(tokenroute.core.find_stack(model).paths[1]).register_forward_hook(
        lambda m, a, out: full.append(out))
    x, t, y = backbone_inputs(2, seed=seed)
    model.train()(x, t, y)
    ((tokens, stream),) = reader.seen[3]
    assert tokens.index is not None and tokens.index.shape == stream.shape[:2]
    ((first, entering),) = reader.seen[2]
    assert torch.equal(first.index, tokens.index)
    rows = tokens.index[..., None].expand(-1, -1, entering.shape[-1])
    assert torch.equal(entering, full[-1].gather(1, rows))  # the route's first block sees the rows they name
    index = tokens.grid_index()
    lead = tokens.layout.lead
    expected = torch.where((tokens.index >= lead) & (tokens.index < lead + tokens.layout.image), tokens.index - lead, -1)
    assert torch.equal(index, expected)
    kept_image = (index >= 0).sum(1)
    assert (kept_image == round(tokens.layout.image * (1 - ratio))).all()


def test_joint_sequences_and_unknown_sides():
    """Joint attention adds text on the side the layout names; an unknown side is refused."""
    from tokenroute.core import StreamTokens, TokenLayout

    layout = TokenLayout(6, 1, 4, (2, 2))
    tokens = StreamTokens(layout)
    with pytest.raises(RouteError, match="on which side"):
        tokens.grid_index(9)
    first = StreamTokens(TokenLayout(6, 1, 4, (2, 2), joint="text_first")).grid_index(9)
    last = StreamTokens(TokenLayout(6, 1, 4, (2, 2), joint="text_last")).grid_index(9)
    assert first.tolist() == [[-1, -1, -1, -1, 0, 1, 2, 3, -1]]
    assert last.tolist() == [[-1, 0, 1, 2, 3, -1, -1, -1, -1]]


@settings(max_examples=40, deadline=None)
@given(lead=st.integers(0, 3), image=st.integers(1, 6), trail=st.integers(0, 3), others=st.integers(0, 4),
       joint=st.sampled_from(["text_first", "text_last"]))
def test_the_image_span_read_from_the_layout_is_where_the_grid_index_puts_the_image(lead, image, trail, others,
                                                                                     joint):
    """In an attention sequence of the stream and ``others`` joint tokens on the ``joint`` side, the tokens before
    and after the image tokens, read from the layout alone, are those the grid index marks."""
    from tokenroute.core import StreamTokens, TokenLayout

    tokens = StreamTokens(TokenLayout(lead + image + trail, lead, image, (1, image), {}, joint))
    size = lead + image + trail + others
    index = tokens.grid_index(size)[0]
    before = int((index >= 0).nonzero()[0])
    assert tokens.image_span(size) == (before, size - before - image)
    assert torch.equal(index[before: before + image], torch.arange(image))
