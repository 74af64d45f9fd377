"""Local attention on CUDA (FlexAttention, compiled) against the CPU's dense-mask path: the same rule, the same
outputs and gradients, with the stack in tile order and with each attention reordering itself. Skipped where no
GPU is present (CI); run on one with ``pytest tests/test_local_attention_cuda.py``."""

from __future__ import annotations

import copy

import pytest
import torch

from tokenroute.core.locality import LocalMasks, local_attention, pool_grid
from tokenroute.methods.local_attention import LocalAttentionConfig, apply_local_attention

from helpers import backbone_inputs, make_backbone

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's compiled kernels need CUDA")

RULES = [dict(radius=5.0), dict(radius=1.0), dict(tile=(8, 16), radius_tiles=(1, 0))]


def _coords(rows: int, cols: int, lead: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat([torch.full((lead, 2), -1), torch.stack([ys, xs], -1).reshape(-1, 2)])


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("dim", [16, 8])
def test_flex_on_cuda_is_the_dense_mask_on_the_cpu(rule, pooled, dim):
    """A 32 x 48 grid after 3 global tokens (not tile-aligned by row-major order), float32; head dim 8 is below
    the compiled kernel's minimum (zero-padded)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    coords = _coords(32, 48, 3)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, len(coords), dim, generator=gen) for _ in range(3))
    extra = (pool_grid(k, (32, 48), 3, 0, 4), pool_grid(v, (32, 48), 3, 0, 4)) if pooled else None
    cpu = local_attention(q, k, v, coords, coords, extra_kv=extra, backend="sdpa", **rule)
    on = lambda t: t.cuda()  # noqa: E731
    gpu = local_attention(on(q), on(k), on(v), on(coords), on(coords), masks=LocalMasks(), key="k",
                          extra_kv=None if extra is None else tuple(map(on, extra)), **rule)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("reorder", ["stack", "attention"])
def test_a_model_on_cuda_matches_the_cpu_forward_and_backward(reorder):
    """The project's DiT on a 32 x 32 grid (8 x 16 kernel tiles reorder it; head dim 8, padded for the kernel):
    outputs and parameter gradients on CUDA with FlexAttention equal the CPU's dense-mask ones."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    plain = make_backbone("dit", depth=3, size=64)
    x, t, y = backbone_inputs(2, size=64)
    results = []
    for device, backend in (("cpu", "sdpa"), ("cuda", "auto")):
        model = apply_local_attention(copy.deepcopy(plain), LocalAttentionConfig(
            radius=5.0, pooled=4, backend=backend, reorder=reorder)).to(device).train()
        out = model(x.to(device), t.to(device), y.to(device))
        out.square().mean().backward()
        results.append((out.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}))
    (cpu_out, cpu_grads), (gpu_out, gpu_grads) = results
    torch.testing.assert_close(gpu_out, cpu_out, rtol=1e-4, atol=1e-4)
    assert cpu_grads.keys() == gpu_grads.keys() and any("local_attention_pool" in n for n in gpu_grads)
    for name in cpu_grads:
        torch.testing.assert_close(gpu_grads[name], cpu_grads[name], rtol=1e-3, atol=1e-4, msg=name)


def test_with_a_tread_route_on_cuda_the_stack_order_gives_the_same_step():
    """A TREAD route over the middle block and local attention everywhere: the tile order runs in the blocks the
    route leaves free, and the training step's output and gradients equal those of reordering per attention."""
    import tokenroute

    plain = make_backbone("dit", depth=3, size=64).cuda()
    x, t, y = (v.cuda() for v in backbone_inputs(2, size=64))
    results = []
    for reorder in ("stack", "attention"):
        model = tokenroute.wrap(copy.deepcopy(plain), routes=[(1, 1, 0.5)], seed=3)
        apply_local_attention(model, LocalAttentionConfig(tile=(8, 16), radius_tiles=(1, 0), reorder=reorder))
        out = model.train()(x, t, y)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-4)
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, rtol=1e-3, atol=1e-4, msg=name)
