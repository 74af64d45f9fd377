"""Feature caching at sampling, measured: the learned cache (HarmoniCa's router) against the fixed pattern (FORA,
every k-th step) and FirstBlockCache's rule, on the project's pretrained DiT (``pretrained.py``).

For 20 and 50 Euler steps of the flow ODE with classifier-free guidance (batched): sampling latency at a batch that
fills the GPU and at batch 1 (interleaved across variants, after warm-up, CUDA events, medians), FLOPs of one
generation at batch 1 (what runs: reused slots cost nothing), and FID against the Fashion-MNIST test set in the
project's classifier's feature space (``fid.py``; its accuracy is recorded beside). Writes
``results/caching.json`` and ``results/caching.png``.

    python benchmarks/caching.py                   # on the GPU (trains the pretrained model first if missing)
    python benchmarks/caching.py --cpu --smoke     # a smoke run on the CPU: tiny model, few samples
    python benchmarks/caching.py --merge a.json b.json   # runs made in separate calls, into one JSON and plot
    python benchmarks/caching.py --backbone diffusers-dit --out benchmarks/results/caching_diffusers.json

With ``--backbone diffusers-dit`` the model is diffusers' ``DiTTransformer2DModel`` trained by
``examples/diffusers_dit.py`` (``pretrained.py --diffusers``), sampled with diffusers' DDIM scheduler, and
diffusers' own caches run beside the project's on the same weights: FirstBlockCache, TaylorSeer (on the
attention and feed-forward modules) and MagCache (its magnitude ratios calibrated on this model first).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import tokenroute
from tokenroute.methods.caching import (CacheRouter, CachingConfig, FirstBlockCacheConfig, RouterTrainingConfig,
                                        apply_caching, apply_first_block_cache, cache_slots, generate, train_router)
from tokenroute.training import flop_counter

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fid  # noqa: E402
import pretrained  # noqa: E402
from common import Timer, bench_device, environment, median, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


DIFFUSERS_KINDS = ("diffusers_first_block", "taylorseer", "magcache")


def variants(args: argparse.Namespace) -> list[tuple[str, str, float]]:
    """(label, kind, parameter) of every variant measured."""
    out = [("no cache", "none", 0.0)]
    weighting = " uniform" if args.router_uniform else ""
    out += [(f"learned{weighting}, sparsity {s:g}", "learned", s) for s in args.sparsity]
    out += [(f"every {k} steps", "every", k) for k in args.every]
    out += [(f"first-block {t:g}", "first_block", t) for t in args.first_block]
    if args.backbone == "diffusers-dit":
        out += [(f"diffusers first-block {t:g}", "diffusers_first_block", t) for t in args.first_block]
        out += [(f"diffusers TaylorSeer every {k}", "taylorseer", k) for k in args.taylorseer]
        out += [(f"diffusers MagCache {t:g}", "magcache", t) for t in args.magcache]
    return out


# diffusers' DiT: the modules TaylorSeer caches (attention and feed-forward, as the project's slots)
TAYLORSEER_MODULES = [r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"]


def _diffusers_cache(variant: torch.nn.Module, kind: str, parameter: float, steps: int, sampler: Any,
                     device: torch.device) -> dict[str, Any]:
    """Apply one of diffusers' own caches to ``variant`` (MagCache calibrated on it first)."""
    from diffusers import hooks

    variant.diffusers_cache = True  # sample() gives it diffusers' cache context
    if kind == "diffusers_first_block":
        hooks.apply_first_block_cache(variant, hooks.FirstBlockCacheConfig(threshold=parameter))
        return {}
    if kind == "taylorseer":
        hooks.apply_taylorseer_cache(variant, hooks.TaylorSeerCacheConfig(
            cache_interval=int(parameter), cache_identifiers=TAYLORSEER_MODULES))
        return {}
    import contextlib
    import io
    import json

    calibration = copy.deepcopy(variant)
    hooks.apply_mag_cache(calibration, hooks.MagCacheConfig(calibrate=True, num_inference_steps=steps))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # diffusers prints the ratios at the end of the calibrating run
        sample(calibration, sampler, torch.randn(8, 1, 32, 32, device=device), torch.arange(8, device=device) % 10)
    ratios = json.loads(printed.getvalue().strip().splitlines()[-1])
    hooks.apply_mag_cache(variant, hooks.MagCacheConfig(threshold=parameter, num_inference_steps=steps,
                                                          mag_ratios=ratios))
    return {"mag_ratios": ratios}


def _uses_diffusers_hooks(model: torch.nn.Module) -> bool:
    return getattr(model, "diffusers_cache", False)


@torch.no_grad()
def sample(model: torch.nn.Module, sampler: Any, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One generation; diffusers' caches get the cache context a diffusers pipeline gives them, and are reset
    after, as a pipeline resets them."""
    if not _uses_diffusers_hooks(model):
        return generate(model, sampler, noise, labels)
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    _set_cache_context(model, CacheContext("cond", num_inference_steps=sampler.num_steps))
    try:
        return generate(model, sampler, noise, labels)
    finally:
        _set_cache_context(model, None)
        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks()


def build(model: torch.nn.Module, kind: str, parameter: float, steps: int, sampler: Any, args: argparse.Namespace,
          device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A copy of ``model`` with the variant applied (a learned router trained first), and what it took."""
    variant, facts = copy.deepcopy(model), {}
    slots = len(cache_slots(variant))
    if kind in DIFFUSERS_KINDS:
        facts = _diffusers_cache(variant, kind, parameter, steps, sampler, device)
    elif kind == "every":
        apply_caching(variant, CachingConfig(router=CacheRouter.every(int(parameter), steps, slots)))
    elif kind == "first_block":
        apply_first_block_cache(variant, FirstBlockCacheConfig(threshold=parameter))
    elif kind == "learned":
        router = CacheRouter(steps, slots, init=args.router_init).to(device)
        apply_caching(variant, CachingConfig(router=router))

        def inputs(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fresh noise, random labels
            noise = torch.randn(args.router_batch, 1, 32, 32, generator=generator).to(device)
            return noise, torch.randint(0, 10, (args.router_batch,), generator=generator).to(device)

        config = RouterTrainingConfig(iterations=args.router_iterations, lr=args.router_lr, sparsity=parameter,
                                      refresh_every=args.refresh_every, progress=not args.smoke,
                                      weigh_by_cost=not args.router_uniform)
        began = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            train_router(variant, sampler, inputs, config)
        facts = {"router_training_s": time.perf_counter() - began, "router_loss_first": config.history[0],
                 "router_loss_last": config.history[-1]}
    if kind in ("learned", "every"):
        table = tokenroute.core.patches.registry_of(variant).get("caching").table
        facts["slot_calls_computed"] = sum(map(sum, table)) / (len(table) * len(table[0]))
        facts["plan"] = ["".join("#" if c else "." for c in row) for row in table]  # steps x slots, # computes
    return variant, facts


def images(model: torch.nn.Module, sampler: Any, num: int, batch: int, device: torch.device,
           seed: int = 0, size: int = 32) -> torch.Tensor:
    """``num`` samples, classes in turn, from fixed noise; uint8 (num, 1, 32, 32) (generated at ``size``, then
    averaged down to 32)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, num, batch):
        n = min(batch, num - start)
        noise = torch.randn(n, 1, size, size, generator=generator).to(device)
        labels = (torch.arange(start, start + n) % 10).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            x = sample(model, sampler, noise, labels)
        out.append(fid.to_uint8(pretrained.downsample(x.float().clamp(-1, 1))).cpu())
        _reset(model)
    return torch.cat(out)


def _reset(model: torch.nn.Module) -> None:
    if tokenroute.is_wrapped(model):
        tokenroute.core.patches.registry_of(model).reset_state()


def latencies(models: dict[str, torch.nn.Module], sampler: Any, batch: int, device: torch.device,
              repeats: int, size: int = 32) -> dict[str, float]:
    """Milliseconds per generation of ``batch`` images: variants interleaved, after a warm-up, medians."""
    timer = Timer(device)
    noise = torch.randn(batch, 1, size, size, device=device)
    labels = torch.arange(batch, device=device) % 10

    def run(model: torch.nn.Module) -> Callable[[], Any]:
        def once() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                sample(model, sampler, noise, labels)
        return once

    for model in models.values():
        run(model)()
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(timer(run(model), 1))
    return {name: median(values) for name, values in times.items()}


def flops(model: torch.nn.Module, sampler: Any, device: torch.device, size: int = 32) -> int:
    """FLOPs of one generation of one image (classifier-free guidance batched: two rows)."""
    with flop_counter() as counter:
        sample(model, sampler, torch.randn(1, 1, size, size, device=device), torch.zeros(1, dtype=torch.long,
                                                                                          device=device))
    return int(counter.get_total_flops())


def targets(variants: dict[str, Any]) -> dict[str, list[str]]:
    """The variants that meet the issue's target: >= 1.5x at a full batch with FID within 5% of no cache."""
    base = variants["no cache"]["fid"]
    return {"speedup_1_5_within_5pct_fid": [label for label, r in variants.items()
                                            if r["speedup_full_batch"] >= 1.5 and r["fid"] <= 1.05 * base]}


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = payload["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.2), squeeze=False)
    for ax, (steps, run) in zip(axes[0], runs.items()):
        groups = (("learned", "o", lambda label: "uniform" not in label),
                  ("learned uniform", "o", lambda label: "uniform" in label), ("every", "s", None),
                  ("first_block", "^", None), ("diffusers_first_block", "v", None), ("taylorseer", "D", None),
                  ("magcache", "P", None), ("none", "*", None))
        for name, marker, keep in groups:
            kind = name.split()[0]
            rows = sorted((r for label, r in run["variants"].items() if r["kind"] == kind and (keep is None or keep(label))),
                          key=lambda r: r["speedup_full_batch"])
            if rows:
                ax.plot([r["speedup_full_batch"] for r in rows], [r["fid"] for r in rows], marker, ls="-" if len(rows) > 1
                        else "", label=name.replace("_", "-"), ms=8, mfc="none" if "uniform" in name else None)
        ax.set_xlabel("sampling speed-up at a full batch (x)")
        ax.set_ylabel(f"FID ({payload['fid_features']})")
        ax.set_title(f"{steps} steps")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Feature caching on the pretrained DiT ({payload['environment']['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="dit", choices=("dit", "diffusers-dit"),
                        help="the project's DiT (flow, Euler) or diffusers' DiT (epsilon, DDIM) with diffusers' caches")
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--sparsity", type=float, nargs="*", default=[1e-4, 1e-3, 1e-2])
    parser.add_argument("--every", type=int, nargs="*", default=[2, 3])
    parser.add_argument("--first-block", type=float, nargs="*", default=[0.05, 0.1, 0.2])
    parser.add_argument("--taylorseer", type=int, nargs="*", default=[2, 3], help="diffusers-dit: cache intervals")
    parser.add_argument("--magcache", type=float, nargs="*", default=[0.06, 0.12], help="diffusers-dit: thresholds")
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--fid-samples", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1000, help="a batch that fills the GPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--router-iterations", type=int, default=100)
    parser.add_argument("--router-batch", type=int, default=32)
    parser.add_argument("--router-lr", type=float, default=0.1)
    parser.add_argument("--router-init", type=float, default=0.0)
    parser.add_argument("--router-uniform", action="store_true",
                        help="count every slot alike in the sparsity term (HarmoniCa), not by its share of the work")
    parser.add_argument("--refresh-every", type=int, default=50)
    parser.add_argument("--train-minutes", type=float, default=4.0, help="for the pretrained model, if missing")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST's idx files; default: the system's")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few samples: checks the script runs")
    parser.add_argument("--out", type=Path, default=RESULTS / "caching.json")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, help="merge these results (per step count)")
    args = parser.parse_args(argv)
    if args.merge:
        import json

        parts = [json.loads(path.read_text()) for path in args.merge]
        runs: dict[str, Any] = {}
        for part in parts:  # variants of later files join (or replace) those of earlier ones, per step count
            for steps, run in part["runs"].items():
                runs.setdefault(steps, {"variants": {}})["variants"].update(run["variants"])
        for run in runs.values():
            run["targets"] = targets(run["variants"])
        payload = parts[0] | {"runs": runs, "configs": [part["config"] for part in parts]}
        write_json(args.out, payload)
        plot(payload, args.out.with_suffix(".png"))
        return payload
    device = bench_device(cpu=args.cpu)
    if args.smoke:
        args.fid_samples, args.batch, args.repeats, args.router_iterations = 40, 20, 1, 3
        args.router_batch, args.refresh_every, args.router_lr = 4, 2, 1.0  # 3 steps of lr 1 reach the threshold
        args.steps, args.sparsity, args.every, args.first_block = args.steps[:1], args.sparsity[:1], args.every[:1], \
            args.first_block[:1]
    if args.backbone == "diffusers-dit":
        model, model_facts = pretrained.load_diffusers(device=device)
        model_facts = model_facts | {"preset": "DiTTransformer2DModel", "minutes": model_facts["train_time_s"] / 60}
        make_sampler = pretrained.ddim_sampler
    else:
        model, model_facts = pretrained.ensure(
            pretrained.NAME + ("-smoke" if args.smoke else ""), device=device, preset="tiny" if args.smoke else "small",
            size={} if args.smoke else None, minutes=0.05 if args.smoke else args.train_minutes,
            batch_size=16 if args.smoke else 256, data_dir=args.data_dir)
        make_sampler = pretrained.sampler
    real, _ = fid.load_split("t10k", args.data_dir)
    meter = fid.FIDMeter(real[: max(args.fid_samples, 2)], device=device)
    payload: dict[str, Any] = {"environment": environment(), "config": vars(args) | {"out": str(args.out)},
                               "model": {k: model_facts[k] for k in ("name", "preset", "steps", "minutes", "command")},
                               "fid_features": f"Fashion-MNIST classifier, test accuracy "
                                               f"{fid.classifier_info()['test_accuracy']:.4f}",
                               "runs": {}}
    for steps in args.steps:
        sampler = make_sampler(steps, cfg_scale=args.cfg_scale)
        built = {label: (kind, parameter, *build(model, kind, parameter, steps, sampler, args, device))
                 for label, kind, parameter in variants(args)}
        models = {label: entry[2] for label, entry in built.items()}
        full = latencies(models, sampler, args.batch, device, args.repeats)
        single = latencies(models, sampler, 1, device, args.repeats)
        run: dict[str, Any] = {"variants": {}}
        for label, (kind, parameter, variant, facts) in built.items():
            score = meter(images(variant, sampler, args.fid_samples, args.batch, device))
            run["variants"][label] = {
                "kind": kind, "parameter": parameter, "ms_full_batch": full[label], "ms_batch_1": single[label],
                "speedup_full_batch": full["no cache"] / full[label], "speedup_batch_1": single["no cache"] / single[label],
                "flops_per_image": flops(variant, sampler, device), "fid": score, **facts}
            print(f"{steps} steps  {label:<28} {full['no cache'] / full[label]:5.2f}x  FID {score:7.3f}", flush=True)
            payload["runs"][str(steps)] = run
            write_json(args.out, payload)  # what is measured so far survives a time limit
        run["targets"] = targets(run["variants"])
        payload["runs"][str(steps)] = run
    write_json(args.out, payload)
    plot(payload, args.out.with_suffix(".png"))
    return payload


if __name__ == "__main__":
    main()
