"""The first routed training step against later ones: peak memory, FLOPs and time.

The first routed forward of each input signature traces the owner's forward. Tracing runs on fake tensors,
so the first step should allocate and compute what every later step does (plus the trace's host time).

    python benchmarks/first_step.py                 # DiT-XL/2, route 2 -> 24 at 0.5, batch 64 and 128
    python benchmarks/first_step.py --smoke         # CPU, a tiny DiT
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import tokenroute
from tokenroute.models import DiT

from common import RESULTS, bench_device, environment, write_json
from throughput import random_inputs


def one_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs, device: torch.device) -> dict:
    """One bf16 training step: the peak memory of its forward and backward above the resting state (the
    optimizer's first step allocates its state, which is not the trace's doing), FLOPs, wall time with the
    FLOP counter on."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resting = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(*inputs).float().square().mean()
        loss.backward()
    peak = (torch.cuda.max_memory_allocated() - resting) / 2**30 if device.type == "cuda" else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return dict(peak_gib_above_resting=peak, flops=counter.get_total_flops(), seconds=seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, a tiny DiT")
    parser.add_argument("--batches", default="64,128")
    parser.add_argument("--steps", type=int, default=4, help="steps after the first")
    parser.add_argument("--output", default=str(RESULTS / "first_step.json"))
    args = parser.parse_args(argv)
    device = bench_device(cpu=args.smoke)
    if args.smoke:
        build, routes, batches = (lambda: DiT(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=6,
                                              num_heads=4)), [(1, 4, 0.5)], [4]
    else:
        build, routes = (lambda: DiT.from_preset("DiT-XL/2", num_classes=1000)), [(2, 24, 0.5)]
        batches = [int(b) for b in args.batches.split(",")]
    results = []
    for batch in batches:
        torch.manual_seed(0)
        model = tokenroute.wrap(build().to(device).train(), routes, seed=0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        inputs = random_inputs(model, batch, device)
        steps = [one_step(model, optimizer, inputs, device) for _ in range(1 + args.steps)]
        first, later = steps[0], steps[1:]
        row = dict(model="DiT-XL/2" if not args.smoke else "DiT-tiny", batch=batch, routes=routes, first=first,
                   later=later, first_over_later_flops=first["flops"] / later[-1]["flops"])
        if first["peak_gib_above_resting"] is not None:
            row["first_over_later_peak_memory"] = first["peak_gib_above_resting"] / max(
                s["peak_gib_above_resting"] for s in later)
        results.append(row)
        print(f"{row['model']} batch {batch}: first step {first['seconds']:.2f} s, later {later[-1]['seconds']:.2f} s; "
              f"FLOPs first/later {row['first_over_later_flops']:.3f}; peak memory first/later "
              f"{row.get('first_over_later_peak_memory', float('nan')):.3f}")
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_json(Path(args.output), dict(benchmark="first_step", environment=environment(),
                                       config=dict(autocast="bf16", optimizer="AdamW lr 1e-4", steps=args.steps),
                                       targets=dict(first_over_later_peak_memory=1.05, first_over_later_flops=1.0),
                                       results=results))


if __name__ == "__main__":
    main()
