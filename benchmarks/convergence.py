"""Time to quality: the same DiT trained on Fashion-MNIST with and without TREAD routing for the same GPU time.

Every variant starts from the same weights and sees the same batches, noise levels and label dropout
(`tokenroute.training.StepBatches` and `step_generator`, one seed); only the routing and the loss mode
differ. Training is EDM (`tokenroute.losses.EDM`, combined per token by `tokenroute.losses.combine`), AdamW
(fused on a GPU unless --optimizer foreach), label dropout 0.1, bf16 autocast on a GPU, an EMA of the weights.

The clock is the GPU time of the training steps alone: CUDA events around chunks of steps (the wall clock on
a CPU), summed; sampling and FID are not counted. At `--evals` evenly spaced points of the budget (and once
at step 0, shared by variants that start from the same weights) the EMA weights sample `--num-samples`
class-balanced images, unrouted, in eval mode (EDM's Heun sampler, `--sample-steps` steps, guidance
`--cfg-scale`), and their FID against the 10k Fashion-MNIST test images is computed in the feature space of
the small classifier of benchmarks/fid.py, whose test accuracy is recorded with every FID.

Reported: FID against GPU seconds per variant; for each variant the GPU time it needs to reach the
baseline's final FID (linear interpolation between evaluations; null if never reached) and that time over
the baseline's total (the target is <= 0.5); images per second of training.

    python benchmarks/convergence.py                          # GPU: small preset, 100 s per variant, ~17 min
    python benchmarks/convergence.py --budget-seconds 60 --evals 2 --num-samples 5000   # about 6 minutes
    python benchmarks/convergence.py --variants baseline      # one variant now ...
    python benchmarks/convergence.py --variants tread_routes,tread_all --append         # ... the others later
    python benchmarks/convergence.py --step-times 20          # only each variant's step, side by side (ms, speed-up)
    python benchmarks/convergence.py --smoke                  # CPU, tiny preset, seconds
    python benchmarks/convergence.py --smoke --data-dir DIR   # another copy of the idx files

Writes benchmarks/results/convergence.json and convergence.png (`--smoke`: convergence_smoke.*; `--output`
names the JSON, the PNG goes beside it). Both are rewritten after every evaluation, so a run cut short
keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import tokenroute
from tokenroute.training import (BACKBONE_NAMES, DEFAULT_DATA_DIR, EMA, NUM_CLASSES, PRESET_DEFAULTS, PRESET_NAMES,
                                 DataError, StepBatches, build_model, class_labels, drop_labels, jsonable,
                                 load_fashion_mnist, locate_fashion_mnist, mae_term, make_task, model_config,
                                 pad_images, sample_images, stack_depth, step_generator, to_model_range, tread_routes,
                                 write_json)

import fid as fidlib  # benchmarks/fid.py
from common import Timer, bench_device, earlier_payload, environment as benchmark_environment

RouteSpec = Any  # None | "tread" | [(start, end, ratio), ...] | callable(depth) -> routes


@dataclass
class Variant:
    """One training recipe.

    routes: None (no routing), "tread" (TREAD's (2, depth - 4, 0.5), `tread_routes`), a list of
        (start, end, ratio), or a function of the stack depth returning one.
    loss_mode: `tokenroute.losses.combine`'s mode: "all", "routes" or "visible".
    kwargs: extras for recipes beyond TREAD: "wrap" (more keyword arguments of `tokenroute.wrap`, e.g.
        `protect`, `mechanism`), "combine" (of `combine`, e.g. `mae_weight`; a positive `mae_weight` adds
        MaskDiT's MAE term on the prediction's patches against `mae_target` of the noisy input).
    """

    routes: RouteSpec = None
    loss_mode: str = "all"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def resolve_routes(self, depth: int) -> list[tuple[int, int, float]] | None:
        if self.routes is None:
            return None
        if self.routes == "tread":
            return tread_routes(depth)
        if callable(self.routes):
            return list(self.routes(depth))
        return [tuple(r) for r in self.routes]


# name -> recipe. "mask" in kwargs: MaskDiT through tokenroute.mask (its keyword arguments).
VARIANTS: dict[str, Variant] = {
    "baseline": Variant(None, "all"),
    "tread_routes": Variant("tread", "routes"),
    "tread_all": Variant("tread", "all"),
    "maskdit": Variant(None, "visible", {"mask": {"ratio": 0.5, "decoder": 2}, "combine": {"mae_weight": 0.1}}),
}
BASELINE = "baseline"
TARGET_RATIO = 0.5

SMOKE = dict(preset="tiny", budget_seconds=2.0, evals=2, num_samples=100, num_reference=1000, sample_steps=6,
             sample_batch=100)
FULL = dict(preset="small", budget_seconds=100.0, evals=3, num_samples=10_000, num_reference=0, sample_steps=18,
            sample_batch=1000, lr=3e-4)  # the settings of benchmarks/results/convergence.json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convergence.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Defaults without --smoke: " + ", ".join(f"{k}={v}" for k, v in FULL.items())
                                + "; with --smoke: " + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    p.add_argument("--smoke", action="store_true", help="CPU, tiny preset, a few seconds per variant")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--backbone", default="dit", choices=BACKBONE_NAMES)
    p.add_argument("--preset", default=None, choices=PRESET_NAMES)
    p.add_argument("--budget-seconds", type=float, default=None, help="training GPU seconds per variant")
    p.add_argument("--evals", type=int, default=None, help="evaluations per variant, evenly spaced in the budget")
    p.add_argument("--num-samples", type=int, default=None,
                   help="generated images per FID (rounded up to a multiple of 10: the same number per class)")
    p.add_argument("--num-reference", type=int, default=None, help="test images in the FID reference; 0 = all")
    p.add_argument("--sample-steps", type=int, default=None, help="EDM Heun steps")
    p.add_argument("--sample-batch", type=int, default=None)
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance at sampling; 1 = off")
    p.add_argument("--batch-size", type=int, default=None, help="default by preset (PRESET_DEFAULTS)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate; default 3e-4 (--smoke: by preset)")
    p.add_argument("--optimizer", choices=("fused", "foreach"), default="fused",
                   help="AdamW's implementation on a GPU: fused (what a performance-minded user runs) or foreach "
                        "(PyTorch's default, the earlier results' files)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward (sampling stays eager)")
    p.add_argument("--step-times", type=int, default=0, metavar="N",
                   help="only time each variant's training step: interleaved repetitions of N steps after warm-up, "
                        "medians (no budget, no FID); writes convergence_step_times.json unless --output")
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--ema-decay", type=float, default=0.999,
                   help="EMA decay (warmed up as min(decay, (1 + step) / (10 + step)))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-steps", type=int, default=25, help="most training steps timed as one chunk")
    p.add_argument("--device", default=None, help="default: cuda when available (cpu with --smoke)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST idx .gz files; default " + DEFAULT_DATA_DIR)
    p.add_argument("--no-download", action="store_true", help="never fall back to torchvision's download")
    p.add_argument("--classifier", type=Path, default=fidlib.WEIGHTS, help="feature classifier (benchmarks/fid.py)")
    p.add_argument("--output", type=Path, default=None, help="JSON path; the PNG goes beside it")
    p.add_argument("--append", action="store_true",
                   help="keep the variants already in --output (same settings required) and add or redo these: "
                        "several shorter runs make one comparison")
    p.add_argument("--quiet", action="store_true")
    return p


# ------------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    env = benchmark_environment()
    env.update(tokenroute=tokenroute.__version__, platform=platform.platform(), cpu_threads=torch.get_num_threads())
    if device.type == "cuda":
        env.update(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    else:
        env.update(device=f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)", cuda=None)
    return env


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class StepClock:
    """Seconds of training work, summed: CUDA events around each chunk of steps on a GPU, the wall clock on a
    CPU (benchmarks/common.py's Timer)."""

    def __init__(self, device: torch.device):
        self.timer = Timer(device)
        self.seconds = 0.0

    def run(self, fn: Callable[[], None]) -> float:
        took = self.timer(fn, 1) / 1000
        self.seconds += took
        return took


def time_to_reach(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """First time the FID curve reaches `target`, linearly interpolated between the two evaluations around
    the crossing; None when it never does. `points` are (seconds, fid), by time."""
    points = [(t, f) for t, f in points if f is not None and math.isfinite(f)]
    if not points or target is None or not math.isfinite(target):
        return None
    if points[0][1] <= target:
        return points[0][0]
    for (t0, f0), (t1, f1) in zip(points, points[1:]):
        if f1 <= target:
            return t0 + (f0 - target) / (f0 - f1) * (t1 - t0)
    return None


def finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def fmt(x: float | None, spec: str = ".4g") -> str:
    return "n/a" if x is None else format(x, spec)


class Evaluator:
    """Samples from EMA weights and scores them: FID against the reference images, the classifier's accuracy
    on the samples' class labels."""

    def __init__(self, args: argparse.Namespace, task: Any, meter: fidlib.FIDMeter, device: torch.device,
                 classifier_accuracy: float | None, reference_accuracy: float, log: Callable[[str], None]):
        self.args, self.task, self.meter, self.device = args, task, meter, device
        self.per_class = math.ceil(args.num_samples / NUM_CLASSES)
        self.labels = class_labels(self.per_class)
        self.classifier_accuracy, self.reference_accuracy = classifier_accuracy, reference_accuracy
        self.log = log
        self._initial: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] = []
        self.earlier_initial: dict[str, Any] | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()

    def __call__(self, module: torch.nn.Module) -> dict[str, Any]:
        began = time.perf_counter()
        images = sample_images(module, self.task, samples_per_class=self.per_class,
                               steps=self.args.sample_steps, cfg_scale=self.args.cfg_scale,
                               seed=self.args.seed, batch_size=self.args.sample_batch, device=self.device,
                               autocast=self.autocast if self.device.type == "cuda" else None)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        sampled = time.perf_counter()
        score = self.meter(images)
        sample_accuracy = self.meter.accuracy(images, self.labels)
        return {"fid": finite(score), "sample_accuracy": sample_accuracy,
                "classifier_test_accuracy": self.classifier_accuracy,
                "classifier_reference_accuracy": self.reference_accuracy, "num_samples": len(images),
                "sample_seconds": sampled - began, "fid_seconds": time.perf_counter() - sampled}

    def initial(self, module: torch.nn.Module) -> dict[str, Any]:
        """The step-0 evaluation, computed once for every set of initial weights that is the same (an earlier
        run's in the file --append extends: its settings, seed included, match, so its weights do)."""
        if self.earlier_initial is not None:
            return {**self.earlier_initial, "shared": True}
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        for known, result in self._initial:
            if known.keys() == state.keys() and all(torch.equal(known[k], state[k]) for k in state):
                return {**result, "shared": True}
        result = self(module)
        self._initial.append((state, result))
        return result


# ------------------------------------------------------------------------------------------------
# One variant
# ------------------------------------------------------------------------------------------------


def adamw_kind(args: argparse.Namespace, device: torch.device) -> str:
    """The AdamW implementation a run uses: --optimizer on a GPU, foreach on the CPU."""
    return args.optimizer if device.type == "cuda" else "foreach"


@dataclass
class Trainee:
    """One variant ready to train: the model (wrapped or masked as the recipe says), its EMA copy and a
    training step ``step(index, update=True) -> loss`` that reads batch ``index`` and updates model and EMA."""

    model: torch.nn.Module
    ema: EMA
    step: Callable[..., torch.Tensor]
    routes: list[tuple[int, int, float]] | None
    depth: int


def prepare_variant(variant: Variant, args: argparse.Namespace, data: dict[str, torch.Tensor], task: Any,
                    device: torch.device) -> Trainee:
    """Build the variant's model from the seed (the same weights for every variant), its optimizer and step."""
    objective = task.objective
    torch.manual_seed(args.seed)  # same initial weights for every variant
    model = build_model(args.backbone, args.preset)
    depth = stack_depth(model)
    routes = variant.resolve_routes(depth)
    ema = EMA(model, decay=args.ema_decay)  # a plain backbone copy, made before routing
    if "mask" in variant.kwargs:  # MaskDiT: tokenroute.mask instead of wrap (routes then apply in the decoder)
        tokenroute.mask(model, seed=args.seed, routes=routes or (), **variant.kwargs["mask"])
    elif routes:
        tokenroute.wrap(model, routes=routes, seed=args.seed, **variant.kwargs.get("wrap", {}))
    routed = tokenroute.is_wrapped(model)
    model.to(device).train()
    ema.module.to(device)
    combine_kwargs = dict(variant.kwargs.get("combine", {}))
    mae_weight = float(combine_kwargs.get("mae_weight", 0.0))
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.999),
                                  fused=adamw_kind(args, device) == "fused")
    images, labels = data["images"], data["labels"]
    batches = StepBatches(len(images), args.batch_size, seed=args.seed)
    patch_size, null_label = model.patch_size, model.num_classes
    forward = torch.compile(model) if args.compile else model  # the routing masks are read from `model` either way

    def backbone(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
            return forward(x, t, y)

    model_fn = task.backbone_fn(backbone)

    def step(index: int, update: bool = True) -> torch.Tensor:
        idx = batches.indices(index).to(device)
        x0 = to_model_range(images[idx])
        y = labels[idx]
        g = step_generator(args.seed, index, 0, device)
        y = drop_labels(y, args.label_dropout, null_label, g)  # the null label is num_classes
        batch = objective.prepare(x0, generator=g)
        prediction = objective.predict(model_fn, batch, y).float()
        per_token = objective.per_token_loss(prediction, batch, patch_size)
        masks = tokenroute.routing_masks(model) if routed else []
        extra = dict(combine_kwargs)
        if mae_weight > 0:
            extra["mae"] = mae_term(prediction, batch, patch_size)
        loss, parts = tokenroute.losses.combine(per_token, masks, mode=variant.loss_mode, **extra)
        loss.backward()
        if update:
            optimizer.step()
            ema.update(model, index)
        optimizer.zero_grad(set_to_none=True)
        return parts["total"]

    return Trainee(model, ema, step, routes, depth)


def warm_up(trainee: Trainee, args: argparse.Namespace, device: torch.device) -> None:
    """Untimed steps without an update (the weights stay as they are): the first routed forward traces the
    model, torch.compile compiles, kernels, cuBLAS and the allocator warm up."""
    for _ in range(3 if args.compile else 1):
        trainee.step(0, update=False)
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_variant(name: str, variant: Variant, args: argparse.Namespace, data: dict[str, torch.Tensor],
                  evaluate: Evaluator, device: torch.device, on_eval: Callable[[dict[str, Any]], None],
                  log: Callable[[str], None]) -> dict[str, Any]:
    wall_began = time.perf_counter()
    trainee = prepare_variant(variant, args, data, evaluate.task, device)
    ema, step, routes, depth = trainee.ema, trainee.step, trainee.routes, trainee.depth
    warm_up(trainee, args, device)

    points = [{"step": 0, "images": 0, "gpu_seconds": 0.0, "train_loss": None, **evaluate.initial(ema.module)}]
    log(f"{name}: step 0 FID {points[0]['fid']}")
    result = {"routes": [list(r) for r in routes] if routes else None, "loss_mode": variant.loss_mode,
              "kwargs": json.loads(json.dumps(variant.kwargs, default=repr)),
              "depth": depth, "evals": points}
    on_eval(result)

    clock = StepClock(device)
    thresholds = [args.budget_seconds * (k + 1) / args.evals for k in range(args.evals)]
    steps_done = 0
    losses: list[torch.Tensor] = []
    interval_losses: list[float] = []
    eval_seconds = 0.0
    for threshold in thresholds:
        ran = False  # at least one step between evaluations, even when a chunk overshot the next point
        while clock.seconds < threshold or not ran:
            ran = True
            per_step = clock.seconds / steps_done if steps_done else None
            n = args.chunk_steps if per_step is None else max(1, min(args.chunk_steps, math.ceil(
                (threshold - clock.seconds) / max(per_step, 1e-9))))
            if per_step is None:
                n = 1  # the first chunk measures a step

            def chunk(first: int = steps_done, count: int = n) -> None:
                for i in range(first, first + count):
                    losses.append(step(i))

            clock.run(chunk)
            steps_done += n
            interval_losses.extend(torch.stack(losses).float().cpu().tolist())
            losses.clear()
        began = time.perf_counter()
        scored = evaluate(ema.module)
        eval_seconds += time.perf_counter() - began
        mean_loss = sum(interval_losses) / len(interval_losses) if interval_losses else None
        interval_losses = []
        points.append({"step": steps_done, "images": steps_done * args.batch_size, "gpu_seconds": clock.seconds,
                       "train_loss": mean_loss, **scored})
        log(f"{name}: step {steps_done}, {clock.seconds:.1f} GPU s, loss {fmt(mean_loss)}, FID {fmt(scored['fid'])}, "
            f"sample accuracy {scored['sample_accuracy']:.3f} (eval {time.perf_counter() - began:.1f} s)")
        result.update(steps=steps_done, images=steps_done * args.batch_size, gpu_seconds=clock.seconds,
                      images_per_s=steps_done * args.batch_size / clock.seconds,
                      ms_per_step=1000 * clock.seconds / steps_done, final_fid=scored["fid"],
                      final_sample_accuracy=scored["sample_accuracy"])
        on_eval(result)
    result.update(eval_seconds=eval_seconds, wall_seconds=time.perf_counter() - wall_began)
    return result


def compare(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each variant's GPU time to the baseline's final FID, and its ratio to the baseline's total time."""
    base = results.get(BASELINE)
    if not base or base.get("final_fid") is None:
        return {"baseline_final_fid": None, "baseline_gpu_seconds": None, "target_ratio": TARGET_RATIO}
    target, total = base["final_fid"], base["gpu_seconds"]
    out = {"baseline_final_fid": target, "baseline_gpu_seconds": total, "target_ratio": TARGET_RATIO, "variants": {}}
    for name, r in results.items():
        reach = time_to_reach([(p["gpu_seconds"], p["fid"]) for p in r["evals"]], target)
        ratio = reach / total if reach is not None else None
        r.update(time_to_baseline_final_fid=reach, time_ratio_to_baseline=ratio,
                 speedup_to_baseline_final_fid=total / reach if reach else None,
                 images_per_s_ratio_to_baseline=(r["images_per_s"] / base["images_per_s"]
                                                 if r.get("images_per_s") else None))
        out["variants"][name] = {"time_to_baseline_final_fid": reach, "time_ratio_to_baseline": ratio,
                                 "meets_target": (None if name == BASELINE
                                                  else ratio is not None and ratio <= TARGET_RATIO),
                                 "final_fid": r.get("final_fid"), "images_per_s": r.get("images_per_s")}
    return out


def plot(payload: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    summary = payload.get("summary", {})
    for i, (name, r) in enumerate(payload["variants"].items()):
        pts = [(p["gpu_seconds"], p["fid"]) for p in r["evals"] if p.get("fid") is not None]
        if not pts:
            continue
        label = name
        if r.get("images_per_s"):
            label += f" ({r['images_per_s']:.0f} img/s)"
        reach = r.get("time_to_baseline_final_fid")
        marked = reach is not None and name != BASELINE and summary.get("baseline_final_fid") is not None
        if marked:  # the dotted line: where the variant reaches the baseline's final FID
            label += f", baseline's final FID at {reach:.0f} s (dotted)"
            ax.axvline(reach, color=f"C{i}", ls=":", lw=1)
        ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=label)
    if summary.get("baseline_final_fid") is not None:
        ax.axhline(summary["baseline_final_fid"], color="gray", ls="--", lw=1, label="baseline's final FID")
    if all(p.get("fid", 0) and p["fid"] > 0 for r in payload["variants"].values() for p in r["evals"]):
        ax.set_yscale("log")
        from matplotlib.ticker import LogLocator, ScalarFormatter

        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_locator(LogLocator(subs=(2, 3, 5)))
        ax.yaxis.set_minor_formatter(ScalarFormatter())
    cfg, env = payload["config"], payload["environment"]
    acc = payload["classifier"].get("test_accuracy")
    ax.set_xlabel("training GPU seconds" if env.get("cuda") else "training seconds (CPU wall clock)")
    ax.set_ylabel(f"FID (Fashion-MNIST classifier features, {cfg['num_samples']} samples)")
    ax.set_title(f"{cfg['backbone']}/{cfg['preset']} on {env['device']}, batch {cfg['batch_size']}, lr {cfg['lr']:g}; "
                 f"classifier test accuracy {acc:.3f}" if acc is not None else env["device"], fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

# Settings that must agree for --append to put runs side by side.
APPEND_MATCH = ("smoke", "backbone", "preset", "budget_seconds", "evals", "num_samples", "num_reference",
                "sample_steps", "sample_batch", "cfg_scale", "batch_size", "lr", "label_dropout", "ema_decay", "seed",
                "chunk_steps", "device", "model_config", "optimizer", "compile")


def previous_variants(path: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """The variants of an earlier run in `path`, if it ran with the same settings, device and classifier."""
    old = earlier_payload(path, jsonable(payload), APPEND_MATCH,
                          (("environment", "device"), ("classifier", "test_accuracy")), "convergence.py")
    return dict(old.get("variants", {}))


def optimizer_text(args: argparse.Namespace, device: torch.device) -> str:
    return f"AdamW ({adamw_kind(args, device)}) lr {args.lr}, betas (0.9, 0.999), no weight decay"


def step_times(names: Sequence[str], args: argparse.Namespace, data: dict[str, torch.Tensor], device: torch.device,
               output: Path, log: Callable[[str], None], reps: int = 5) -> dict[str, Any]:
    """Each variant's training step as the budgeted runs take it, side by side: every variant built and warmed
    up, then `reps` rounds that run `args.step_times` steps of each in turn; the median ms per step."""
    task = make_task("edm")
    trainees = {name: prepare_variant(VARIANTS[name], args, data, task, device) for name in names}
    for trainee in trainees.values():
        warm_up(trainee, args, device)
    timer, n = Timer(device), args.step_times
    ms: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name, trainee in trainees.items():
            first = 1 + rep * n
            steps = iter(range(first, first + n))
            ms[name].append(timer(lambda: trainee.step(next(steps)), n))
    medians = {name: statistics.median(v) for name, v in ms.items()}
    results = {name: {"ms_per_step": medians[name], "ms_per_step_all": ms[name],
                      "images_per_s": args.batch_size * 1000 / medians[name],
                      f"speedup_over_{names[0]}": medians[names[0]] / medians[name]} for name in names}
    for name, r in results.items():
        log(f"{name:>14}: {r['ms_per_step']:.2f} ms/step, {r['images_per_s']:.0f} img/s, "
            f"{r[f'speedup_over_{names[0]}']:.3f}x")
    config = {"backbone": args.backbone, "preset": args.preset, "batch_size": args.batch_size,
              "optimizer": optimizer_text(args, device), "compile": args.compile, "steps_per_rep": n, "reps": reps,
              "autocast": "bf16" if device.type == "cuda" else None, "model_config": model_config(args.backbone,
                                                                                                  args.preset)}
    payload = {"benchmark": "convergence_step_times", "environment": environment(device), "config": config,
               "variants": results}
    write_json(payload, output)
    return payload


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    defaults = PRESET_DEFAULTS[args.preset]
    args.batch_size = args.batch_size or defaults["batch_size"]
    args.lr = args.lr if args.lr is not None else defaults["lr"]
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        parser.error(f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    if args.budget_seconds <= 0 or args.evals < 1 or args.num_samples < 2 or args.chunk_steps < 1:
        parser.error("--budget-seconds must be > 0, --evals and --chunk-steps >= 1, --num-samples >= 2")
    device = bench_device(cpu=args.smoke, name=args.device)
    output = args.output or fidlib.RESULTS_DIR / ("convergence_smoke.json" if args.smoke else "convergence.json")
    log = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))

    began = time.perf_counter()
    try:
        folder = locate_fashion_mnist(args.data_dir, download=not args.no_download)
        train_images, train_labels = load_fashion_mnist(folder, splits=("train",), download=False)
        test_images, test_labels = load_fashion_mnist(folder, splits=("t10k",), download=False)
    except DataError as err:
        raise SystemExit(f"convergence.py: error: {err}") from None
    if args.num_reference and args.num_reference < len(test_images):
        test_images, test_labels = test_images[:args.num_reference], test_labels[:args.num_reference]
    data = {"images": pad_images(train_images).to(device), "labels": train_labels.to(device)}
    reference = pad_images(test_images)
    if args.step_times:
        return step_times(names, args, data, device, args.output or fidlib.RESULTS_DIR / "convergence_step_times.json",
                          log)

    info = fidlib.classifier_info(args.classifier)
    meter = fidlib.FIDMeter(reference, weights=args.classifier, device=device)
    reference_accuracy = meter.accuracy(reference, test_labels)
    evaluate = Evaluator(args, make_task("edm"), meter, device, info.get("test_accuracy"),
                         reference_accuracy, log)
    log(f"data {folder}: {len(train_images)} training images, {len(reference)} reference images; classifier "
        f"accuracy on them {reference_accuracy:.4f} (recorded test accuracy {info.get('test_accuracy')}); "
        f"setup {time.perf_counter() - began:.1f} s")

    config = {k: v for k, v in vars(args).items() if k not in ("output", "quiet")}
    config.update(variants=names, num_samples=evaluate.per_class * NUM_CLASSES, objective="edm",
                  sampler=f"EDM Heun, {args.sample_steps} steps, EMA weights, unrouted, eval mode",
                  optimizer=optimizer_text(args, device),
                  autocast="bf16" if device.type == "cuda" else None,
                  model_config=model_config(args.backbone, args.preset), device=str(device),
                  clock="CUDA events around training steps" if device.type == "cuda" else "wall clock (CPU)")
    payload: dict[str, Any] = {
        "benchmark": "convergence", "environment": environment(device), "config": config,
        "data": {"folder": str(folder), "train_images": len(train_images), "reference_images": len(reference),
                 "reference": "Fashion-MNIST t10k"},
        "classifier": {"weights": str(args.classifier), "test_accuracy": info.get("test_accuracy"),
                       "accuracy_on_reference": reference_accuracy, "num_features": fidlib.NUM_FEATURES,
                       "fid_train10k_vs_test": info.get("fid_train10k_vs_test")},
        "targets": {"time_ratio_to_baseline_final_fid": TARGET_RATIO},
        "variants": {}, "summary": {},
    }

    if args.append and output.is_file():
        payload["variants"] = previous_variants(output, payload)
        config["variants"] = list(dict.fromkeys([*payload["variants"], *names]))
        evaluate.earlier_initial = next((r["evals"][0] for r in payload["variants"].values()
                                         if r.get("evals") and r["evals"][0]["step"] == 0), None)
    png = output.with_suffix(".png")

    def save() -> None:  # after every evaluation: a run cut short keeps its figures and plot
        payload["summary"] = compare(payload["variants"])
        payload["wall_seconds"] = time.perf_counter() - began
        write_json(payload, output)
        plot(payload, png)

    for name in names:
        def on_eval(result: dict[str, Any], name: str = name) -> None:
            payload["variants"][name] = result
            save()

        log(f"{name}: routes {VARIANTS[name].routes}, loss mode {VARIANTS[name].loss_mode}, "
            f"{args.budget_seconds:g} s budget")
        train_variant(name, VARIANTS[name], args, data, evaluate, device, on_eval, log)
        save()
        gc.collect()  # the variant's model, EMA and optimizer go before the next one starts
        if device.type == "cuda":
            torch.cuda.empty_cache()
    summary = payload["summary"]
    for name, r in payload["variants"].items():
        s = summary.get("variants", {}).get(name, {})
        reach = s.get("time_to_baseline_final_fid")
        ratio = s.get("time_ratio_to_baseline")
        print(f"{name:>14}: {r.get('steps')} steps, {fmt(r.get('images_per_s'), '.0f')} img/s, final FID "
              f"{fmt(r.get('final_fid'))}, sample accuracy {fmt(r.get('final_sample_accuracy'), '.3f')}; "
              + (f"reaches the baseline's final FID at {reach:.1f} s ({ratio:.2f} of the baseline's time)"
                 if reach is not None else "never reaches the baseline's final FID" if "variants" in summary
                 else f"no {BASELINE} in the file to compare with"), flush=True)
    print(f"classifier test accuracy {info.get('test_accuracy')}; wrote {output} and {png} "
          f"({payload['wall_seconds']:.0f} s)", flush=True)
    return payload


if __name__ == "__main__":
    main()
