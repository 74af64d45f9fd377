"""The first routed training step against later ones: peak memory, FLOPs and time.

The first routed forward of each input signature traces the owner's forward. Tracing runs on fake tensors,
so the first step should allocate and compute what every later step does (plus the trace's host time).

    python benchmarks/first_step.py                 # DiT-XL/2, route 2 -> 24 at 0.5, batch 64 and 128
    python benchmarks/first_step.py --smoke         # CPU, a tiny DiT
    python benchmarks/first_step.py --plot-only     # redraw the plot from the JSON files
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import tokenroute
from tokenroute.models import DiT
from tokenroute.training import flop_counter

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
    with flop_counter() as counter:
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


def plot(files: list[Path], path: Path) -> None:
    """Peak memory of each step, one line per file and batch: the first step against the later ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for file in files:
        label = "core before the rebuild" if "old_core" in file.name else "rebuilt core (fake-tensor tracing)"
        for row in json.loads(file.read_text())["results"]:
            steps = [row["first"], *row["later"]]
            peaks = [s["peak_gib_above_resting"] for s in steps]
            if None in peaks:
                continue
            ax.plot(range(1, len(peaks) + 1), peaks, marker="o", linestyle="--" if "old_core" in file.name else "-",
                    label=f"{row['model']} batch {row['batch']}, {label}")
    ax.set_xticks(range(1, 1 + max(len(json.loads(f.read_text())["results"][0]["later"]) + 1 for f in files)))
    ax.set_xlabel("training step (the first one traces the graph)")
    ax.set_ylabel("peak memory of forward + backward, GiB")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, a tiny DiT")
    parser.add_argument("--batches", default="64,128")
    parser.add_argument("--steps", type=int, default=4, help="steps after the first")
    parser.add_argument("--output", default=str(RESULTS / "first_step.json"))
    parser.add_argument("--plot-only", action="store_true", help="redraw first_step.png from the JSON files")
    args = parser.parse_args(argv)
    output = Path(args.output)
    files = [f for f in (output, output.with_name("first_step_old_core.json")) if f.exists()]
    if args.plot_only:
        plot(files, output.with_suffix(".png"))
        return
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
    write_json(output, dict(benchmark="first_step", environment=environment(),
                                       config=dict(autocast="bf16", optimizer="AdamW lr 1e-4", steps=args.steps),
                                       targets=dict(first_over_later_peak_memory=1.05, first_over_later_flops=1.0),
                                       results=results))
    if device.type == "cuda":
        plot([f for f in (output, output.with_name("first_step_old_core.json")) if f.exists()],
             output.with_suffix(".png"))


if __name__ == "__main__":
    main()
