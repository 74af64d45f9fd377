"""Where a routed training step's time goes: kernel time by category, unwrapped against routed.

throughput.py reports achieved / FLOP-ideal speed-up; when it falls short, this script says why. It profiles
the same training step (forward + backward + AdamW, bf16 autocast) of one model with torch.profiler, for the
unwrapped and the routed variant, and sums the device time of every kernel into four categories:

  matmul     GEMMs (the FLOPs that routing removes)
  attention  fused attention kernels (their FLOPs shrink quadratically with the tokens kept)
  optimizer  the AdamW update (a fixed cost: it touches every parameter whatever the token count)
  gather_scatter  gathers, scatters and indexing (a route's token selection)
  copy       copies and dtype casts (autocast's weight casts, contiguous copies): a per-parameter share does not
             shrink with the tokens
  other      everything else: norms, activations, modulation, embeddings

The speed-up of each category, and the achieved / ideal ratio with the optimizer's fixed cost taken out,
show whether a shortfall lies in the routed blocks' kernels or in costs routing cannot touch; the kernels that
take the unwrapped step longest are listed one by one (``--top``), with their speed-up. A kernel's name changes
with the template its shapes select, so the list also sums kernel time by the operator that launched it
(``aten::native_layer_norm_backward``, say) and names the operators whose routed time exceeds the tokens' ratio
most: those hold the shortfall, whatever their kernels are called.

    python benchmarks/profile_step.py --models DiT-XL/2 --compile     # GPU
    python benchmarks/profile_step.py --models DiT-XL/2 --optimizer fused --batch 160   # where the step fills an H100
    python benchmarks/profile_step.py --smoke                         # CPU, tiny model, seconds
    python benchmarks/profile_step.py --flops-only --models DiT-XL/2,U-ViT-M/2,Mamba-B/2   # CPU: FLOPs by category
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import tokenroute

from common import RESULTS, Timer, bench_device, environment, write_json
from throughput import GPU_CONFIGS, SMOKE_CONFIGS, Config, forwards, make_step, random_inputs, variant_flops

CATEGORIES = {  # first match wins; names cover CUDA kernels and, for the CPU smoke run, aten ops
    "optimizer": ("multi_tensor_apply", "adam", "_foreach"),
    "attention": ("flash", "fmha", "sdpa", "attention", "scaled_dot_product"),
    "matmul": ("gemm", "nvjet", "cutlass", "xmma", "aten::mm", "aten::addmm", "aten::bmm"),
    "gather_scatter": ("gather", "scatter", "index"),
    "copy": ("copy",),
}
VARIANTS = ("unwrapped", "routed")


def category(name: str) -> str:
    lowered = name.lower()
    for key, patterns in CATEGORIES.items():
        if any(p in lowered for p in patterns):
            return key
    return "other"


def kernel_ms(step, steps: int, device: torch.device) -> tuple[dict[str, float], dict[str, float]]:
    """Device time per step (ms) from a profile of ``steps`` steps: of every kernel by name, and of the kernels
    each aten operator launched itself, by operator. On the CPU both are the operators' own CPU time."""
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    operators: dict[str, float] = {}
    for event in prof.key_averages():
        kernel = event.device_type == torch.autograd.DeviceType.CUDA
        us = event.self_device_time_total if cuda else event.self_cpu_time_total  # its own kernels', or its own
        if kernel or not cuda:
            kernels[event.key] = kernels.get(event.key, 0.0) + us / 1000 / steps
        if not kernel and event.key.startswith("aten::") and us > 0:  # an operator, by what it launched itself
            operators[event.key] = operators.get(event.key, 0.0) + us / 1000 / steps
    return kernels, operators


def by_category(kernels: dict[str, float]) -> dict[str, float]:
    """Kernel times summed into the categories."""
    totals = dict.fromkeys([*CATEGORIES, "other"], 0.0)
    for name, ms in kernels.items():
        totals[category(name)] += ms
    return totals


def _listed(times: dict[str, dict[str, float]], names: list[str], kind: str) -> list[dict[str, Any]]:
    """One row per name: its category and its time in both variants (0 where a variant runs none of it)."""
    unwrapped, routed = times["unwrapped"], times["routed"]
    return [{kind: name[:200], "category": category(name), "unwrapped_ms": unwrapped.get(name, 0.0),
             "routed_ms": routed.get(name, 0.0),
             "speedup": unwrapped[name] / routed[name] if routed.get(name) and unwrapped.get(name) else None}
            for name in names]


def top_kernels(kernels: dict[str, dict[str, float]], count: int) -> list[dict[str, Any]]:
    """The ``count`` kernels that take the unwrapped step longest, each with its time in both variants: which
    kernels fall short of the share of tokens the routed blocks keep (a category's total does not say)."""
    return _listed(kernels, sorted(kernels["unwrapped"], key=kernels["unwrapped"].get, reverse=True)[:count], "kernel")


def operators_over_tokens(operators: dict[str, dict[str, float]], count: int, tokens_ratio: float
                          ) -> list[dict[str, Any]]:
    """The ``count`` operators whose routed time exceeds their unwrapped time over ``tokens_ratio`` (what work
    that scales with the tokens kept allows) by the most, with that excess: where the routed step's shortfall
    lies. Operators only the routed step runs (the routing draw, the gathers) count in full."""
    names = set(operators["unwrapped"]) | set(operators["routed"])

    def excess(name: str) -> float:
        return operators["routed"].get(name, 0.0) - operators["unwrapped"].get(name, 0.0) / tokens_ratio

    ranked = sorted(names, key=excess, reverse=True)[:count]
    return [{**row, "excess_ms": excess(name)} for name, row in zip(ranked, _listed(operators, ranked, "operator"))]


def wrapped_model(config: Config, device: torch.device) -> torch.nn.Module:
    """``config``'s model in training mode with its routes, seeded as every run of this script is."""
    torch.manual_seed(0)
    model = config.build().to(device).train()
    return tokenroute.wrap(model, config.routes, seed=0)


def flop_ideals(model: torch.nn.Module, config: Config, batch: int, device: torch.device) -> dict[str, Any]:
    """The wrapped ``model``'s training-step FLOPs by category, unwrapped and routed, and the speed-ups they allow
    in all and per category (matmuls fall with the tokens kept, attention with their square). Counted at
    ``batch``: the ratios do not depend on it."""
    eager = forwards(model, config.routes, False)
    counted = variant_flops({k: eager[k] for k in VARIANTS}, random_inputs(model, batch, device))
    unwrapped, routed = counted["unwrapped"], counted["routed"]
    return {"flops_counted_at_batch": batch, "flops_by_category": counted,
            "ideal_speedup": sum(unwrapped.values()) / sum(routed.values()),
            "ideal_speedup_by_category": {c: unwrapped[c] / routed[c] for c in unwrapped if routed.get(c)}}


def profile_model(config: Config, device: torch.device, steps: int, warmup: int, compile_: bool,
                  fused: bool = False, batch: int | None = None, top: int = 25) -> dict[str, Any]:
    model = wrapped_model(config, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    batch = batch or config.batch
    inputs = random_inputs(model, batch, device)
    flops = flop_ideals(model, config, config.batch, device)  # at the configured batch: the count runs in fp32
    fns = forwards(model, config.routes, compile_)
    steps_fn = {k: make_step(fns[k], optimizer, inputs, device.type == "cuda") for k in VARIANTS}
    for fn in steps_fn.values():
        for _ in range(warmup):
            fn()
    step_ms = {k: Timer(device)(steps_fn[k], steps) for k in VARIANTS}  # unprofiled, for comparison
    profiled = {k: kernel_ms(steps_fn[k], steps, device) for k in VARIANTS}
    kernels, operators = ({k: v[i] for k, v in profiled.items()} for i in (0, 1))
    ms = {k: by_category(v) for k, v in kernels.items()}
    if not all(sum(v.values()) > 0 for v in ms.values()):
        raise RuntimeError("the profile recorded no kernel time: is this torch's profiler built with CUDA support?")
    total = {k: sum(v.values()) for k, v in ms.items()}
    ideal = flops["ideal_speedup"]
    tokens_ratio = flops["ideal_speedup_by_category"]["matmul"]  # the linear layers' FLOPs fall with the tokens kept
    without_optimizer = {k: total[k] - ms[k]["optimizer"] for k in VARIANTS}
    result = {
        "model": config.name, "batch": batch, "routes": config.routes, "compile": compile_,
        "optimizer": "AdamW, fused" if fused else "AdamW", "step_ms": step_ms,
        "kernel_ms_per_step": ms,
        "kernel_ms_total": total,
        "share_of_unwrapped": {c: ms["unwrapped"][c] / total["unwrapped"] for c in ms["unwrapped"]},
        "speedup_by_category": {c: ms["unwrapped"][c] / ms["routed"][c] if ms["routed"][c] else None
                                for c in ms["unwrapped"]},
        "ideal_speedup": ideal,
        "ideal_speedup_by_category": flops["ideal_speedup_by_category"],
        "kernel_speedup": total["unwrapped"] / total["routed"],
        "kernel_achieved_over_ideal": total["unwrapped"] / total["routed"] / ideal,
        "achieved_over_ideal_without_optimizer": without_optimizer["unwrapped"] / without_optimizer["routed"] / ideal,
        "top_kernels": top_kernels(kernels, top),
        "tokens_ratio": tokens_ratio,
        "operator_ms_per_step": operators,
        "operators_over_tokens_ratio": operators_over_tokens(operators, top, tokens_ratio),
    }
    del model, optimizer, fns, steps_fn
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def count_flops(configs: list[Config], batch: int, out: Path) -> None:
    """``flop_ideals`` of each model on the CPU, into ``out``: the per-category ideals of profiles made before
    profiles recorded them."""
    device = torch.device("cpu")
    payload = {"benchmark": "profile_flops", "environment": environment(), "config": {"batch": batch}, "results": []}
    for config in configs:
        payload["results"].append({"model": config.name, "routes": config.routes,
                                   **flop_ideals(wrapped_model(config, device), config, batch, device)})
        write_json(out, payload)
        r = payload["results"][-1]
        print(f"{config.name}: ideal {r['ideal_speedup']:.3f}x; "
              + ", ".join(f"{c} {x:.3f}x" for c, x in r["ideal_speedup_by_category"].items()), flush=True)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, a few steps")
    parser.add_argument("--models", default="DiT-XL/2", help="comma-separated names from throughput.py")
    parser.add_argument("--compile", action="store_true", help="also profile under torch.compile")
    parser.add_argument("--optimizer", choices=("unfused", "fused"), default="unfused",
                        help="AdamW's foreach (PyTorch's default) or fused implementation")
    parser.add_argument("--batch", type=int, default=None, help="default: each model's batch in throughput.py")
    parser.add_argument("--steps", type=int, default=None, help="profiled steps per variant")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--top", type=int, default=25,
                        help="kernels listed one by one (by unwrapped time), and operators (by excess over the "
                             "tokens' ratio)")
    parser.add_argument("--flops-only", action="store_true",
                        help="count each model's FLOPs by category, unwrapped and routed (no timing; on the CPU "
                             "at batch 1 unless --batch: the ratios do not depend on the device or the batch)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    configs = SMOKE_CONFIGS[:1] if args.smoke else [c for c in GPU_CONFIGS if c.name in args.models.split(",")]
    if not configs:
        parser.error(f"--models {args.models!r} names none of {[c.name for c in GPU_CONFIGS]}")
    if args.flops_only:
        return count_flops(configs, args.batch or 1, args.output or RESULTS / "profile_flops.json")
    device = bench_device(cpu=args.smoke)
    steps, warmup = args.steps or (1 if args.smoke else 5), args.warmup or (1 if args.smoke else 5)
    out = args.output or RESULTS / ("profile_step_smoke.json" if args.smoke else "profile_step.json")
    payload = {"benchmark": "profile_step", "environment": environment(),
               "config": {"profiled_steps": steps, "warmup_steps": warmup, "optimizer": f"AdamW lr 1e-4 ({args.optimizer})",
                          "autocast": "bf16" if device.type == "cuda" else None, "categories": CATEGORIES},
               "results": []}
    for compile_ in [False, True] if args.compile else [False]:
        for config in configs:
            r = profile_model(config, device, steps, warmup, compile_, args.optimizer == "fused", args.batch, args.top)
            payload["results"].append(r)
            write_json(out, payload)
            print(f"{r['model']} {'compiled' if compile_ else 'eager'}: "
                  + "  ".join(f"{c} {r['kernel_ms_per_step']['unwrapped'][c]:.1f}->{r['kernel_ms_per_step']['routed'][c]:.1f} ms"
                              for c in r["kernel_ms_per_step"]["unwrapped"])
                  + f" | ideal {r['ideal_speedup']:.2f}x kernels {r['kernel_speedup']:.2f}x "
                  f"({r['kernel_achieved_over_ideal']:.2f} of ideal; {r['achieved_over_ideal_without_optimizer']:.2f} "
                  "without the optimizer)", flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
