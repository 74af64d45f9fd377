"""Token density (FlexDiT) on the project's pretrained DiT: sampling throughput, FLOPs and FID of the pretrained
model, of the converted model before and after a short fine-tune, with a fixed factor and with the temporal
schedule, and of TREAD routing applied at sampling without training at the same FLOPs.

The pretrained model is ``dit-small-fmnist`` (``pretrained.py``: 16 x 16 tokens, 8 blocks); the pooled route spans
its middle blocks (first and last dense, as FlexDiT keeps its bottom and top blocks dense). The fine-tunes run
``examples/finetune_token_density.py`` for at most ``--budget`` (default 10%) of the pretraining's steps, from the
same pretrained weights. Also measured: how far each converted model's prediction starts from the pretrained one
(relative mean squared difference of the velocity, on noised test images at uniform times), for this library's
start (the plain pooled route) and FlexDiT's (the route's change dropped, cross-attentions at their default
initialisation).

Throughput: images per second sampling a full batch (Euler, classifier-free guidance batched), variants
interleaved after warm-up, CUDA events, medians. FID: the project's classifier features (``fid.py``), samples
from fixed noise, classes in turn, against the test set. Writes results/token_density.json and .png.

    python benchmarks/token_density.py                # on the GPU (trains the pretrained model first if missing)
    python benchmarks/token_density.py --smoke --cpu  # a tiny stand-in: checks the script runs
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

import tokenroute
from tokenroute.methods.token_density import Schedule, TokenDensityConfig, apply_token_density
from tokenroute.training import resize_images

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import caching  # noqa: E402
import fid  # noqa: E402
import finetune_token_density  # noqa: E402
import pretrained  # noqa: E402
from common import RESULTS, bench_device, environment, write_json  # noqa: E402


class RoutedAtSampling(torch.nn.Module):
    """TREAD applied at sampling without training: every call routes ``ratio`` of the tokens of each route."""

    def __init__(self, model: torch.nn.Module, routes: list[tuple[int, int]], ratio: float):
        super().__init__()
        self.model = tokenroute.wrap(model, routes=[(s, e, ratio) for s, e in routes], seed=0)
        self.ratio = ratio

    def forward(self, *args: Any) -> torch.Tensor:
        with tokenroute.routing(self.model, ratio=self.ratio, enabled=True):
            return self.model(*args)


def kept_share(schedule: Any, steps: int) -> float:
    """The mean share of a route's image tokens the schedule keeps over the Euler steps (1 / factor^2)."""
    rule = Schedule(schedule, (0.0, 1000.0), "schedule")
    times = [1000.0 * (1 - i / steps) for i in range(steps)]
    return sum(1.0 / rule(t) ** 2 for t in times) / steps


@torch.no_grad()
def start_difference(reference: torch.nn.Module, converted: torch.nn.Module, images: torch.Tensor,
                     device: torch.device, times: int = 8, seed: int = 0) -> float:
    """Relative mean squared difference of the velocity predictions, over noised images at ``times`` uniform
    times: ||v' - v||^2 / ||v||^2."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(images)) % 10
    diff = norm = 0.0
    for i in range(times):
        t = torch.full((len(images),), (i + 0.5) / times)
        noise = torch.randn(images.shape, generator=generator)
        x = ((1 - t.view(-1, 1, 1, 1)) * images + t.view(-1, 1, 1, 1) * noise).to(device)
        v = reference(x, (t * pretrained.TIME_SCALE).to(device), labels.to(device)).float()
        v2 = converted(x, (t * pretrained.TIME_SCALE).to(device), labels.to(device)).float()
        diff += float((v2 - v).square().sum())
        norm += float(v.square().sum())
    return diff / norm


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["variants"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    markers = {"pretrained": "*", "converted": "o", "fine-tuned": "s", "tread": "^"}
    for label, row in rows.items():
        ax.plot(row["throughput_speedup"], row["fid"], markers[row["kind"]], ms=9, label=label)
    base = rows["pretrained"]["fid"]
    ax.axhline(base * 1.05, ls="--", c="k", lw=1)
    ax.axvline(1.5, ls=":", c="k", lw=1)
    ax.set_xlabel("sampling throughput over the pretrained model (x)")
    ax.set_ylabel(f"FID ({payload['fid_features']})", fontsize=8)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"Token density on the pretrained DiT, {payload['environment']['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routes", default="1-6", help="the pooled span(s), 'start-end'")
    parser.add_argument("--factor", type=int, default=2, help="the fixed factor")
    parser.add_argument("--schedule", default="700:4,300:2,0:1", help="the temporal schedule, 'timestep:factor,...'")
    parser.add_argument("--budget", type=float, default=0.1, help="fine-tuning steps, as a share of pretraining's")
    parser.add_argument("--finetune-batch", type=int, default=256)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--finetune-times", choices=("shared", "grouped"), default="shared",
                        help="the schedule's fine-tune: one time per batch, or per sample with a forward per factor")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--fid-samples", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1000, help="a batch that fills the GPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-minutes", type=float, default=4.0, help="for the pretrained model, if missing")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few samples: checks the script runs")
    parser.add_argument("--out", type=Path, default=RESULTS / "token_density.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.routes, args.fid_samples, args.batch, args.repeats, args.finetune_batch = "1-2", 20, 10, 1, 4
        args.steps, args.schedule = 4, "700:4,300:2,0:1"
    device = bench_device(cpu=args.cpu)
    model, model_facts = pretrained.ensure(
        pretrained.NAME + ("-smoke" if args.smoke else ""), device=device, preset="tiny" if args.smoke else "small",
        size={} if args.smoke else None, image_size=16 if args.smoke else None, minutes=0.05 if args.smoke else args.train_minutes,
        batch_size=16 if args.smoke else 256, data_dir=args.data_dir)
    size = model_facts["size"].get("input_size", 32)
    routes = [tuple(int(n) for n in span.split("-")) for span in args.routes.split(",")]
    schedule = finetune_token_density.parse_schedule(args.schedule)
    finetune_steps = max(1, int(args.budget * model_facts["steps"]))
    common = [f"--routes={args.routes}", f"--steps={finetune_steps}", f"--batch-size={args.finetune_batch}",
              f"--lr={args.finetune_lr}", f"--checkpoint-every={finetune_steps}", f"--image-size={size}",
              f"--times={args.finetune_times}",
              "--keep-checkpoints=1"] + (["--cpu"] if device.type == "cpu" else []) + \
        ([f"--data-dir={args.data_dir}"] if args.data_dir else [])

    def converted(factor: Any, init: str = "identity") -> torch.nn.Module:
        return apply_token_density(copy.deepcopy(model), TokenDensityConfig(routes=routes, factor=factor, init=init)).eval()

    def finetuned(factor_text: str) -> tuple[torch.nn.Module, dict[str, Any]]:
        variant = copy.deepcopy(model)
        with tempfile.TemporaryDirectory() as folder:
            summary = finetune_token_density.main(common + [f"--schedule={factor_text}", f"--output={folder}"],
                                                  model=variant)
        return variant.eval(), summary

    real, _ = fid.load_split("t10k", args.data_dir)
    test_images = resize_images(fid.prepare_images(real[:256]), size)
    schedule_share = kept_share(schedule, args.steps)
    fixed_share = 1.0 / args.factor ** 2
    variants: dict[str, tuple[str, torch.nn.Module, dict[str, Any]]] = {"pretrained": ("pretrained", model, {})}
    starts = {}
    for label, factor, init in ((f"factor {args.factor}", args.factor, "identity"),
                                (f"factor {args.factor}, FlexDiT's start", args.factor, "flexdit"),
                                ("schedule", schedule, "identity")):
        variant = converted(factor, init)
        starts[label] = start_difference(model, variant, test_images, device)
        if init == "identity":
            variants[f"converted, {label}, not fine-tuned"] = ("converted", variant, {"start_difference": starts[label]})
    for label, text in ((f"factor {args.factor}", str(args.factor)), ("schedule", args.schedule)):
        variant, summary = finetuned(text)
        variants[f"fine-tuned, {label}"] = ("fine-tuned", variant, {"finetune": summary})
    sampler = pretrained.sampler(args.steps, cfg_scale=args.cfg_scale)
    flops = {label: caching.flops(entry[1], sampler, device, size=size) for label, entry in variants.items()}
    half = caching.flops(RoutedAtSampling(copy.deepcopy(model), routes, 0.5), sampler, device, size=size)
    for label, twin in ((f"equal FLOPs to factor {args.factor}", f"fine-tuned, factor {args.factor}"),
                        ("equal FLOPs to the schedule", "fine-tuned, schedule")):
        # TREAD's FLOPs fall linearly with its ratio: the ratio whose FLOPs are the token-density twin's
        ratio = round(min(0.95, max(0.0, 0.5 * (flops["pretrained"] - flops[twin]) / (flops["pretrained"] - half))), 3)
        name = f"TREAD at sampling, ratio {ratio:g} ({label})"
        variants[name] = ("tread", RoutedAtSampling(copy.deepcopy(model), routes, ratio), {})
        flops[name] = caching.flops(variants[name][1], sampler, device, size=size)
    models = {label: entry[1] for label, entry in variants.items()}
    full = caching.latencies(models, sampler, args.batch, device, args.repeats, size=size)
    meter = fid.FIDMeter(real[: max(args.fid_samples, 2)], device=device)
    payload: dict[str, Any] = {
        "environment": environment(), "config": vars(args) | {"out": str(args.out)},
        "model": {k: model_facts.get(k) for k in ("name", "preset", "size", "steps", "minutes", "command")},
        "finetune_steps": finetune_steps, "finetune_share_of_pretraining": finetune_steps / model_facts["steps"],
        "kept_share": {"fixed": fixed_share, "schedule": schedule_share},
        "start_difference": starts,
        "fid_features": f"Fashion-MNIST classifier, test accuracy {fid.classifier_info()['test_accuracy']:.4f}",
        "variants": {}}
    for label, (kind, variant, extra) in variants.items():
        images = caching.images(variant, sampler, args.fid_samples, args.batch, device, size=size)
        row = {"kind": kind, "ms_full_batch": full[label], "images_per_s": args.batch / full[label] * 1000.0,
               "throughput_speedup": full["pretrained"] / full[label], "flops_per_image": flops[label],
               "flops_share": flops[label] / flops["pretrained"], "fid": meter(images), **extra}
        payload["variants"][label] = row
        print(f"{label:<60} {row['throughput_speedup']:5.2f}x  FLOPs {row['flops_share']:.2f}  FID {row['fid']:7.3f}",
              flush=True)
        write_json(args.out, payload)  # what is measured so far survives a time limit
    base = payload["variants"]["pretrained"]["fid"]
    payload["targets"] = {"throughput_1_5_within_5pct_fid": [
        label for label, row in payload["variants"].items()
        if row["kind"] == "fine-tuned" and row["throughput_speedup"] >= 1.5 and row["fid"] <= 1.05 * base]}
    write_json(args.out, payload)
    plot(payload, args.out.with_suffix(".png"))
    return payload


if __name__ == "__main__":
    main()
