"""Local attention's speed (CLEAR): dense attention (SDPA, flash on the GPU) against circular windows and
tile-aligned windows (FlexAttention), for the attention alone and for a whole DiT-XL-sized forward, at 4K, 16K and
64K image tokens, with each mask's block sparsity.

Attention alone: DiT-XL's 16 heads of 72 channels, batch 1 (``--batch``), bf16, forward; for the local variants
also the call on inputs already in tile order, as the blocks of a stack run in tile order make it
(``in_stack_ms``: the reordering around each call is the difference), and the kernel alone (``kernel_ms``: the
call's host work is the difference). Whole model (the stack runs in tile order; ``--per-attention`` adds the
model reordering around each attention instead): the project's DiT at
DiT-XL's width 1152, depth 28 and 16 heads, patch 2, on latents of the size that gives the token count, batch 1,
bf16, forward. Variants interleaved after warm-up, CUDA events, medians; torch.compile's counters kept
(recompiles past its limit would run FlexAttention unfused). Writes results/local_attention.json and
results/local_attention.png.

    python benchmarks/local_attention.py                 # on the GPU
    python benchmarks/local_attention.py --smoke --cpu   # seconds on the CPU: checks the script runs
    python benchmarks/local_attention.py --plot-only     # redraw the plot from results/local_attention.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from tokenroute.core.locality import LocalMasks, block_sparsity, local_attention
from tokenroute.methods.local_attention import LocalAttentionConfig, apply_local_attention
from tokenroute.models.dit import DiT

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Timer, bench_device, environment, median, write_json  # noqa: E402


PER_ATTENTION = ", reordered per attention"  # the model variant that reorders around each attention


def variants(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Dense, circular radius r, and tile windows (th x tw tiles, reaching ky tiles up and down, kx left and right)
    of comparable extent: with 8 x 16 tiles (one kernel block each), reach 1x0 is a 24 x 16 window (about r=8's
    16 x 16 box), 2x1 a 40 x 48 one (r=16's is 32 x 32)."""
    out: dict[str, dict[str, Any]] = {"dense": {}}
    for r in args.radius:
        out[f"circular r={r:g}"] = dict(radius=r)
    for reach in args.tile_reach:
        ky, kx = (int(n) for n in reach.split("x"))
        out[f"tiles {args.tile[0]}x{args.tile[1]}, reach {ky}x{kx}"] = dict(tile=tuple(args.tile), radius_tiles=(ky, kx))
    return out


def grid_coords(side: int, device: torch.device) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
    return torch.stack([ys, xs], -1).reshape(-1, 2)


def time_interleaved(calls: dict[str, Callable[[], Any]], device: torch.device, repeats: int, n: int) -> dict[str, float]:
    timer = Timer(device)
    for call in calls.values():  # warm-up: compiles, builds block masks
        call()
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(timer(call, n))
    return {name: median(values) for name, values in times.items()}


@torch.no_grad()
def attention_alone(tokens: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    side = int(math.isqrt(tokens))
    q, k, v = (torch.randn(args.batch, args.heads, side * side, args.head_dim, device=device, dtype=dtype) for _ in range(3))
    coords = grid_coords(side, device)
    masks = LocalMasks()
    calls, sparsity, kernels, stacked = {}, {}, {}, {}
    for name, rule in variants(args).items():
        if not rule:
            calls[name] = lambda: F.scaled_dot_product_attention(q, k, v)
            sparsity[name] = 0.0
            continue
        calls[name] = lambda rule=rule, name=name: local_attention(q, k, v, coords, coords, masks=masks, key=name,
                                                                   backend=args.backend, **rule)
        calls[name]()
        ordered = (name, "tile order")  # FlexAttention runs every rule tile by tile
        if ordered not in masks.blocks:
            sparsity[name] = None
            continue
        sparsity[name] = block_sparsity(masks.blocks[ordered])
        if not q.is_cuda:  # eager FlexAttention on the CPU: nothing to compare with
            continue
        # on inputs already in tile order: the call as a stack run in tile order makes it (no gathers), and the
        # kernel alone (the call's host work is the difference)
        order, _ = masks.orders[(name, "order")]
        qo, ko, vo = (x.index_select(2, order) for x in (q, k, v))
        co = coords[order]
        block = masks.blocks[ordered]
        stacked[name] = lambda qo=qo, ko=ko, vo=vo, co=co, rule=rule, name=name: local_attention(
            qo, ko, vo, co, co, masks=masks, key=(name, "in stack"), backend=args.backend, **rule)
        kernels[name] = lambda qo=qo, ko=ko, vo=vo, block=block: masks.flex()(qo, ko, vo, block_mask=block)
    ms = time_interleaved(calls | {f"{n} (in stack)": c for n, c in stacked.items()} |
                          {f"{n} (kernel)": c for n, c in kernels.items()}, device, args.repeats, args.n)
    rows = {}
    for name in calls:
        rows[name] = {"ms": ms[name], "speedup": ms["dense"] / ms[name], "block_sparsity": sparsity[name]}
        if name in kernels:
            rows[name] |= {"in_stack_ms": ms[f"{name} (in stack)"], "kernel_ms": ms[f"{name} (kernel)"],
                           "in_stack_speedup": ms["dense"] / ms[f"{name} (in stack)"],
                           "kernel_speedup": ms["dense"] / ms[f"{name} (kernel)"]}
    return rows


def compile_counters() -> dict[str, Any]:
    """torch.compile's counters: graphs compiled and recompiles (a rule that recompiled past the limit would run
    FlexAttention unfused, materialising the scores)."""
    from torch._dynamo.utils import counters

    return {group: dict(counters[group]) for group in ("stats", "recompiles", "graph_break") if counters[group]}


@torch.no_grad()
def whole_model(tokens: int, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    side = int(math.isqrt(tokens)) * args.patch
    torch.manual_seed(0)
    with torch.device(device):  # built on the device: DiT-XL's initialisation is slow on the host
        base = DiT(input_size=side, patch_size=args.patch, in_channels=4, hidden_size=args.width, depth=args.depth,
                   num_heads=args.heads).eval()
    models = {}
    for name, rule in variants(args).items():
        for reorder in ["stack", "attention"] if rule and args.per_attention else ["stack"]:
            model = copy.deepcopy(base)
            if rule:
                apply_local_attention(model, LocalAttentionConfig(backend=args.backend, reorder=reorder,
                                                                  **({"radius": None} | rule)))
            models[name + (PER_ATTENTION if reorder == "attention" else "")] = model
    x = torch.randn(args.batch, 4, side, side, device=device)
    t = torch.full((args.batch,), 500.0, device=device)
    y = torch.zeros(args.batch, dtype=torch.long, device=device)

    def forward(model: torch.nn.Module) -> Callable[[], Any]:
        def call() -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                model(x, t, y)
        return call

    ms = time_interleaved({name: forward(m) for name, m in models.items()}, device, args.repeats, 1)
    return {name: {"ms": ms[name], "speedup": ms["dense"] / ms[name]} for name in models}


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, part in zip(axes, ("attention", "model")):
        rows = {n: run for n, run in sorted(payload["runs"].items(), key=lambda item: int(item[0])) if part in run}
        if not rows:
            ax.set_visible(False)
            continue
        names = list(next(iter(rows.values()))[part])
        bases = [n for n in names if not n.endswith(PER_ATTENTION)]  # one colour per rule in both panels
        for name in names:
            color = f"C{bases.index(name.removesuffix(PER_ATTENTION))}"
            line = ax.plot([int(n) for n in rows], [rows[n][part][name]["speedup"] for n in rows],
                           "o:" if name.endswith(PER_ATTENTION) else "o-", label=name, color=color)
            if part == "attention" and all("in_stack_speedup" in rows[n][part][name] for n in rows):
                line[0].set(linestyle=":", label=f"{name}, reordered per call")
                ax.plot([int(n) for n in rows], [rows[n][part][name]["in_stack_speedup"] for n in rows], "s-",
                        color=color, label=f"{name}, in tile order (as the stack runs)")
        if part == "attention":
            ax.axhline(5.0, ls="--", c="k", lw=1, label="target at 16K: 5x")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xticks([int(n) for n in rows], [f"{int(n) / 1024:g}K" if int(n) >= 1024 else n for n in rows])
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}x"))
        ax.set_xlabel("image tokens")
        ax.set_ylabel("speed-up over dense attention (x)")
        ax.set_title("attention alone" if part == "attention" else "whole DiT-XL-sized forward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Local attention, {payload['environment']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--radius", type=float, nargs="*", default=[8.0, 16.0])
    parser.add_argument("--tile", type=int, nargs=2, default=[8, 16], help="tile rows, columns")
    parser.add_argument("--tile-reach", nargs="*", default=["1x0", "2x1"], help="tiles up-down x left-right")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=72)
    parser.add_argument("--width", type=int, default=1152)
    parser.add_argument("--depth", type=int, default=28)
    parser.add_argument("--patch", type=int, default=2)
    parser.add_argument("--backend", default="auto", choices=("auto", "flex", "sdpa"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n", type=int, default=10, help="attention calls per timing")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--per-attention", action="store_true",
                        help="also time the whole model reordering around each attention (reorder='attention')")
    parser.add_argument("--model-tokens", type=int, nargs="*", default=None,
                        help="time the whole model at these token counts only (default: every --tokens)")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    parser.add_argument("--out", type=Path, default=RESULTS / "local_attention.json")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from --out's JSON")
    args = parser.parse_args(argv)
    if args.plot_only:
        payload = json.loads(args.out.read_text())
        plot(payload, args.out.with_suffix(".png"))
        return payload
    if args.smoke:
        args.tokens, args.radius, args.tile, args.tile_reach = [64, 256], [3.0], [4, 4], ["1x1"]
        args.heads, args.head_dim, args.width, args.depth, args.repeats, args.n = 2, 8, 32, 2, 1, 1
    device = bench_device(cpu=args.cpu)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    payload: dict[str, Any] = {"environment": environment(), "config": vars(args) | {"out": str(args.out)}, "runs": {}}
    for tokens in args.tokens:
        run = {"attention": attention_alone(tokens, args, device, dtype)}
        if not args.skip_model and (args.model_tokens is None or tokens in args.model_tokens):
            run["model"] = whole_model(tokens, args, device, dtype)
        payload["runs"][str(tokens)] = run
        payload["compile_counters"] = compile_counters()
        for part, rows in run.items():
            for name, row in rows.items():
                kernel = f"  in stack {row['in_stack_ms']:.3f} ms ({row['in_stack_speedup']:.2f}x), kernel alone " \
                    f"{row['kernel_ms']:.3f} ms" if "kernel_ms" in row else ""
                print(f"{tokens:>6} tokens  {part:<9} {name:<28} {row['ms']:9.3f} ms  {row['speedup']:5.2f}x{kernel}",
                      flush=True)
        write_json(args.out, payload)  # what is measured so far survives a time limit
    plot(payload, args.out.with_suffix(".png"))
    return payload


if __name__ == "__main__":
    main()
