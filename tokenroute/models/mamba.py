"""A diffusion backbone of Mamba (selective state-space) blocks in pure PyTorch, DiS-style.

Tokens are ``[time, label, patches...]`` in row-major patch order and every block scans them causally,
so token order matters (unlike attention): a routed subset is scanned in its original relative order.

The mixer uses the Mamba-2 parametrisation: the state decay ``exp(dt * A)`` is one scalar per head
(``A``: (heads,)), with input-dependent ``dt`` per head and ``B``, ``C`` shared by all heads. This is
what makes a fast pure-PyTorch scan possible: inside a chunk the scan becomes a masked (T x T) decay
matrix applied with small matmuls (the SSD algorithm), and chunks are linked by the same construction
over the chunk totals. Every exponent is a sum of log-decays ``dt * A <= 0`` (a segment sum, never a
difference of two large cumulative sums), so the scan is stable for any ``dt``; it always runs in float32
(float64 for float64 inputs), also under autocast. A Mamba-1 decay per (channel, state) would force the
scan to materialise (B, L, d_inner, d_state) tensors: an order of magnitude slower without a custom kernel.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import PrefixTokenBackbone, from_preset, tokens_to_image

__all__ = ["MAMBA_PRESETS", "DiffusionMamba", "MambaBlock", "MambaMixer", "selective_scan", "selective_scan_ref"]

MAMBA_PRESETS: dict[str, dict[str, Any]] = {
    "Mamba-S/2": dict(hidden_size=384, depth=12, input_size=32, patch_size=2, in_channels=4),
    "Mamba-B/2": dict(hidden_size=768, depth=12, input_size=32, patch_size=2, in_channels=4),
    "tiny": dict(hidden_size=64, depth=4, input_size=8, patch_size=2, in_channels=1),
}


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def selective_scan_ref(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: torch.Tensor | None = None) -> torch.Tensor:
    """Sequential selective scan, one token at a time (slow; the reference for :func:`selective_scan`).

    x: (b, l, h, p) inputs in ``h`` heads of ``p`` channels; dt: (b, l, h) positive step sizes;
    A: (h,) negative rates; B, C: (b, l, n) input / output projections of the n-dim state; D: (h,) or None.
    Returns y (b, l, h, p) in x's dtype::

        s_t = exp(dt_t * A) * s_{t-1} + (dt_t * x_t) outer B_t       (s: (b, h, p, n), s_0 = 0)
        y_t = s_t @ C_t + D * x_t
    """
    out_dtype, cdt = x.dtype, _compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        x, dt, A, B, C = (v.to(cdt) for v in (x, dt, A, B, C))
        b, l, h, p = x.shape
        s = x.new_zeros(b, h, p, B.shape[-1])
        ys = []
        for i in range(l):
            decay = torch.exp(dt[:, i] * A)[..., None, None]
            s = decay * s + (dt[:, i, :, None] * x[:, i])[..., None] * B[:, i, None, None, :]
            ys.append((s * C[:, i, None, None, :]).sum(-1))
        y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p)
        if D is not None:
            y = y + x * D.to(cdt)[:, None]
    return y.to(out_dtype)


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """(..., T) log-decays -> (..., T, T) with ``[i, j] = a[j+1] + ... + a[i]`` for j <= i, else -inf.

    Each entry is summed directly (a masked cumsum), not taken as a difference of cumulative sums,
    so it stays accurate however negative the totals get."""
    T = a.shape[-1]
    ones = torch.ones(T, T, dtype=torch.bool, device=a.device)
    a = a[..., None].expand(*a.shape, T).masked_fill(~ones.tril(-1), 0)  # [..., k, j] = a[k] if j < k
    return a.cumsum(dim=-2).masked_fill(~ones.tril(0), -torch.inf)


def selective_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, chunk_size: int = 64) -> torch.Tensor:
    """Chunked parallel selective scan (SSD); same contract as :func:`selective_scan_ref`.

    Per chunk of T tokens: outputs from inputs of the same chunk through the (T x T) decay matrix, and
    each chunk's final state; then the states entering each chunk from a (chunks x chunks) decay matrix
    over the chunk totals; then their contribution to the chunk's outputs.
    """
    out_dtype, cdt = x.dtype, _compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        x, dt, A, B, C = (v.to(cdt) for v in (x, dt, A, B, C))
        b, l, h, p = x.shape
        if l == 0:
            return x.new_zeros(b, 0, h, p).to(out_dtype)
        T = max(1, min(chunk_size, l))
        pad = (-l) % T
        a = dt * A  # (b, l, h) log-decay per step, <= 0
        u = x * dt[..., None]  # (b, l, h, p)
        if pad:  # zero log-decay and zero input: padded steps at the end change nothing before them
            a, B, C = (F.pad(v, (0, 0, 0, pad)) for v in (a, B, C))
            u = F.pad(u, (0, 0, 0, 0, 0, pad))
        nc = (l + pad) // T
        a = a.view(b, nc, T, h).permute(0, 1, 3, 2)  # (b, c, h, T)
        u = u.view(b, nc, T, h, p).transpose(2, 3)  # (b, c, h, T, p)
        B, C = B.view(b, nc, 1, T, -1), C.view(b, nc, 1, T, -1)  # (b, c, 1, T, n)

        decay = torch.exp(_segsum(a))  # (b, c, h, T, T): decay from step j to step i
        y = (decay * (C @ B.transpose(-1, -2))) @ u  # within-chunk part, (b, c, h, T, p)
        chunk_state = (u * decay[..., -1, :, None]).transpose(-1, -2) @ B  # state at chunk end, (b, c, h, p, n)

        totals = a.sum(-1).transpose(1, 2)  # (b, h, c): log-decay across each chunk
        carry = torch.exp(_segsum(F.pad(totals, (1, 0))))[..., :-1, 1:]  # (b, h, c, c): chunk j -> entering i
        entering = torch.einsum("bhij,bjhpn->bihpn", carry, chunk_state)  # state entering each chunk
        y = y + (C @ entering.transpose(-1, -2)) * torch.exp(a.cumsum(-1))[..., None]

        y = y.transpose(2, 3).reshape(b, nc * T, h, p)[:, :l]
        if D is not None:
            y = y + x * D.to(cdt)[:, None]
    return y.to(out_dtype)


class MambaMixer(nn.Module):
    """Mamba(-2) mixer, (B, L, D) -> (B, L, D), causal over L: in_proj -> causal depthwise conv1d over
    (x, B, C) -> SiLU -> selective scan with input-dependent dt, B, C -> gate with SiLU(z) -> RMSNorm ->
    out_proj. ``headdim`` channels share one decay (``d_inner = expand * dim`` must divide by it); by
    default 64, or fewer for small models so that there are at least 4 heads."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, headdim: int | None = None,
                 chunk_size: int = 64, dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 A_init_range: tuple[float, float] = (1.0, 16.0)) -> None:
        super().__init__()
        self.d_inner = expand * dim
        if headdim is None:
            headdim = math.gcd(self.d_inner, min(64, max(1, self.d_inner // 4)))
        if self.d_inner % headdim:
            raise ValueError(f"d_inner = expand * dim = {self.d_inner} is not divisible by headdim {headdim}")
        self.d_state = d_state
        self.headdim = headdim
        self.nheads = self.d_inner // headdim
        self.chunk_size = chunk_size
        self.dt_min, self.dt_max, self.dt_init_floor, self.A_init_range = dt_min, dt_max, dt_init_floor, A_init_range

        conv_dim = self.d_inner + 2 * d_state
        self.in_proj = nn.Linear(dim, self.d_inner + conv_dim + self.nheads, bias=False)  # z, (x, B, C), dt
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.nheads))
        self.norm = nn.RMSNorm(self.d_inner, eps=1e-5)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba-2's SSM init: A uniform in ``A_init_range``, D = 1, dt log-uniform in [dt_min, dt_max]."""
        self.A_log.copy_(torch.empty(self.nheads).uniform_(*self.A_init_range).log())
        self.D.fill_(1.0)
        dt = torch.exp(torch.rand(self.nheads) * (math.log(self.dt_max) - math.log(self.dt_min))
                       + math.log(self.dt_min)).clamp(min=self.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        l = x.shape[1]
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.d_inner + 2 * self.d_state, self.nheads], dim=-1)
        xbc = F.silu(self.conv1d(xbc.transpose(1, 2))[..., :l].transpose(1, 2))  # causal: drop the right padding
        xs, B, C = xbc.split([self.d_inner, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        A = -torch.exp(self.A_log.float())
        y = selective_scan(xs.unflatten(-1, (self.nheads, self.headdim)), dt, A, B, C, self.D, self.chunk_size)
        gated = y.flatten(2).to(z.dtype) * F.silu(z)
        # the norm runs in the weights' dtype: float32 under autocast
        return self.out_proj(self.norm(gated.to(self.norm.weight.dtype)))


class MambaBlock(nn.Module):
    """Pre-norm residual Mamba block: ``x + mixer(norm(x))``."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, headdim: int | None = None,
                 chunk_size: int = 64) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = MambaMixer(dim, d_state, d_conv, expand, headdim=headdim, chunk_size=chunk_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, L, D) tokens in scan order -> (B, L, D)."""
        return x + self.mixer(self.norm(x))


class DiffusionMamba(PrefixTokenBackbone):
    """Mamba diffusion backbone: ``forward(x (B, C, H, W), t (B,) float, y (B,) long) -> (B, C, H, W)``.

    Conditioning enters as two prefix tokens ``[time, label]`` scanned before the patches, so every patch
    token sees it. ``y == num_classes`` is the null label (see ``LabelEmbedder``).
    """

    def __init__(self, input_size: int | tuple[int, int] = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 768, depth: int = 12, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 num_classes: int = 10, headdim: int | None = None, chunk_size: int = 64) -> None:
        super().__init__()
        self._init_embedding(input_size, patch_size, in_channels, hidden_size, num_classes)
        self.blocks = nn.ModuleList([MambaBlock(hidden_size, d_state, d_conv, expand, headdim, chunk_size)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(hidden_size)
        self.decoder_pred = nn.Linear(hidden_size, patch_size * patch_size * in_channels)
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "DiffusionMamba":
        """Build a named configuration from ``MAMBA_PRESETS``; keyword arguments override its fields."""
        return from_preset(cls, MAMBA_PRESETS, name, overrides)

    def initialize_weights(self) -> None:
        """Embeddings and head: truncated normal (std 0.02); mixers: Mamba's init, with each out_proj
        scaled by 1 / sqrt(depth) so the residual stream does not grow with depth."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.label_emb.embedding_table.weight, std=0.02)
        for lin in (self.time_embed.mlp[0], self.time_embed.mlp[2], self.decoder_pred):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        for block in self.blocks:
            block.mixer.reset_ssm_parameters()
            w = block.mixer.out_proj.weight
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            with torch.no_grad():
                w /= math.sqrt(len(self.blocks))

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, 2 + N, D) -> images: norm, drop the prefix tokens, linear to patches."""
        x = self.decoder_pred(self.norm(tokens))
        return tokens_to_image(x, self.num_prefix_tokens, self.patch_size, self.grid_size, self.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.embed(x, t, y)
        for block in self.blocks:
            x = block(x)
        return self.head(x)
