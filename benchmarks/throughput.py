"""Routed training speed against the FLOP limit and a hand-written TREAD.

For each backbone, four variants of one training step (forward + backward + AdamW, bf16 autocast on a GPU)
share one model and optimizer and are timed side by side, interleaved, after warm-up, with CUDA events;
each repetition times ``--steps`` steps of every variant in a rotating order, and the figure is the median
over repetitions:

  unwrapped    the model's own forward
  wrapped_off  tokenroute.wrap applied, routing switched off (tokenroute.routing(model, enabled=False))
  routed       tokenroute.wrap with the paper's routes
  handwritten  TREAD written by hand in the model's forward loop, same routes (benchmarks/handwritten.py)
  masked       MaskDiT (tokenroute.mask, half the tokens dropped, a 2-block decoder) on a copy of the model

    python benchmarks/throughput.py                 # GPU: DiT-B/2, DiT-XL/2, U-ViT-M/2, Mamba-B/2
    python benchmarks/throughput.py --compile       # the same under torch.compile
    python benchmarks/throughput.py --smoke         # CPU, tiny models, seconds
    python benchmarks/throughput.py --largest-batch 4096   # at the unrouted largest batch, then each at its own
    python benchmarks/throughput.py --compile-only --models DiT-B/2 --append --output FILE   # one model per run

Every step runs with fused AdamW (what a performance-minded user runs) and with the unfused one
(``--optimizer``). ``--largest-batch CAP`` times the variants at the largest batch (up to CAP) the unrouted model
fits, then each variant at its own largest batch, with peak memory (the masked variant's copy of the model stays
on the GPU throughout, so every variant's largest batch has the same memory left to it).
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

import tokenroute
from tokenroute.models import DiffusionMamba, DiT, UViT
from tokenroute.training import flop_counter, flops_by_category

from common import RESULTS, Timer, bench_device, earlier_payload, environment, median, write_json
from handwritten import HANDWRITTEN


@dataclass
class Config:
    name: str
    build: Callable[[], torch.nn.Module]
    batch: int
    routes: list[tuple[int, int, float]]


GPU_CONFIGS = [
    Config("DiT-B/2", lambda: DiT.from_preset("DiT-B/2", num_classes=1000), 256, [(2, 8, 0.5)]),
    Config("DiT-XL/2", lambda: DiT.from_preset("DiT-XL/2", num_classes=1000), 64, [(2, 24, 0.5)]),
    Config("U-ViT-M/2", lambda: UViT.from_preset("U-ViT-M/2", num_classes=1000), 256, [(2, 13, 0.5)]),
    Config("Mamba-B/2", lambda: DiffusionMamba.from_preset("Mamba-B/2", num_classes=1000), 128, [(2, 8, 0.5)]),
]
SMOKE_CONFIGS = [
    Config("DiT-tiny", lambda: DiT(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=6, num_heads=4), 8, [(1, 4, 0.5)]),
    Config("U-ViT-tiny", lambda: UViT(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=7, num_heads=4), 8, [(1, 5, 0.5)]),
    Config("Mamba-tiny", lambda: DiffusionMamba(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=6, headdim=32), 8, [(1, 4, 0.5)]),
]
VARIANTS = ["unwrapped", "wrapped_off", "routed", "handwritten", "masked"]


def forwards(model: torch.nn.Module, routes, compile_: bool) -> dict[str, Callable[..., torch.Tensor]]:
    """One forward callable per variant, all on the same (wrapped) model and parameters."""
    unwrapped = functools.partial(type(model).forward, model)  # the class's forward: the model as it was

    def wrapped_off(*a):
        with tokenroute.routing(model, enabled=False):
            return model(*a)

    handwritten = functools.partial(HANDWRITTEN[type(model)], model, routes=routes)
    fns = {"unwrapped": unwrapped, "wrapped_off": wrapped_off, "routed": model, "handwritten": handwritten}
    if compile_:
        fns = {k: torch.compile(v) for k, v in fns.items()}
    return fns


def make_step(forward, optimizer, inputs, autocast: bool) -> Callable[[], None]:
    x, t, y = inputs
    device_type = x.device.type

    def step() -> None:
        try:
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
                loss = forward(x, t, y).float().square().mean()
            loss.backward()
            optimizer.step()
        finally:  # a step that ran out of memory leaves no gradients behind
            optimizer.zero_grad(set_to_none=True)

    return step


def random_inputs(model: torch.nn.Module, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Random data of the real shape: latents, timesteps, class labels."""
    embed = model.x_embedder if hasattr(model, "x_embedder") else model.patch_embed
    c, h = model.in_channels, embed.img_size[0]
    return (torch.randn(batch, c, h, h, device=device), torch.rand(batch, device=device) * 1000,
            torch.randint(0, model.num_classes, (batch,), device=device))


def step_flops(forward, inputs) -> dict[str, int]:
    """FLOPs of one training step (forward, loss, backward) by category (matmul, attention)."""
    with flop_counter() as counter:
        forward(*inputs).float().square().mean().backward()
    return flops_by_category(counter)


def variant_flops(fns: dict[str, Callable[..., torch.Tensor]], inputs) -> dict[str, dict[str, int]]:
    """FLOPs of one training step of each variant, by category. A wrapped model traces its graph at its first
    routed forward: that forward runs before the counts, outside them. The gradients the counts leave are
    cleared."""
    models = [fn for fn in fns.values() if isinstance(fn, torch.nn.Module)]
    for model in models:
        if tokenroute.is_wrapped(model):
            model(*inputs)
    flops = {k: step_flops(fn, inputs) for k, fn in fns.items()}
    for model in models:
        model.zero_grad(set_to_none=True)
    return flops


def scaled_flops(fns: dict[str, Callable[..., torch.Tensor]], model: torch.nn.Module, counted_batch: int,
                 device: torch.device) -> Callable[[int], dict[str, int]]:
    """``variant_flops`` in all, counted once at ``counted_batch`` and scaled to any batch (FLOPs are linear in
    it): the count runs in fp32 without autocast, so a batch that fills the GPU in bf16 would not fit it."""
    counted = {k: sum(v.values()) for k, v in variant_flops(fns, random_inputs(model, counted_batch, device)).items()}
    return lambda batch: {k: round(f * batch / counted_batch) for k, f in counted.items()}


def time_steps(step_fns: dict[str, Callable[[], None]], device: torch.device, steps: int, warmup: int,
               reps: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Each variant's milliseconds per step in every repetition (``steps`` steps each, variants interleaved in a
    rotating order, after ``warmup`` steps: compilation, autotuning, allocator) and its peak memory in bytes.
    Running out of memory raises with a note naming the variant and the memory then in use."""
    timer = Timer(device)
    names = list(step_fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    peak: dict[str, int] = {k: 0 for k in names}
    k = names[0]
    try:
        for k, fn in step_fns.items():
            began = time.perf_counter()
            for _ in range(warmup):
                fn()
            # progress: under --compile the warm-up compiles, and a run cut short by a time limit shows how far it got
            print(f"  warmed up {k} in {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
        for rep in range(reps):
            for k in names[rep % len(names):] + names[: rep % len(names)]:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                times[k].append(timer(step_fns[k], steps))
                if device.type == "cuda":
                    peak[k] = max(peak[k], torch.cuda.max_memory_allocated())
    except torch.OutOfMemoryError as err:
        if device.type != "cuda":
            raise
        free, total = torch.cuda.mem_get_info()  # what the device has left beyond the allocator's reserve
        err.add_note(f"out of memory in {k}'s step with {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated, "
                     f"{torch.cuda.memory_reserved() / 2**30:.1f} GiB reserved, {free / 2**30:.1f} of the device's "
                     f"{total / 2**30:.1f} GiB free")
        raise
    return times, peak


def fits(step: Callable[[], None], device: torch.device) -> bool:
    """Whether training steps run without running out of GPU memory: two in a row, the second in the allocator's
    steady state (what they allocated is freed either way)."""
    try:
        step()
        step()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def largest_batch(step_at: Callable[[int], Callable[[], None]], start: int, cap: int, device: torch.device) -> int:
    """The largest batch (up to ``cap``) whose training step fits: doubling from ``start``, then bisecting."""
    if start > cap:
        raise SystemExit(f"--largest-batch {cap} is below the configured batch {start}; give a larger cap")
    low, high = 0, None
    batch = start
    while batch <= cap:
        if fits(step_at(batch), device):
            low, batch = batch, batch * 2
        else:
            high = batch
            break
    if low == 0:
        raise SystemExit(f"a batch of {start} does not fit; start lower")
    high = high or min(batch, cap + 1)
    while high - low > max(1, low // 16):  # to within about 6%
        middle = (low + high) // 2
        low, high = (middle, high) if fits(step_at(middle), device) else (low, middle)
    return low


def time_stepping_down(steps_for: Callable[[dict[str, int]], dict[str, Callable[[], None]]], batches: dict[str, int],
                       device: torch.device, steps: int, warmup: int, reps: int,
                       ) -> tuple[dict[str, int], dict[str, list[float]], dict[str, int]]:
    """`time_steps` of the variants at ``batches`` (name: batch; ``steps_for`` makes their steps). A batch that
    fit a variant alone may not fit interleaved with the others (their optimizer states, the allocator's
    fragmentation): on running out of memory every batch steps down by 1/16, up to 4 times. Returns the
    batches timed, the times and the peak memory."""
    failures = []
    for _ in range(4):
        try:
            times, peak = time_steps(steps_for(batches), device, steps, warmup, reps)
            return batches, times, peak
        except torch.OutOfMemoryError as err:
            failures.append(f"batches {batches}: {'; '.join(getattr(err, '__notes__', []))}")
            print(f"stepping down: {failures[-1]}", file=sys.stderr, flush=True)
        torch.cuda.empty_cache()  # after the except block: the error's frames no longer hold the failed step's tensors
        batches = {name: b * 15 // 16 for name, b in batches.items()}
    raise SystemExit("the variants' largest batches do not run interleaved (" + " | ".join(failures)
                     + "); give a smaller --largest-batch cap")


def own_largest_batches(variants: dict[str, tuple[Callable[..., torch.Tensor], Any, torch.nn.Module]],
                        known: dict[str, int], device: torch.device, steps: int, warmup: int, reps: int,
                        cap: int) -> dict[str, Any]:
    """Each variant (name: forward, optimizer, model) at its own largest batch, from the unrouted model's
    (``known``) up to ``cap`` (routing frees memory: the gain a user gets): images/s and peak memory, variants
    interleaved, medians."""
    alone = dict(known)
    start = max(known.values())
    for name, variant in variants.items():
        if name not in alone:
            alone[name] = largest_batch(step_at(*variant, device), start, cap, device)
    chosen, times, peak = time_stepping_down(
        lambda batches: {name: step_at(*variant, device)(batches[name]) for name, variant in variants.items()},
        alone, device, steps, warmup, reps)
    return {name: {"batch": chosen[name], "batch_fitting_alone": alone[name], "ms_per_step": median(times[name]),
                   "images_per_s": chosen[name] * 1000 / median(times[name]), "peak_memory_gib": peak[name] / 2**30}
            for name in variants}


def shared_batch_steps(fns: dict[str, Callable[..., torch.Tensor]], optimizers: dict[str, Any], model: torch.nn.Module,
                       device: torch.device) -> Callable[[dict[str, int]], dict[str, Callable[[], None]]]:
    """batches -> one training step per variant, all on the same random inputs (the variants' common batch)."""
    def steps_for(batches: dict[str, int]) -> dict[str, Callable[[], None]]:
        inputs = random_inputs(model, max(batches.values()), device)
        return {k: make_step(fns[k], optimizers[k], inputs, device.type == "cuda") for k in optimizers}

    return steps_for


def step_at(forward: Callable[..., torch.Tensor], optimizer: Any, model: torch.nn.Module,
            device: torch.device) -> Callable[[int], Callable[[], None]]:
    """batch -> one training step of ``forward`` on random inputs of that batch."""
    return lambda batch: make_step(forward, optimizer, random_inputs(model, batch, device), device.type == "cuda")


def bench(config: Config, device: torch.device, steps: int, warmup: int, reps: int, compile_: bool,
          fused: bool = False, batch_cap: int | None = None) -> dict[str, Any]:
    """The variants side by side at the configured batch, or with ``batch_cap`` at the largest batch (up to the
    cap) the unrouted model fits, then each variant at its own largest batch."""
    torch.manual_seed(0)
    model = config.build().to(device).train()
    masked = copy.deepcopy(model)
    tokenroute.wrap(model, config.routes, seed=0)
    decoder = 2 if isinstance(masked, UViT) else tokenroute.Decoder(depth=2)  # U-ViT: its last 2 blocks decode
    tokenroute.mask(masked, 0.5, decoder=decoder, seed=0)
    masked.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    masked_optimizer = torch.optim.AdamW(masked.parameters(), lr=1e-4, fused=fused)
    fns = forwards(model, config.routes, compile_)
    fns["masked"] = torch.compile(masked) if compile_ else masked
    optimizers = {k: masked_optimizer if k == "masked" else optimizer for k in VARIANTS}
    batch = config.batch
    if batch_cap:  # the batch that fills the GPU for the unrouted model, searched once every variant has stepped
        for k, f in fns.items():  # (the optimizers' states and the wrap's traced graph take their memory first)
            step_at(f, optimizers[k], model, device)(config.batch)()
        batch = largest_batch(step_at(fns["unwrapped"], optimizer, model, device), config.batch, batch_cap, device)
    batch_fitting_alone = batch

    flops_at = scaled_flops({**forwards(model, config.routes, False), "masked": masked}, model, config.batch, device)

    batches, times, peak = time_stepping_down(shared_batch_steps(fns, optimizers, model, device),
                                              dict.fromkeys(VARIANTS, batch), device, steps, warmup, reps)
    batch = batches[VARIANTS[0]]
    flops = flops_at(batch)
    ms = {k: median(v) for k, v in times.items()}
    ideal = flops["unwrapped"] / flops["routed"]
    achieved = ms["unwrapped"] / ms["routed"]
    result = {
        "model": config.name, "batch": batch, "routes": config.routes, "compile": compile_,
        **({"batch_fitting_alone": batch_fitting_alone} if batch_cap else {}),
        "optimizer": "AdamW, fused" if fused else "AdamW",
        "tokens": model.x_embedder.num_patches if hasattr(model, "x_embedder") else model.patch_embed.num_patches,
        "variants": {k: {"ms_per_step": ms[k], "images_per_s": batch * 1000 / ms[k],
                         "peak_memory_gib": peak[k] / 2**30, "flops_per_step": flops[k],
                         "ms_per_step_each_repetition": times[k]} for k in VARIANTS},
        "ideal_speedup": ideal,
        "achieved_speedup": achieved,
        "achieved_over_ideal": achieved / ideal,
        "routed_over_handwritten_time": ms["routed"] / ms["handwritten"],
        "wrapped_off_over_unwrapped_time": ms["wrapped_off"] / ms["unwrapped"],
        "handwritten_speedup": ms["unwrapped"] / ms["handwritten"],
        "masked_ideal_speedup": flops["unwrapped"] / flops["masked"],
        "masked_speedup": ms["unwrapped"] / ms["masked"],
    }
    if batch_cap:
        result["own_largest_batch"] = own_largest_batches(
            {"unwrapped": (fns["unwrapped"], optimizer, model), "routed": (fns["routed"], optimizer, model),
             "masked": (fns["masked"], masked_optimizer, masked)}, {"unwrapped": batch}, device, steps, warmup, reps,
            batch_cap)
    del model, masked, optimizer, masked_optimizer, optimizers, fns
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


TARGETS = {"achieved_over_ideal_dit_xl2": 0.98, "achieved_over_ideal": 0.95, "routed_over_handwritten_time": 1.01,
           "wrapped_off_over_unwrapped_time": 1.01}


def floor_target(model: str) -> str:
    """The achieved / FLOP-ideal target that applies to ``model`` (a name in TARGETS)."""
    return "achieved_over_ideal_dit_xl2" if model == "DiT-XL/2" else "achieved_over_ideal"


def meets_targets(result: dict[str, Any]) -> dict[str, bool]:
    """Each target that applies to this result, and whether the result meets it (time ratios within 1%)."""
    floor = floor_target(result["model"])
    return {floor: result["achieved_over_ideal"] >= TARGETS[floor],
            "routed_over_handwritten_time": result["routed_over_handwritten_time"] <= TARGETS["routed_over_handwritten_time"],
            "wrapped_off_over_unwrapped_time": abs(result["wrapped_off_over_unwrapped_time"] - 1)
            <= TARGETS["wrapped_off_over_unwrapped_time"] - 1}


# Settings that must agree for --append to put results side by side (with the device and torch version).
APPEND_MATCH = ("steps_per_repetition", "repetitions", "warmup_steps", "autocast", "optimizer", "largest_batch_cap",
                "tf32", "cuda_alloc_conf")


def add_result(results: list[dict[str, Any]], result: dict[str, Any]) -> list[dict[str, Any]]:
    """``results`` with ``result`` added, in place of an earlier one of the same model, mode and optimizer."""
    def key(r: dict[str, Any]) -> tuple:
        return r["model"], r["compile"], r["optimizer"]

    return [r for r in results if key(r) != key(result)] + [result]


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.6 + 2.2 * len(results), 4))
    width = 0.8 / (len(VARIANTS) + 1)
    for i, r in enumerate(results):
        base = r["variants"]["unwrapped"]["ms_per_step"]
        for j, k in enumerate(VARIANTS):
            speed = base / r["variants"][k]["ms_per_step"]
            ax.bar(i + j * width, speed, width, color=f"C{j}", label=k if i == 0 else None)
        ax.bar(i + len(VARIANTS) * width, r["ideal_speedup"], width, color="none", edgecolor="k", hatch="//",
               label="FLOP ideal of routed" if i == 0 else None)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(results))],
                  [f"{r['model']}\nbatch {r['batch']}{' compiled' if r['compile'] else ''}"
                   f"{' fused' if 'fused' in r.get('optimizer', '') else ''}" for r in results])
    ax.set_ylabel("training-step speed-up over unwrapped")
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, never over them
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models, a few steps")
    parser.add_argument("--compile", action="store_true", help="also time every variant under torch.compile")
    parser.add_argument("--compile-only", action="store_true", help="time the variants under torch.compile only")
    parser.add_argument("--models", default=None, help="comma-separated names to run (default: all)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--optimizer", choices=("fused", "unfused", "both"), default="both",
                        help="AdamW(fused=True), the one a performance-minded user runs, the unfused one, or both")
    parser.add_argument("--largest-batch", type=int, default=None, metavar="CAP",
                        help="time at the unrouted model's largest batch (up to CAP), then each variant at its own")
    parser.add_argument("--append", action="store_true",
                        help="keep the results already in --output (same settings, device and torch required) and add "
                             "or redo these: one model per run (each under a time limit) makes one file")
    args = parser.parse_args(argv)

    device = bench_device(cpu=args.smoke)
    configs = SMOKE_CONFIGS if args.smoke else GPU_CONFIGS
    if args.models:
        wanted = args.models.split(",")
        configs = [c for c in configs if c.name in wanted]
    steps = args.steps or (2 if args.smoke else 10)
    reps = args.reps or (2 if args.smoke else 7)
    warmup = args.warmup or (1 if args.smoke else 5)

    out = args.output or RESULTS / ("throughput_smoke.json" if args.smoke else "throughput.json")
    payload = {"benchmark": "throughput", "environment": environment(),
               "config": {"steps_per_repetition": steps, "repetitions": reps, "warmup_steps": warmup,
                          "autocast": "bf16" if device.type == "cuda" else None,
                          "optimizer": f"AdamW lr 1e-4 ({args.optimizer})", "largest_batch_cap": args.largest_batch,
                          "tf32": device.type == "cuda",
                          "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")},
               "targets": TARGETS,
               "results": []}
    if args.append and out.is_file():
        payload["results"] = earlier_payload(out, payload, APPEND_MATCH, (("environment", "device"),
                                                                          ("environment", "torch")),
                                             "throughput.py").get("results", [])
    modes = [True] if args.compile_only else [False, True] if args.compile else [False]
    optimizers = {"fused": [True], "unfused": [False], "both": [False, True]}[args.optimizer]
    for compile_, fused, config in ((c, f, m) for c in modes for f in optimizers for m in configs):
        r = bench(config, device, steps, warmup, reps, compile_, fused, args.largest_batch)
        r["meets_targets"] = meets_targets(r)
        payload["results"] = add_result(payload["results"], r)
        write_json(out, payload)  # after every model: a run cut short keeps what it measured
        v = r["variants"]
        print(f"{r['model']:>10} {'compiled' if compile_ else 'eager':>8} {r['optimizer']:>12} batch {r['batch']}: "
              + "  ".join(f"{k} {v[k]['ms_per_step']:.1f} ms" for k in VARIANTS)
              + f"  | ideal {r['ideal_speedup']:.2f}x achieved {r['achieved_speedup']:.2f}x "
              f"({r['achieved_over_ideal']:.2f} of ideal), routed/handwritten {r['routed_over_handwritten_time']:.3f}, "
              f"wrapped_off/unwrapped {r['wrapped_off_over_unwrapped_time']:.3f}; masked {r['masked_speedup']:.2f}x "
              f"(ideal {r['masked_ideal_speedup']:.2f}x)", flush=True)
    plot(payload["results"], out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
