"""The one-line wrap on backbones written the way their authors' code writes them: a timm-style ViT with a class
token and register tokens, DiT and SiT (facebookresearch/DiT, willisma/SiT: one `models.py`), and U-ViT
(baofff/U-ViT: time and label tokens concatenated before the patch tokens, their count in `self.extras`).

Each runs through the family test's outside checks (`test_family.check`): eval bitwise, the non-image tokens reach
the route's blocks untouched (hooks on the blocks), FLOPs fall, the same parameters get gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

pytest.importorskip("diffusers")  # test_family's module needs it to collect its cases

import tokenroute  # noqa: E402
from family import Case  # noqa: E402
from test_family import check  # noqa: E402

DIM, HEADS, B = 16, 2, 2


class Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4)
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    def __init__(self, size: int, patch: int, channels: int, dim: int):
        super().__init__()
        self.num_patches = (size // patch) ** 2
        self.proj = nn.Conv2d(channels, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


# -- timm's VisionTransformer, reduced: class token, register tokens, `num_prefix_tokens`, blocks in a Sequential --

class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, size: int = 8, patch: int = 2, depth: int = 4, reg_tokens: int = 4):
        super().__init__()
        self.patch_embed = PatchEmbed(size, patch, 3, DIM)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, DIM))
        self.num_prefix_tokens = 1 + reg_tokens
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches, DIM) * 0.02)  # no_embed_class
        self.blocks = nn.Sequential(*[Block(DIM) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, 10)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed
        to_cat = [self.cls_token.expand(x.shape[0], -1, -1), self.reg_token.expand(x.shape[0], -1, -1)]
        return torch.cat(to_cat + [x], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._pos_embed(self.patch_embed(x))
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


# -- DiT / SiT (models.py of either repository: adaLN-Zero blocks, a fixed sin-cos position table) --

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, frequency: int = 32):
        super().__init__()
        self.frequency = frequency
        self.mlp = nn.Sequential(nn.Linear(frequency, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class DiTBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class DiT(nn.Module):
    def __init__(self, input_size: int = 8, patch_size: int = 2, in_channels: int = 4, depth: int = 4,
                 num_classes: int = 10, learn_sigma: bool = True):
        super().__init__()
        self.in_channels, self.patch_size = in_channels, patch_size
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, DIM)
        self.t_embedder = TimestepEmbedder(DIM)
        self.y_embedder = nn.Embedding(num_classes + 1, DIM)
        self.register_buffer("pos_embed", torch.randn(1, self.x_embedder.num_patches, DIM))
        self.blocks = nn.ModuleList([DiTBlock(DIM) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(DIM, elementwise_affine=False, eps=1e-6)
        self.final_linear = nn.Linear(DIM, patch_size * patch_size * self.out_channels)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_linear(self.final_norm(x)))


# -- U-ViT (uvit.py: extras tokens concatenated in front, long skips, a mid block) --

class UViTBlock(nn.Module):
    def __init__(self, dim: int, skip: bool = False):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim)
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    def __init__(self, img_size: int = 8, patch_size: int = 2, in_chans: int = 4, depth: int = 5, num_classes: int = 10):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, DIM)
        self.time_embed = TimestepEmbedder(DIM)
        self.label_emb = nn.Embedding(num_classes, DIM)
        self.extras = 2
        self.pos_embed = nn.Parameter(torch.randn(1, self.extras + self.patch_embed.num_patches, DIM) * 0.02)
        self.in_blocks = nn.ModuleList([UViTBlock(DIM) for _ in range(depth // 2)])
        self.mid_block = UViTBlock(DIM)
        self.out_blocks = nn.ModuleList([UViTBlock(DIM, skip=True) for _ in range(depth // 2)])
        self.norm = nn.LayerNorm(DIM)
        self.decoder_pred = nn.Linear(DIM, patch_size ** 2 * in_chans)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        time_token = self.time_embed(timesteps).unsqueeze(dim=1)
        x = torch.cat((time_token, x), dim=1)
        label_emb = self.label_emb(y).unsqueeze(dim=1)
        x = torch.cat((label_emb, x), dim=1)
        x = x + self.pos_embed
        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())
        x = self.decoder_pred(self.norm(x))
        return x[:, self.extras:, :]


def image(channels: int) -> torch.Tensor:
    return torch.randn(B, channels, 8, 8)


CASES = {
    "timm ViT, class and 4 register tokens": Case(lambda: (VisionTransformer(), dict(x=image(3))),
                                                  image={"blocks": slice(5, None)}, stream="x"),
    "DiT": Case(lambda: (DiT(), dict(x=image(4), t=torch.rand(B) * 1000, y=torch.tensor([1, 2]))), stream="x"),
    "SiT": Case(lambda: (DiT(learn_sigma=False), dict(x=image(4), t=torch.rand(B), y=torch.tensor([3, 4]))),
                stream="x"),
    "U-ViT": Case(lambda: (UViT(), dict(x=image(4), timesteps=torch.rand(B) * 1000, y=torch.tensor([1, 2]))),
                  image={"in_blocks": slice(2, None), "mid_block": slice(2, None), "out_blocks": slice(2, None)},
                  stream="x"),
}


@pytest.mark.parametrize("name", CASES)
def test_paper_code_routes_with_one_line(name):
    found = check(CASES[name])
    assert found["status"] == "routes"


def test_the_layouts_are_read_from_the_graph():
    """The class and register tokens (timm) and U-ViT's extras are found by their concatenation, and the grid
    by the patch embedding: explain says so."""
    vit = tokenroute.wrap(VisionTransformer(), [(1, 2, 0.5)], seed=0)
    plan = tokenroute.explain(vit, image(3))
    assert "image tokens 5..20 after 5 others" in plan and "grid 4x4" in plan
    uvit = tokenroute.wrap(UViT(), [(1, 3, 0.5)], seed=0)
    plan = tokenroute.explain(uvit, image(4), torch.rand(B), torch.tensor([1, 2]))
    assert "image tokens 2..17 after 2 others" in plan and "grid 4x4" in plan
