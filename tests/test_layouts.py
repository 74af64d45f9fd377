"""Token layouts the core must read right or refuse: blocks returning (image, text) tuples without a registry
entry, and streams whose length changes inside a route. Checked from outside, against the unwrapped model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, strategies as st

import tokenroute
from tokenroute import RouteError

from helpers import randomize, traced_examples


class PairBlock(nn.Module):
    """Returns (hidden_states, encoder_hidden_states), or the reverse, with no registry entry (as CogVideoX)."""

    def __init__(self, dim: int = 8, text_first: bool = False):
        super().__init__()
        self.image, self.text, self.text_first = nn.Linear(dim, dim), nn.Linear(dim, dim), text_first

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor):
        mixed = hidden_states + torch.tanh(self.image(hidden_states)) * encoder_hidden_states.mean(1, keepdim=True)
        text = encoder_hidden_states + torch.tanh(self.text(encoder_hidden_states))
        return (text, mixed) if self.text_first else (mixed, text)


class PairModel(nn.Module):
    def __init__(self, depth: int = 5, text_first: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList([PairBlock(text_first=text_first) for _ in range(depth)])
        self.text_first = text_first

    def forward(self, x: torch.Tensor, text: torch.Tensor):
        for block in self.blocks:
            out = block(x, text)
            text, x = out if self.text_first else out[::-1]
        return x, text


@pytest.mark.parametrize("text_first", [False, True])
@traced_examples
@given(text_len=st.sampled_from([3, 8, 12]), ratio=st.sampled_from([0.25, 0.5]), seed=st.integers(0, 2**16))
def test_an_unregistered_block_returning_a_pair_routes_only_the_stream(text_first, text_len, ratio, seed):
    """The text tensor, even when as long as the kept tokens, is never scattered into the image stream: the
    text output equals the unwrapped model's, and the skipped image tokens leave the route unchanged."""
    model = randomize(PairModel(text_first=text_first), seed=1)
    plain = copy.deepcopy(model)
    x, text = torch.randn(2, 16, 8), torch.randn(2, text_len, 8)
    tokenroute.wrap(model, [(1, 3, ratio)], seed=seed)
    seen = {}
    model.blocks[0].register_forward_hook(lambda m, a, out: seen.__setitem__("start", out[1] if text_first else out[0]))
    model.blocks[4].register_forward_pre_hook(lambda m, a: seen.__setitem__("after", a[0]))
    out, text_out = model.train()(x, text)
    torch.testing.assert_close(text_out, plain(x, text)[1], rtol=0, atol=0)
    (mask,) = tokenroute.routing_masks(model)
    assert torch.equal(seen["after"][mask], seen["start"][mask])


def test_a_pair_whose_items_cannot_be_told_apart_is_refused():
    model = randomize(PairModel())
    tokenroute.wrap(model, [(1, 3, 0.5)], seed=0)
    with pytest.raises(RouteError, match=r"PairBlock returns a tuple .* cannot tell which one carries the stream"):
        model.train()(torch.randn(2, 16, 8), torch.randn(2, 16, 8))  # text as long as the image


def test_the_hook_splice_handles_pairs_and_refuses_what_it_cannot_tell():
    model = randomize(PairModel())
    reference = copy.deepcopy(model)
    x = torch.randn(2, 16, 8)
    tokenroute.wrap(model, [(1, 3, 0.5)], seed=0, mechanism="hooks")
    tokenroute.wrap(reference, [(1, 3, 0.5)], seed=0, mechanism="fx")
    text = torch.randn(2, 5, 8)
    torch.testing.assert_close(model.train()(x, text), reference.train()(x, text), rtol=0, atol=1e-6)
    with pytest.raises(RouteError, match="register it"):  # inside the route the stream has 8 tokens, as the text
        model(x, torch.randn(2, 8, 8))


class JoinModel(nn.Module):
    """Text joins the stream after block 1 ([text, image] from block 2 on), as between Flux's two stacks."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(4)])

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        for k, block in enumerate(self.blocks):
            x = torch.cat([text, x], 1) if k == 2 else x
            x = block(x)
        return x


@pytest.mark.parametrize("mechanism", ["fx", "hooks"])
def test_a_stream_whose_length_changes_inside_a_route_is_refused(mechanism):
    model = tokenroute.wrap(randomize(JoinModel()), [(1, 2, 0.5)], seed=0, mechanism=mechanism)
    with pytest.raises(RouteError, match="length changed inside the route"):
        model.train()(torch.randn(2, 16, 8), torch.randn(2, 4, 8))
    tokenroute.unwrap(model)
    tokenroute.wrap(model, [(2, 3, 0.5)], seed=0, mechanism=mechanism, prefix_tokens=4)  # after the join
    assert model.train()(torch.randn(2, 16, 8), torch.randn(2, 4, 8)).shape == (2, 20, 8)
    assert tokenroute.routing_masks(model)[0].shape == (2, 16)  # the 4 text tokens lead and are never routed


class JoinedModel(nn.Module):
    """Non-image tokens joined into the stream in the forward, as research code writes it: U-ViT's time and
    label tokens before the patch tokens (``extras``), or text before or after the image (single-stream blocks)."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where
        self.patch = nn.Conv2d(2, 8, 2, stride=2)
        self.time, self.label = nn.Linear(1, 8), nn.Embedding(10, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)) for _ in range(4)])

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        extras = torch.stack([self.time(t[:, None]), self.label(y)], 1)
        if self.where == "extras":
            x = torch.cat([extras, x], dim=1)
        elif self.where == "text_first":
            x = torch.cat([text, x], dim=1)
        else:
            x = torch.cat((x, text), dim=-2)
        for block in self.blocks:
            x = x + block(x)
        return x


@pytest.mark.parametrize("where, lead, trail", [("extras", 2, 0), ("text_first", 3, 0), ("text_last", 0, 3)])
@traced_examples
@given(seed=st.integers(0, 2**16), ratio=st.sampled_from([0.25, 0.5, 0.75]))
def test_tokens_joined_in_the_forward_are_read_from_the_graph_and_never_routed(where, lead, trail, seed, ratio):
    """The image tokens' place among the joined ones and their grid are read from the graph; the others reach
    the route's blocks untouched, checked with a hook on the first routed block."""
    model = randomize(JoinedModel(where), seed=1)
    inputs = (torch.randn(2, 2, 8, 8), torch.rand(2), torch.tensor([1, 2]), torch.randn(2, 3, 8))
    full = {}
    handle = model.blocks[1].register_forward_pre_hook(lambda m, a: full.__setitem__("x", a[0]))
    model(*inputs)
    handle.remove()
    tokenroute.wrap(model, [(1, 2, ratio)], seed=seed)
    seen = {}
    model.blocks[1].register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    model.train()(*inputs)
    (mask,) = tokenroute.routing_masks(model)
    assert mask.shape == (2, 16)  # the 4 x 4 image tokens only
    kept = torch.cat([full["x"][:, :lead], full["x"][:, lead:lead + 16][~mask].view(2, -1, 8),
                      full["x"][:, lead + 16:]], 1)
    assert torch.equal(seen["x"], kept)
    assert "grid 4x4 (" in tokenroute.explain(model) and "the patch embedding patch output" in tokenroute.explain(model)


def test_a_declared_prefix_that_the_graph_contradicts_is_refused():
    model = tokenroute.wrap(randomize(JoinedModel("extras")), [(1, 2, 0.5)], seed=0, prefix_tokens=1)
    with pytest.raises(RouteError, match=r"prefix_tokens=1 is declared, but .* 16 image tokens after 2 others"):
        model.train()(torch.randn(2, 2, 8, 8), torch.rand(2), torch.tensor([1, 2]), torch.randn(2, 3, 8))


class TwoViewModel(nn.Module):
    """Two views of the image joined on the token axis: both parts carry image tokens."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x, x.flip(1)], 1)
        for block in self.blocks:
            x = block(x)
        return x


def test_a_join_whose_image_part_cannot_be_told_is_refused_unless_declared():
    model = tokenroute.wrap(randomize(TwoViewModel()), [(1, 1, 0.5)], seed=0)
    with pytest.raises(RouteError, match=r"cannot be read from the graph: .* joins parts of \[16, 16\] tokens on "
                                         r"the token axis and 2 of them carry image tokens"):
        model.train()(torch.randn(2, 16, 8))
    tokenroute.unwrap(model)
    tokenroute.wrap(model, [(1, 1, 0.5)], seed=0, prefix_tokens=0)  # declared: every token may be routed
    model.train()(torch.randn(2, 16, 8))
    assert tokenroute.routing_masks(model)[0].shape == (2, 32)


class MaskedBlock(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unsqueeze(1).chunk(3, dim=-1)  # one head
        mask = attention_mask if attention_mask.dim() == 4 else attention_mask.unsqueeze(1)
        return x + F.scaled_dot_product_attention(q, k, v, attn_mask=mask).squeeze(1)


class MaskedModel(nn.Module):
    """Blocks take an attention mask in one of the layouts diffusers' models use."""

    def __init__(self, layout: str):
        super().__init__()
        self.blocks = nn.ModuleList([MaskedBlock() for _ in range(4)])
        self.layout = layout

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        mask = LAYOUTS[self.layout](valid)
        for block in self.blocks:
            x = block(x, attention_mask=mask)
        return x


LAYOUTS = {  # from a (B, L) bool of valid keys
    "key (B, 1, 1, L) bool": lambda v: v[:, None, None, :],
    "square (B, L, L) bool": lambda v: v[:, None, :] & v[:, :, None] | torch.eye(v.shape[1], dtype=torch.bool),
    "additive (B, 1, L, L)": lambda v: torch.where(v[:, None, None, :] & v[:, None, :, None], 0.0, -1e4),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mechanism", ["fx", "hooks"])
def test_attention_masks_are_reduced_on_their_query_and_key_axes(layout, mechanism):
    model = tokenroute.wrap(randomize(MaskedModel(layout)), [(1, 2, 0.5)], seed=0, mechanism=mechanism)
    x, valid = torch.randn(2, 16, 8), torch.rand(2, 16) > 0.2
    seen = {}
    model.blocks[1].register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    model.train()(x, valid)
    (mask,) = tokenroute.routing_masks(model)
    keep = (~mask).nonzero()[:, 1].view(2, -1)
    assert torch.equal(seen["attention_mask"], LAYOUTS[layout](torch.take_along_dim(valid, keep, 1)))


def test_a_float_square_tensor_entering_a_route_is_refused():
    class Ambiguous(MaskedModel):
        def forward(self, x, valid):
            mask = torch.where(valid[:, None, :] & valid[:, :, None], 0.0, -1e4)  # (B, L, L) float
            for block in self.blocks:
                x = block(x, attention_mask=mask)
            return x

    model = tokenroute.wrap(randomize(Ambiguous("key (B, 1, 1, L) bool")), [(1, 2, 0.5)], seed=0)
    with pytest.raises(RouteError, match="square attention mask or hidden states"):
        model.train()(torch.randn(2, 16, 8), torch.rand(2, 16) > 0.2)


TABLES = {  # layout -> (make a table for B samples of L tokens, view it as (B or 1, L, D) inside a block)
    "(N, D) batch-free": (lambda b, n, d: torch.randn(n, d), lambda t: t[None]),
    "(1, N, 1, D) as Wan": (lambda b, n, d: torch.randn(1, n, 1, d), lambda t: t[:, :, 0]),
    "(B, N, D) as LTX": (lambda b, n, d: torch.randn(b, n, d), lambda t: t),
    "(B, 1, N, D)": (lambda b, n, d: torch.randn(b, 1, n, d), lambda t: t[:, 0]),
}


class TableBlock(nn.Module):
    def __init__(self, view, dim: int = 8):
        super().__init__()
        self.lin, self.view = nn.Linear(dim, dim), view

    def forward(self, x: torch.Tensor, rotary_emb) -> torch.Tensor:
        image = rotary_emb[0] if isinstance(rotary_emb, tuple) else rotary_emb  # (image, text) as QwenImage
        return x + self.lin(x) * self.view(image)


class TableModel(nn.Module):
    def __init__(self, view):
        super().__init__()
        self.blocks = nn.ModuleList([TableBlock(view) for _ in range(4)])

    def forward(self, x: torch.Tensor, table) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, table)
        return x


@pytest.mark.parametrize("layout", TABLES)
@pytest.mark.parametrize("with_text", [False, True])
def test_rotary_tables_in_every_layout_follow_the_kept_tokens(layout, with_text):
    make, view = TABLES[layout]
    model = tokenroute.wrap(randomize(TableModel(view)), [(1, 2, 0.5)], seed=0)
    table = make(3, 16, 8)
    text_table = torch.randn(5, 8)
    seen = {}
    model.blocks[1].register_forward_pre_hook(lambda m, a: seen.__setitem__("table", a[1]))
    model.train()(torch.randn(3, 16, 8), (table, text_table) if with_text else table)
    (mask,) = tokenroute.routing_masks(model)
    keep = (~mask).nonzero()[:, 1].view(3, -1)
    got = seen["table"]
    if with_text:
        got, text_got = got
        assert torch.equal(text_got, text_table)  # the text table is not the image's: it passes
    expected = torch.take_along_dim(view(table).expand(3, -1, -1), keep[..., None], 1)
    assert torch.equal(view(got).expand(3, -1, -1), expected)
    if layout.endswith("batch-free"):
        assert torch.equal(mask[0], mask[1])  # one selection for the batch: the table has no batch axis


def test_a_table_group_whose_image_table_cannot_be_told_is_refused():
    class Rope(nn.Module):
        """Returns (image table, text table) from one call, as QwenImage's positional embedding does."""

        def forward(self, x: torch.Tensor, text_len: torch.Tensor):
            return torch.ones(x.shape[1], x.shape[2]), torch.ones(text_len.shape[0], x.shape[2])

    class GroupModel(TableModel):
        def __init__(self):
            super().__init__(lambda t: t[None])
            self.rope = Rope()

        def forward(self, x, text_len):
            return super().forward(x, self.rope(x, text_len))

    model = tokenroute.wrap(randomize(GroupModel()), [(1, 2, 0.5)], seed=0)
    assert model.train()(torch.randn(3, 16, 8), torch.zeros(5)).shape == (3, 16, 8)  # 5 text rows: told apart
    with pytest.raises(RouteError, match="cannot tell which follows the routed tokens"):
        model.train()(torch.randn(3, 16, 8), torch.zeros(20))  # 20 text rows could be a table of 16 + 4


class GridBlock(nn.Module):
    """Reshapes its tokens to the image grid (as Sana's conv MLP or Latte's temporal blocks do)."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        grid = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)
        return x + self.conv(grid).flatten(2).transpose(1, 2)


class GridModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([GridBlock() for _ in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, 4, 4)
        return x


@pytest.mark.parametrize("mechanism", ["fx", "hooks"])
def test_a_block_that_needs_the_whole_grid_inside_a_route_gets_an_error_that_says_why(mechanism):
    model = tokenroute.wrap(randomize(GridModel()), [(1, 2, 0.5)], seed=0, mechanism=mechanism)
    x = torch.randn(2, 16, 8)
    with pytest.raises(RouteError, match=r"while route 0 \(tread, blocks.1 .. blocks.2\) ran on 8 of 16 tokens"):
        model.train()(x)
    model.eval()(x)  # nothing routed, nothing raised
    with tokenroute.routing(model, ratio=0.0):
        model.train()(x)


@pytest.mark.parametrize("mechanism", ["fx", "hooks"])
def test_separate_image_and_text_tables_given_together_are_checked_as_a_group(mechanism):
    make, view = TABLES["(N, D) batch-free"]
    model = tokenroute.wrap(randomize(TableModel(view)), [(1, 2, 0.5)], seed=0, mechanism=mechanism)
    x = torch.randn(3, 16, 8)
    model.train()(x, (make(3, 16, 8), torch.randn(5, 8)))  # 5 text rows: told apart
    with pytest.raises(RouteError, match="cannot tell which follows the routed tokens"):
        model(x, (make(3, 16, 8), torch.randn(20, 8)))


class SequenceFirstModel(nn.Module):
    """Blocks on an (L, B, D) stream, as torch's own TransformerEncoderLayer without batch_first."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0) for _ in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(0, 1)
        for block in self.blocks:
            x = block(x)
        return x.transpose(0, 1)


def test_a_sequence_first_stream_is_refused():
    model = tokenroute.wrap(randomize(SequenceFirstModel()), [(1, 2, 0.5)], seed=0, mechanism="fx")
    with pytest.raises(RouteError, match=r"its tokens lie on axis 0 \(sequence first\)"):
        model.train()(torch.randn(3, 16, 8))


class JointMaskBlock(nn.Module):
    """Attention over [image, text] inside the block; its key mask spans both (as HunyuanVideo's)."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.q, self.mlp = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, hidden_states, encoder_hidden_states, attention_mask, temb):
        joint = torch.cat([hidden_states, encoder_hidden_states], 1)
        scores = self.q(hidden_states) @ joint.transpose(1, 2)
        scores = scores.masked_fill(~attention_mask[:, 0], -1e4)
        out = hidden_states + scores.softmax(-1) @ joint
        shift = temb if temb.dim() == 3 else temb[:, None]
        return out + torch.tanh(self.mlp(out)) * shift


class JointMaskModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.refiner = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(2)])
        self.blocks = nn.ModuleList([JointMaskBlock() for _ in range(4)])

    def forward(self, x, text, mask, temb):
        for layer in self.refiner:  # runs on the text: not part of the stack
            text = layer(text)
        for block in self.blocks:
            x = block(x, text, mask, temb)
        return x


@pytest.mark.parametrize("per_token", [False, True])
@traced_examples
@given(seed=st.integers(0, 2**16))
def test_a_joint_mask_and_a_per_token_modulation_follow_the_kept_tokens(per_token, seed):
    """Registered as joining text last, the block's (B, 1, 1, L + T) mask is reduced at the kept image
    positions and keeps every text column; a per-token modulation (B, L, D) is gathered, a global one passed."""
    tokenroute.register_block(JointMaskBlock, tokenroute.BlockSpec(
        "hidden_states", context_args=("encoder_hidden_states",), joint="text_last", modulation_args=("temb",)))
    model = randomize(JointMaskModel(), seed=1)
    x, text = torch.randn(2, 16, 8), torch.randn(2, 5, 8)
    mask = torch.rand(2, 1, 1, 21) > 0.3
    temb = torch.randn(2, 16, 8) if per_token else torch.randn(2, 8)
    assert tokenroute.core.find_stack(model).containers == ["blocks"]  # the text refiner is left out
    tokenroute.wrap(model, [(1, 2, 0.5)], seed=seed)
    seen = {}
    model.blocks[1].register_forward_pre_hook(lambda m, a: seen.update(mask=a[2], temb=a[3]))
    model.train()(x, text, mask, temb)
    keep = (~tokenroute.routing_masks(model)[0]).nonzero()[:, 1].view(2, -1)
    columns = torch.cat([keep, torch.arange(16, 21).expand(2, -1)], 1)
    assert torch.equal(seen["mask"], torch.stack([mask[b, :, :, columns[b]] for b in range(2)]))
    expected = torch.stack([temb[b, keep[b]] for b in range(2)]) if per_token else temb
    assert torch.equal(seen["temb"], expected)
    assert "joint attention text last" in tokenroute.explain(model)


class RowTableBlock(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.mlp = nn.Linear(dim, dim)

    def forward(self, x, positions):  # positions: (L, D), one row per token, no batch axis, not named as a table
        return x + torch.tanh(self.mlp(x + positions))


class RowTableModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([RowTableBlock() for _ in range(3)])

    def forward(self, x, positions):
        for block in self.blocks:
            x = block(x, positions)
        return x


def test_a_batch_free_row_table_follows_one_selection_for_the_batch():
    model = randomize(RowTableModel())
    positions = torch.randn(16, 8)
    tokenroute.wrap(model, [(1, 1, 0.5)], seed=0)
    seen = {}
    model.blocks[1].register_forward_pre_hook(lambda m, a: seen.__setitem__("rows", a[1]))
    model.train()(torch.randn(3, 16, 8), positions)
    (mask,) = tokenroute.routing_masks(model)
    assert torch.equal(mask, mask[:1].expand_as(mask))  # one draw for the whole batch
    assert torch.equal(seen["rows"], positions[~mask[0]])


class MergedModel(nn.Module):
    """Text rows of a packed sequence added into the image input's positions (as Ideogram's), or image tokens
    written into a buffer at given positions."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.embed = nn.Linear(8, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])

    def forward(self, x, text):
        x = self.embed(x)
        if self.how == "added":
            x = x + text
        else:
            x = torch.zeros(x.shape[0], x.shape[1] + text.shape[1], 8).index_copy(1, torch.arange(x.shape[1]), x)
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("how, why", [("added", "adds input text, per-token values"),
                                      ("written", r"index_copy\) places the image tokens among other tokens")])
def test_other_tokens_merged_into_the_stream_are_refused(how, why):
    model = tokenroute.wrap(randomize(MergedModel(how)), [(1, 1, 0.5)], seed=0)
    with pytest.raises(RouteError, match=why):
        model.train()(torch.randn(2, 16, 8), torch.randn(2, 16 if how == "added" else 4, 8))


class PackedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])

    def forward(self, x):  # (L, D): one packed sequence, no batch axis
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("mechanism", ["fx", "hooks"])
def test_a_stream_without_a_batch_axis_is_refused(mechanism):
    model = tokenroute.wrap(randomize(PackedModel()), [(1, 1, 0.5)], seed=0, mechanism=mechanism)
    with pytest.raises(RouteError, match="no batch axis"):
        model.train()(torch.randn(16, 8))


class RejoinModel(nn.Module):
    """Text split off the stream and joined again around every block (as Bria-Fibo's single stack)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)) for _ in range(4)])
        self.text_proj = nn.Linear(8, 8)

    def forward(self, x, text):
        x = torch.cat([text, x], 1)
        for block in self.blocks:
            x = x + block(x)
            x = torch.cat([self.text_proj(x[:, :3]), x[:, 3:]], 1)
        return x


def test_tokens_sliced_off_and_joined_again_keep_their_layout():
    model = randomize(RejoinModel())
    x, text = torch.randn(2, 16, 8), torch.randn(2, 3, 8)
    full = {}
    handle = model.blocks[2].register_forward_pre_hook(lambda m, a: full.__setitem__("x", a[0]))
    model(x, text)
    handle.remove()
    tokenroute.wrap(model, [(2, 2, 0.5)], seed=0)
    seen = {}
    model.blocks[2].register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    model.train()(x, text)
    (mask,) = tokenroute.routing_masks(model)
    assert mask.shape == (2, 16)
    assert torch.equal(seen["x"][:, :3], full["x"][:, :3])  # the text tokens, untouched
    assert "takes tokens 3..18" in tokenroute.explain(model)


class PackedInputModel(nn.Module):
    """Receives a reference image's tokens packed after the target's in its image input (as JoyImage Edit Plus)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)) for _ in range(3)])

    def forward(self, packed: torch.Tensor, target_tokens: int) -> torch.Tensor:
        x = self.embed(packed)
        for block in self.blocks:
            x = x + block(x)
        return x[:, :target_tokens]


def test_a_registered_input_packing_keeps_the_packed_reference_tokens_out_of_routes():
    tokenroute.register_input_packing(PackedInputModel, lambda arguments: slice(0, arguments["target_tokens"]))
    model = randomize(PackedInputModel())
    packed = torch.randn(2, 20, 4)  # 16 target tokens, then 4 reference tokens
    full = {}
    handle = model.blocks[1].register_forward_pre_hook(lambda m, a: full.__setitem__("x", a[0]))
    model(packed, 16)
    handle.remove()
    tokenroute.wrap(model, [(1, 1, 0.5)], seed=0)
    seen = {}
    model.blocks[1].register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    model.train()(packed, 16)
    assert tokenroute.routing_masks(model)[0].shape == (2, 16)
    assert torch.equal(seen["x"][:, -4:], full["x"][:, -4:])  # the reference tokens, untouched
    assert "packs other tokens into its image input (registered)" in tokenroute.explain(model)


class OutOfMemoryBlock(nn.Module):
    """Runs out of memory on a subset of the tokens, as a big batch can."""

    def __init__(self, dim: int = 8, tokens: int = 16):
        super().__init__()
        self.proj, self.tokens = nn.Linear(dim, dim), tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] < self.tokens:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 648.00 MiB.")
        return x + self.proj(x)


class OutOfMemoryModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([OutOfMemoryBlock() for _ in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("mechanism", ["fx", "hooks"])
def test_running_out_of_memory_inside_a_route_is_not_explained_as_a_layout_problem(mechanism):
    """Callers that step a batch down catch torch.OutOfMemoryError: a route must not turn it into a RouteError
    that blames the token layout."""
    model = OutOfMemoryModel()
    tokenroute.wrap(model, [(1, 2, 0.5)], seed=0, mechanism=mechanism)
    with pytest.raises(torch.OutOfMemoryError, match="out of memory") as caught:
        model.train()(torch.randn(2, 16, 8))
    assert not isinstance(caught.value, RouteError)
