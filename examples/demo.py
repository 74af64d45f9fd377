"""tokenroute demo: train a tiny DiT on Fashion-MNIST with and without TREAD routing on the CPU, and compare.

The routed run differs from the baseline in one line, ``tokenroute.wrap(model, routes=...)``. Prints the
routing plan, a progress bar, one speed figure (routed and unrouted training steps timed interleaved, as the
benchmarks time them) with the FLOPs a routed step saves, and where the two sample grids are. Both runs go
through examples/train.py (`compare_routing` below): rectified flow, 2000 steps of batch 32 each, about 3 to
4 minutes in all on two idle CPU cores.

    python examples/demo.py [--steps 2000] [--output outputs/demo] [--data-dir DIR | --synthetic]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

import tokenroute
from tokenroute.training import (CLASSES, DEFAULT_DATA_DIR, IMAGE_SIZE, NUM_CLASSES, DataError, build_model,
                                 flop_counter, format_routes, locate_fashion_mnist, make_task, parse_routes, stack_depth,
                                 tread_routes, write_json, write_synthetic_fashion_mnist)

import train  # examples/train.py, beside this file (a script's own folder is on sys.path)


# ------------------------------------------------------------------------------------------------
# Progress: one bar over both runs and the timing
# ------------------------------------------------------------------------------------------------


class DemoProgress:
    """One progress bar for the whole comparison: each run's training steps, read from the loss.csv that
    train.py writes every few steps (train.py itself runs quietly), then the timing steps.

    A tqdm bar on a terminal; in a log or a pipe, where a bar cannot redraw, a line every tenth of the way.
    """

    def __init__(self, total: int, enabled: bool = True, poll_s: float = 0.5) -> None:
        self.total, self.enabled, self.poll_s = total, enabled, poll_s
        self.done, self.phase, self.note = 0, "", ""
        self._printed_tenths = 0
        self._bar = None
        self._started = time.perf_counter()
        if enabled and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def set(self, done: int, phase: str | None = None, note: str | None = None) -> None:
        """Steps done so far in all phases; the current phase and a short note (the latest loss)."""
        self.phase = self.phase if phase is None else phase
        self.note = self.note if note is None else note
        self.done = min(max(done, self.done), self.total)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_description(self.phase, refresh=False)
            self._bar.set_postfix_str(self.note, refresh=False)
            self._bar.update(self.done - self._bar.n)
            return
        tenths = 10 * self.done // max(self.total, 1)
        if tenths > self._printed_tenths:
            self._printed_tenths = tenths
            elapsed = time.perf_counter() - self._started
            print(f"  {10 * tenths:3d}%  {self.phase}  {self.note}  ({elapsed:.0f} s)", file=sys.stderr, flush=True)

    @contextmanager
    def follow(self, loss_csv: Path, offset: int, steps: int, phase: str) -> Iterator[None]:
        """While the body runs, count the rows train.py has written to `loss_csv` (steps done) in a thread."""
        stop = threading.Event()
        since = time.time()

        def poll() -> None:
            while not stop.wait(self.poll_s):
                rows, note = _loss_csv_progress(loss_csv, since)
                self.set(offset + rows, phase, "sampling the grid" if rows >= steps else note)

        self.set(offset, phase, "starting")
        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()
        self.set(offset + steps, phase, "done")

    def write(self, text: str) -> None:
        """A message that does not break the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _loss_csv_progress(path: Path, since: float) -> tuple[int, str]:
    """Rows written so far (one per step) and the latest loss, from a loss.csv that may be half written;
    nothing from one written before `since` (an earlier run's, about to be replaced)."""
    try:
        if path.stat().st_mtime < since - 1.0:
            return 0, ""
        text = path.read_text()
    except OSError:
        return 0, ""
    lines = text.split("\n")[1:-1]  # the header, then complete lines only
    if not lines:
        return 0, ""
    fields = lines[-1].split(",")
    return len(lines), f"loss {float(fields[2]):.3f}" if len(fields) > 2 and fields[2] else ""


# ------------------------------------------------------------------------------------------------
# FLOPs, interleaved step times and the routed/unrouted comparison
# ------------------------------------------------------------------------------------------------


def training_step_flops(model: nn.Module, batch_size: int = 2, seed: int = 0) -> int:
    """FLOPs (torch.utils.flop_counter, attention included on the CPU too) of one training forward + backward of
    `model` on random input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, model.in_channels, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    t = torch.rand(batch_size, generator=g)
    y = torch.randint(0, model.num_classes, (batch_size,), generator=g)
    model.train()
    with flop_counter() as counter:
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
                           rounds: int = 7, steps_per_round: int = 10, warmup: int = 3, seed: int = 0,
                           objective: str = "flow", progress: DemoProgress | None = None,
                           progress_offset: int = 0) -> dict[str, Any]:
    """Seconds per training step (the runs' objective, AdamW) without and with `routes`, measured as
    benchmarks/throughput.py measures: both models warmed up, then `rounds` repetitions that each time
    `steps_per_round` steps of one model and then of the other (order alternating), and the median over
    repetitions. A machine whose load changes slows both alike, so the ratio holds where two runs one after
    the other would not."""
    task = make_task(objective)
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
    done = [progress_offset]

    def step(name: str) -> None:
        model, opt = models[name]
        batch = task.objective.prepare(x0, generator=g)
        pred = task.objective.predict(task.backbone_fn(model), batch, y)
        masks = tokenroute.routing_masks(model) if tokenroute.is_wrapped(model) else []
        loss, _ = tokenroute.losses.combine(task.objective.per_token_loss(pred, batch, model.patch_size), masks)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        done[0] += 1
        if progress is not None:
            progress.set(done[0], "timing", "routed and unrouted steps interleaved")

    for name in models:  # warm-up; the first routed step also traces
        for _ in range(warmup):
            step(name)
    times: dict[str, list[float]] = {name: [] for name in models}
    order = list(models)
    for r in range(rounds):
        for name in order[r % 2:] + order[:r % 2]:
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                step(name)
            times[name].append((time.perf_counter() - t0) / steps_per_round)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    return {"unrouted_s": median["unrouted"], "routed_s": median["routed"],
            "speedup": median["unrouted"] / median["routed"], "batch_size": batch_size, "rounds": rounds,
            "steps_per_round": steps_per_round, "warmup_steps": warmup,
            "each_round_s": {name: ts for name, ts in times.items()}}


def timing_steps(rounds: int, steps_per_round: int = 10, warmup: int = 3) -> int:
    """Training steps `interleaved_step_times` runs, both models together (for the progress bar)."""
    return 2 * (warmup + rounds * steps_per_round) if rounds else 0


def compare_routing(backbone: str = "dit", preset: str = "tiny", steps: int | None = None,
                    time_budget: float | None = None, *, routes: Sequence[tuple[int, int, float]] | None = None,
                    batch_size: int = 32, output: str | os.PathLike | None = None,
                    data_dir: str | os.PathLike | None = None, seed: int = 0, sample_steps: int = 32,
                    samples_per_class: int = 8, flop_batch: int = 2, timing_rounds: int = 7,
                    timing_steps_per_round: int = 10, objective: str = "flow", quiet: bool = True,
                    progress: DemoProgress | None = None, before_phase: Callable[[str], None] | None = None,
                    extra_args: Sequence[str] = ()) -> dict[str, Any]:
    """Train the same backbone without and with TREAD routing for the same number of steps (CPU) and compare.

    Both runs go through `examples/train.py` (same data order, noise, init and seed; only the wrap differs),
    in OUTPUT/baseline and OUTPUT/routed, replacing an earlier run there (train.py's --overwrite),
    and read Fashion-MNIST from `data_dir` (None: train.py's default); a missing data set stops the
    comparison with train.py's message. With `time_budget` (seconds, for both runs together) and no `steps`,
    the unrouted run gets half the budget and the routed run then trains for as many steps as it reached.
    Neither given: 2000 steps. `routes` defaults to TREAD's rule for the preset's depth (`tread_routes`).
    `objective` is train.py's (flow, edm or eps); flow gives the cleaner grids after a short run.
    `before_phase(name)` is called before each run and before the timing (the demo settles threads there).

    The speed figure is `interleaved_timing` (see `interleaved_step_times`): the two runs' own wall times
    are measured one after the other, so a change of load between them skews their ratio; they are kept in
    each run's entry for the record only.

    Returns a dict: `routes`, `steps`, `batch_size`, `data` (the folder read), `baseline` and `routed` (each:
    steps, final_loss, samples (PNG path), summary (JSON path), output, and the sequential wall_time_s,
    train_time_s, images_per_s), `flops` (training-step FLOPs unrouted, routed, `saving` fraction,
    `flop_speedup`), `interleaved_timing` (median step time of each model, `speedup`; None when
    timing_rounds=0), `speedup` (the interleaved one, or None), `samples` (both grids' paths), `output`;
    also written to OUTPUT/comparison.json.
    """
    output = Path(output) if output is not None else Path("outputs") / f"compare-{backbone}-{preset}"
    output.mkdir(parents=True, exist_ok=True)
    depth = stack_depth(build_model(backbone, preset))
    routes = list(routes) if routes is not None else tread_routes(depth)
    data_folder = Path(data_dir) if data_dir is not None else Path(DEFAULT_DATA_DIR)

    if steps is None and time_budget is None:
        steps = 2000
    shared_args = ["--backbone", backbone, "--preset", preset, "--batch-size", str(batch_size), "--seed", str(seed),
                   "--data-dir", str(data_folder), "--sample-every", "0", "--ckpt-every", "0",
                   "--sample-steps", str(sample_steps), "--samples-per-class", str(samples_per_class),
                   "--objective", objective, "--no-download", "--overwrite", *extra_args]
    if quiet:
        shared_args.append("--quiet")

    def run(name: str, route_arg: str, max_steps: int, budget: float | None, offset: int) -> dict[str, Any]:
        argv = [*shared_args, "--routes", route_arg, "--max-steps", str(max_steps), "--output", str(output / name)]
        if before_phase is not None:
            before_phase(f"{name} run")
        if budget is not None:
            argv += ["--time-budget", str(budget)]
        if progress is None:
            summary = train.main(argv)
        else:
            bar_steps = max_steps if budget is None else steps or 0
            with progress.follow(output / name / "loss.csv", offset, bar_steps, f"{name} run"):
                summary = train.main(argv)
        return {"steps": summary["steps"], "final_loss": summary["final_loss"],
                "samples": summary["outputs"]["samples"], "summary": str(output / name / "summary.json"),
                "output": str(output / name), "wall_time_s": summary["wall_time_s"],
                "train_time_s": summary["train_time_s"], "images_per_s": summary["images_per_s"],
                "step_time_ms": summary["step_time_ms"]}

    baseline = run("baseline", "none", steps if steps is not None else 10**9,
                   None if time_budget is None else time_budget / 2, 0)
    steps = baseline["steps"]
    routed = run("routed", format_routes(routes), steps, None, steps)
    if progress is not None:
        progress.set(2 * steps, "FLOPs", "counting one training step")
    flops = routing_flops(backbone, preset, routes, flop_batch, seed)
    timing = None
    if timing_rounds:
        if before_phase is not None:
            before_phase("timing")
        timing = interleaved_step_times(backbone, preset, routes, batch_size, timing_rounds, timing_steps_per_round,
                                        seed=seed, objective=objective, progress=progress,
                                        progress_offset=2 * steps)
    result = {"backbone": backbone, "preset": preset, "objective": objective, "routes": [list(r) for r in routes],
              "steps": steps, "batch_size": batch_size, "data": str(data_folder), "threads": torch.get_num_threads(),
              "baseline": baseline, "routed": routed, "flops": flops, "interleaved_timing": timing,
              "speedup": timing["speedup"] if timing else None,
              "samples": {"baseline": baseline["samples"], "routed": routed["samples"]},
              "note": "speedup is the interleaved timing's; the runs' wall times and images/s were measured one "
                      "after the other and are not a speed comparison",
              "output": str(output)}
    write_json(result, output / "comparison.json")
    return result


# ------------------------------------------------------------------------------------------------
# The demo: data and threads settled up front, then the plan, the runs, one speed figure and the grids
# ------------------------------------------------------------------------------------------------


def resolve_data(data_dir: str | None, synthetic: bool, output: Path) -> tuple[Path, str]:
    """The folder to train on and a line saying what it is. An explicit --data-dir that holds no
    Fashion-MNIST stops the demo (as train.py does); the synthetic stand-in is used where asked for, or where
    the data set is not installed in its default place (the set-up could not install it)."""
    if synthetic:
        folder = write_synthetic_fashion_mnist(output / "synthetic-data", num_train=512, num_test=128)
        return folder, (f"data: a SYNTHETIC stand-in, as asked (one noisy box per class, no garments), in {folder}; "
                        "the grids will show boxes")
    if data_dir is not None:
        try:
            folder = locate_fashion_mnist(data_dir, download=True)
        except DataError as err:
            raise SystemExit(f"demo.py: error: --data-dir {data_dir}: {err} Or run on a synthetic stand-in "
                             "with --synthetic.") from None
        return folder, f"data: Fashion-MNIST in {folder}"
    try:
        folder = locate_fashion_mnist(None, download=True)
    except DataError as err:
        folder = write_synthetic_fashion_mnist(output / "synthetic-data", num_train=512, num_test=128)
        return folder, (f"data: Fashion-MNIST is NOT INSTALLED, so this demo trains on a SYNTHETIC stand-in (one "
                        f"noisy box per class, no garments) in {folder}; the grids will show boxes. {err}")
    return folder, f"data: Fashion-MNIST in {folder}"


def busy_cores(window_s: float = 0.5) -> float | None:
    """Cores that other processes keep busy now: the machine's busy share over `window_s`, from /proc/stat
    (Linux), times its number of cores. None where that cannot be read. (The load average would still count
    the set-up's pip install run just before the demo.)"""
    def read() -> tuple[int, int, int]:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        fields = [int(v) for v in lines[0].split()[1:]]
        cores = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle, cores

    try:
        total0, idle0, cores = read()
        time.sleep(window_s)
        total1, idle1, _ = read()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return cores * (1.0 - (idle1 - idle0) / (total1 - total0))


def choose_threads(requested: int, cores: int) -> tuple[int, str | None]:
    """Threads for the CPU work: `requested`, or (0) `cores` (torch's default) less the cores that other
    processes keep busy now, and a line saying why where that is fewer.

    Where other processes keep every core busy, torch's threads wait on each other: while another process
    kept both of 2 cores busy, a training step of the tiny DiT at batch 32 took about 4 s on 2 threads and
    0.09 s on 1."""
    if requested > 0:
        return requested, None
    busy = busy_cores()
    threads = cores if busy is None else max(1, min(cores, cores - int(busy + 0.5)))
    if threads == cores:
        return cores, None
    return threads, (f"threads: {threads} of {cores}, since other processes keep about {busy:.1f} cores busy; "
                     "--threads N to choose")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo.py", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=train.positive_int, default=2000, help="training steps of each run; default: 2000")
    p.add_argument("--routes", type=parse_routes, default=[(1, 4, 0.5)], metavar="START:END:RATIO[,...]",
                   help="routes for the tiny DiT's 6 blocks (END inclusive; 'tread' for TREAD's rule); default: 1:4:0.5")
    p.add_argument("--batch-size", type=train.positive_int, default=32, help="default: 32")
    p.add_argument("--output", default="outputs/demo", help="default: outputs/demo")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data-dir", default=None,
                      help=f"Fashion-MNIST's idx .gz files; default: {DEFAULT_DATA_DIR} (Debian's "
                           "dataset-fashion-mnist), or a synthetic stand-in where that is not installed")
    data.add_argument("--synthetic", action="store_true", help="train on a synthetic stand-in (boxes, no garments)")
    p.add_argument("--threads", type=train.non_negative_int, default=0,
                   help="CPU threads; default: 0 (torch's default, fewer where other processes keep cores busy)")
    p.add_argument("--samples-per-class", type=train.positive_int, default=8, help="grid columns; default: 8")
    p.add_argument("--sample-steps", type=train.positive_int, default=32, help="flow Euler steps; default: 32")
    p.add_argument("--timing-rounds", type=train.non_negative_int, default=7,
                   help="interleaved repetitions of 10 steps of each model for the speed figure; default: 7")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(train.joined_negative_values(sys.argv[1:] if argv is None else argv))
    if args.routes is None:
        parser.error("--routes none: the demo compares a routed run with an unrouted one; give START:END:RATIO, "
                     "e.g. 1:4:0.5")
    output = Path(args.output)

    # --- before any work: routes valid for the model, data found, threads settled --------------------------
    model = build_model("dit", "tiny")
    depth, params = stack_depth(model), sum(p.numel() for p in model.parameters())
    routes = tread_routes(depth) if args.routes == "tread" else args.routes
    try:
        model = tokenroute.wrap(model, routes=routes, seed=0)  # the one line
    except tokenroute.RouteError as err:
        raise SystemExit(f"demo.py: error: --routes {format_routes(routes)}: {err} (the tiny DiT has "
                         f"{depth} blocks, 0..{depth - 1})") from None
    data_folder, data_line = resolve_data(args.data_dir, args.synthetic, output)
    output.mkdir(parents=True, exist_ok=True)
    cores = torch.get_num_threads()
    threads, threads_line = choose_threads(args.threads, cores)
    torch.set_num_threads(threads)
    try:
        return _run(args, routes, model, depth, params, output, data_folder, data_line, cores, threads_line)
    finally:
        torch.set_num_threads(cores)


def _run(args: argparse.Namespace, routes: list[tuple[int, int, float]], model: nn.Module, depth: int, params: int,
         output: Path, data_folder: Path, data_line: str, cores: int, threads_line: str | None) -> dict[str, Any]:
    """Print the plan, run the comparison under one progress bar, print the speed figure and the grids."""
    threads = torch.get_num_threads()
    print(f"tokenroute demo: a tiny DiT ({params / 1e6:.2f}M parameters, {depth} blocks, 64 tokens of 4x4 "
          f"pixels) trained for {args.steps} steps of batch {args.batch_size} without routing, then with routes "
          f"{format_routes(routes)}; rectified flow, on {threads} CPU thread(s)")
    print(data_line)
    if threads_line:
        print(threads_line)
    print()
    x = torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE)
    print(tokenroute.explain(model, x, torch.zeros(2), torch.zeros(2, dtype=torch.long)))
    print(flush=True)

    total = 2 * args.steps + timing_steps(args.timing_rounds)
    progress = DemoProgress(total, enabled=not args.no_progress)
    threads_used = {}

    def settle_threads(phase: str) -> None:
        """Choose the threads again before each phase: another process may have started or stopped since."""
        if not args.threads and phase != "baseline run":
            now, why = choose_threads(0, cores)
            if now != torch.get_num_threads():
                progress.write(f"{phase}: {why or f'threads: {now} of {cores}, the cores are free again'}")
                torch.set_num_threads(now)
        threads_used[phase] = torch.get_num_threads()

    try:
        result = compare_routing("dit", "tiny", steps=args.steps, routes=routes, batch_size=args.batch_size,
                                 output=output, data_dir=data_folder, sample_steps=args.sample_steps,
                                 samples_per_class=args.samples_per_class, timing_rounds=args.timing_rounds,
                                 progress=progress, before_phase=settle_threads)
    finally:
        progress.close()
    result["data_line"], result["threads"] = data_line, threads_used
    write_json(result, output / "comparison.json")

    base, routed, flops, timing = result["baseline"], result["routed"], result["flops"], result["interleaved_timing"]
    print()
    flop_text = (f"{100 * flops['saving']:.1f}% fewer FLOPs per training step (FLOP-ideal speed-up "
                 f"{flops['flop_speedup']:.2f}x)")
    if timing:
        print(f"speed: routed training steps are {timing['speedup']:.2f}x as fast as unrouted ones "
              f"({1000 * timing['routed_s']:.1f} ms against {1000 * timing['unrouted_s']:.1f} ms at batch "
              f"{result['batch_size']}); {flop_text}")
        print(f"       (measured as the benchmarks measure: the two models' steps interleaved after warm-up, "
              f"median of {timing['rounds']} repetitions of {timing['steps_per_round']} steps, "
              f"{result['threads'].get('timing', torch.get_num_threads())} CPU thread(s))")
    else:
        print(f"speed: not timed (--timing-rounds 0); {flop_text}")
    print(f"final training loss after {result['steps']} steps: baseline {base['final_loss']:.4f}, "
          f"routed {routed['final_loss']:.4f}")
    print(f"sample grids, one class per row ({', '.join(CLASSES)}):")
    print(f"  baseline: {base['samples']}")
    print(f"  routed:   {routed['samples']}")
    print(f"everything else (loss curves, each run's summary, comparison.json): {result['output']}")
    return result


if __name__ == "__main__":
    main()
