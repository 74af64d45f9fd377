"""FLOPs of a model's work, counted by torch's FLOP counter with attention included on every device.

``torch.utils.flop_counter`` knows the GPU's fused attention kernels but not the CPU's, so on the CPU it leaves
attention out and understates what routing saves (attention falls with the square of the tokens kept). The
counter here counts the CPU's kernel as the GPU's are counted, so a CPU count (the demo, the benchmarks' smoke
runs, the tests) and a GPU count agree.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

_aten = torch.ops.aten
CPU_ATTENTION = {  # keyed by operator packet, as the counter looks them up; the counter passes shapes
    _aten._scaled_dot_product_flash_attention_for_cpu:
        lambda query, key, value, *_, **__: sdpa_flop_count(query, key, value),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, query, key, value, *_, **__: sdpa_backward_flop_count(grad_out, query, key, value),
}


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` (display off) that also counts the CPU's fused attention."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)


def flop_category(op: str) -> str:
    """What a counted operator is: fused attention, or a matmul (linear layers, convolutions, batched products)."""
    return "attention" if "attention" in op else "matmul"


def flops_by_category(counter: FlopCounterMode) -> dict[str, int]:
    """A finished count's FLOPs by ``flop_category``."""
    totals: dict[str, int] = {}
    for op, count in counter.get_flop_counts()["Global"].items():
        category = flop_category(str(op))
        totals[category] = totals.get(category, 0) + count
    return totals
