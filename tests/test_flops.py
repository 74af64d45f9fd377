"""The FLOP counter the demo, the benchmarks and the tests share: on the CPU it counts attention too."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import backbone_inputs, make_backbone
from tokenroute.training import flop_counter, flops_by_category


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 3), heads=st.integers(1, 4), queries=st.integers(1, 40), keys=st.integers(1, 40),
       head_dim=st.sampled_from([4, 8, 16]))
def test_cpu_attention_counts_what_its_products_compute(batch, heads, queries, keys, head_dim):
    """The CPU's fused kernel is counted as the two products it fuses, which the math backend runs one by one."""
    q = torch.randn(batch, heads, queries, head_dim)
    k, v = torch.randn(2, batch, heads, keys, head_dim).unbind(0)
    with flop_counter() as fused:
        F.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as math:
        F.scaled_dot_product_attention(q, k, v)
    assert fused.get_total_flops() == math.get_total_flops() == 4 * batch * heads * queries * keys * head_dim
    assert set(flops_by_category(fused)) == {"attention"}


def test_a_training_step_adds_attention_and_nothing_else():
    """Beside what torch's own counter counts on the CPU (the matmuls), the step's attention, forward and backward."""
    model = make_backbone("dit", depth=4)
    inputs = backbone_inputs(2)

    def step(counter):
        with counter:
            model(*inputs).square().mean().backward()
        return counter

    ours, stock = step(flop_counter()), step(FlopCounterMode(display=False))
    categories = flops_by_category(ours)
    assert categories["matmul"] == stock.get_total_flops()
    assert categories["attention"] > 0 and ours.get_total_flops() == sum(categories.values())
