"""tokenroute demo: train a tiny DiT on Fashion-MNIST with and without TREAD routing on the CPU, and compare.

The routed run differs from the baseline in one line, ``tokenroute.wrap(model, routes=...)``. Prints the
routing plan, the wall time and images/s of each run, the FLOPs a routed training step saves, and where the
two sample grids are. Both runs go through examples/train.py (`compare_routing` below).

    python examples/demo.py [--steps 600] [--output outputs/demo]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

import tokenroute
from tokenroute.training import (IMAGE_SIZE, NUM_CLASSES, DataError, build_model, format_routes, locate_fashion_mnist,
                                 make_task, parse_routes, stack_depth, tread_routes, write_json,
                                 write_synthetic_fashion_mnist)

import train  # examples/train.py, beside this file (a script's own folder is on sys.path)


# ------------------------------------------------------------------------------------------------
# FLOPs, interleaved step times and the routed/unrouted comparison
# ------------------------------------------------------------------------------------------------


def training_step_flops(model: nn.Module, batch_size: int = 2, seed: int = 0) -> int:
    """FLOPs (torch.utils.flop_counter) of one training forward + backward of `model` on random input."""
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, model.in_channels, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    t = torch.rand(batch_size, generator=g)
    y = torch.randint(0, model.num_classes, (batch_size,), generator=g)
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(x, t, y).square().mean().backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def routing_flops(backbone: str, preset: str, routes: Sequence[tuple[int, int, float]], batch_size: int = 2,
                  seed: int = 0) -> dict[str, Any]:
    """Training-step FLOPs without and with `routes`; the routed one is counted after a warm-up step,
    since the first routed forward also traces the model."""
    torch.manual_seed(seed)
    model = build_model(backbone, preset)
    unrouted = training_step_flops(model, batch_size, seed)
    tokenroute.wrap(model, routes=list(routes), seed=seed)
    training_step_flops(model, batch_size, seed)  # warm-up: traces the graph
    routed = training_step_flops(model, batch_size, seed)
    return {"unrouted": unrouted, "routed": routed, "saving": 1.0 - routed / unrouted,
            "flop_speedup": unrouted / routed, "batch_size": batch_size}


def interleaved_step_times(backbone: str, preset: str, routes: Sequence[tuple[int, int, float]], batch_size: int = 32,
                           rounds: int = 12, seed: int = 0) -> dict[str, Any]:
    """Median seconds per training step (EDM loss, AdamW) without and with `routes`, timing the two models'
    steps alternately so that a machine whose load changes slows both alike (a fairer ratio than two runs
    one after the other on a shared machine)."""
    task = make_task("edm")
    models = {}
    for name, rs in (("unrouted", None), ("routed", routes)):
        torch.manual_seed(seed)
        model = build_model(backbone, preset)
        if rs:
            tokenroute.wrap(model, routes=list(rs), seed=seed)
        models[name] = (model.train(), torch.optim.AdamW(model.parameters(), lr=1e-4))
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch_size, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1
    y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)

    def step(name: str) -> float:
        model, opt = models[name]
        t0 = time.perf_counter()
        batch = task.objective.prepare(x0, generator=g)
        pred = task.objective.predict(task.backbone_fn(model), batch, y)
        masks = tokenroute.routing_masks(model) if tokenroute.is_wrapped(model) else []
        loss, _ = tokenroute.losses.combine(task.objective.per_token_loss(pred, batch, model.patch_size), masks)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for name in models:  # warm-up; the first routed step also traces
        step(name), step(name)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name in models:
            times[name].append(step(name))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    return {"unrouted_s": median["unrouted"], "routed_s": median["routed"],
            "speedup": median["unrouted"] / median["routed"], "batch_size": batch_size, "rounds": rounds}


def compare_routing(backbone: str = "dit", preset: str = "tiny", steps: int | None = None,
                    time_budget: float | None = None, *, routes: Sequence[tuple[int, int, float]] | None = None,
                    batch_size: int = 32, output: str | os.PathLike | None = None,
                    data_dir: str | os.PathLike | None = None, seed: int = 0, sample_steps: int = 12,
                    samples_per_class: int = 4, flop_batch: int = 2, timing_rounds: int = 12, objective: str = "edm",
                    quiet: bool = True, extra_args: Sequence[str] = ()) -> dict[str, Any]:
    """Train the same backbone without and with TREAD routing for the same number of steps (CPU) and compare.

    Both runs go through `examples/train.py` (same data order, noise, init and seed; only the wrap differs).
    With `time_budget` (seconds, for both runs together) and no `steps`, the unrouted run gets half the
    budget and the routed run then trains for as many steps as it reached. Neither given: 800 steps, about
    2 to 3 minutes for both runs on 2 CPU cores with the tiny DiT (batch 32).
    `routes` defaults to TREAD's rule for the preset's depth (`tread_routes`). `objective` is train.py's
    (edm, flow or eps); flow gives the cleaner grids after a short run.

    Returns a dict: `routes`, `steps`, `batch_size`, `data` (where the images came from), `baseline` and
    `routed` (each: wall_time_s, train_time_s, images_per_s, final_loss, samples (PNG path), summary (JSON
    path), output), `speedup` (routed / baseline images per second), `flops` (training-step FLOPs unrouted,
    routed, `saving` fraction, `flop_speedup`), `interleaved_timing` (median step time of each model timed
    alternately, `timing_rounds` rounds, and its `speedup`: steadier than `speedup` on a machine whose load
    changes between the two runs; None when timing_rounds=0), `samples` (both grids' paths), `output`; also
    written to OUTPUT/comparison.json.
    """
    output = Path(output) if output is not None else Path("outputs") / f"compare-{backbone}-{preset}"
    output.mkdir(parents=True, exist_ok=True)
    depth = stack_depth(build_model(backbone, preset))
    routes = list(routes) if routes is not None else tread_routes(depth)

    try:
        data_folder = locate_fashion_mnist(data_dir, download=True)
        data = f"Fashion-MNIST ({data_folder})"
    except DataError as err:
        data_folder = write_synthetic_fashion_mnist(output / "synthetic-data", num_train=512, num_test=128, seed=seed)
        data = f"synthetic stand-in ({data_folder}): {err}"

    if steps is None and time_budget is None:
        steps = 800
    shared_args = ["--backbone", backbone, "--preset", preset, "--batch-size", str(batch_size), "--seed", str(seed),
                   "--data-dir", str(data_folder), "--sample-every", "0", "--ckpt-every", "0",
                   "--sample-steps", str(sample_steps), "--samples-per-class", str(samples_per_class),
                   "--objective", objective, "--no-download", *extra_args]
    if quiet:
        shared_args.append("--quiet")

    def run(name: str, route_arg: str, max_steps: int, budget: float | None) -> dict[str, Any]:
        argv = [*shared_args, "--routes", route_arg, "--max-steps", str(max_steps), "--output", str(output / name)]
        if budget is not None:
            argv += ["--time-budget", str(budget)]
        summary = train.main(argv)
        return {"steps": summary["steps"], "wall_time_s": summary["wall_time_s"],
                "train_time_s": summary["train_time_s"], "images_per_s": summary["images_per_s"],
                "step_time_ms": summary["step_time_ms"], "final_loss": summary["final_loss"],
                "samples": summary["outputs"]["samples"], "summary": str(output / name / "summary.json"),
                "output": str(output / name)}

    baseline = run("baseline", "none", steps if steps is not None else 10**9,
                   None if time_budget is None else time_budget / 2)
    steps = baseline["steps"]
    routed = run("routed", format_routes(routes), steps, None)
    flops = routing_flops(backbone, preset, routes, flop_batch, seed)
    timing = None
    if timing_rounds:
        timing = interleaved_step_times(backbone, preset, routes, batch_size, timing_rounds, seed)
    result = {"backbone": backbone, "preset": preset, "objective": objective, "routes": [list(r) for r in routes],
              "steps": steps, "batch_size": batch_size, "data": data, "baseline": baseline, "routed": routed,
              "speedup": routed["images_per_s"] / baseline["images_per_s"], "flops": flops,
              "interleaved_timing": timing, "samples": {"baseline": baseline["samples"], "routed": routed["samples"]},
              "output": str(output)}
    write_json(result, output / "comparison.json")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps of each run (default: 600)")
    parser.add_argument("--routes", default="1:4:0.5", help="START:END:RATIO[,...] for the tiny DiT's 6 blocks")
    parser.add_argument("--output", default="outputs/demo")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST idx files (default: the Debian package's)")
    args = parser.parse_args(argv)
    routes = parse_routes(args.routes)

    model = tokenroute.wrap(build_model("dit", "tiny"), routes=routes, seed=0)  # the one line
    x = torch.zeros(2, 1, 32, 32)
    print(tokenroute.explain(model, x, torch.zeros(2), torch.zeros(2, dtype=torch.long)))
    print(f"\ntraining the tiny DiT for {args.steps} steps without routing, then with routes {args.routes} ...",
          flush=True)
    result = compare_routing("dit", "tiny", steps=args.steps, routes=routes, output=args.output,
                             data_dir=args.data_dir, timing_rounds=8)
    base, routed, flops = result["baseline"], result["routed"], result["flops"]
    print(f"\ndata: {result['data']}")
    print(f"{'':>10} {'wall s':>8} {'images/s':>9} {'final loss':>11}")
    for name, run in (("baseline", base), ("routed", routed)):
        print(f"{name:>10} {run['wall_time_s']:8.1f} {run['images_per_s']:9.1f} {run['final_loss']:11.4f}")
    print(f"FLOPs of one training step: {flops['unrouted'] / 1e9:.3f} -> {flops['routed'] / 1e9:.3f} GFLOP "
          f"({100 * flops['saving']:.1f}% saved, FLOP-ideal speed-up {flops['unrouted'] / flops['routed']:.2f}x)")
    if result["interleaved_timing"]:
        print(f"step time measured interleaved: {result['interleaved_timing']['speedup']:.2f}x faster routed")
    print(f"sample grids: {result['samples']['baseline']} and {result['samples']['routed']}")
    print(f"everything else (loss curves, summaries, comparison.json): {result['output']}")
    return result


if __name__ == "__main__":
    main()
