"""Local attention's quality (CLEAR) on the project's pretrained DiT: fine-tuned at a larger grid, distilled into
radius-8 windows with and without pooled keys and values; FID beside the teacher's.

Stages, each cached (``$TOKENROUTE_CACHE``, see ``pretrained.py``) so that the pipeline may run over several
sessions:

1. ``dit-small-fmnist`` (``pretrained.py``): Fashion-MNIST at 32 x 32, 16 x 16 tokens.
2. ``dit-small-fmnist-64``, the teacher: that model fine-tuned on the images upsampled to 64 x 64 (32 x 32 tokens,
   where a radius of 8 is local).
3. The students: ``examples/distill_local_attention.py`` on the teacher, radius 8, without and with pooled keys
   and values (4 x 4 windows: 64 pooled tokens); only the attention projections and the pooling weights train.
4. FID on the project's classifier features (``fid.py``; samples averaged down to the 32 x 32 frame of the
   28 x 28 images) against the test set, for the teacher, for local attention applied without distillation, and
   for the students; Euler sampling with classifier-free guidance, fixed noise, classes in turn.

Writes results/local_attention_quality.json and .png.

    python benchmarks/local_attention_quality.py               # on the GPU
    python benchmarks/local_attention_quality.py --keep        # measure only the variants the JSON lacks
    python benchmarks/local_attention_quality.py --smoke --cpu # a tiny stand-in: checks the script runs
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from tokenroute.methods.local_attention import LocalAttentionConfig, apply_local_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import caching  # noqa: E402
import distill_local_attention  # noqa: E402
import fid  # noqa: E402
import pretrained  # noqa: E402
from common import RESULTS, bench_device, environment, write_json  # noqa: E402

TEACHER = pretrained.NAME + "-64"
RECIPE = (2000, 4096)  # distillation steps and teacher samples of the cached students' names without a suffix


def variants(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The local rules measured: radius r alone and with pooled d x d keys and values."""
    out = {f"radius {args.radius:g}": dict(radius=args.radius)}
    if args.pooled:
        out[f"radius {args.radius:g}, pooled {args.pooled}x{args.pooled}"] = dict(radius=args.radius, pooled=args.pooled)
    return out


def teacher(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Stages 1 and 2: the pretrained model, then its fine-tune at the larger grid."""
    base = pretrained.NAME + ("-smoke" if args.smoke else "")
    name = TEACHER + ("-smoke" if args.smoke else "")
    common = dict(preset="tiny" if args.smoke else "small", size={} if args.smoke else None,
                  batch_size=16 if args.smoke else 256, data_dir=args.data_dir)
    if not pretrained.paths(name)[0].exists():  # the base is needed only to make the teacher
        pretrained.ensure(base, device=device, minutes=0.05 if args.smoke else args.pretrain_minutes, **common)
    return pretrained.ensure(name, device=device, image_size=args.image_size,
                             init=base, minutes=0.05 if args.smoke else args.finetune_minutes,
                             lr=args.finetune_lr, **common)


def student(model: torch.nn.Module, label: str, rule: dict[str, Any], args: argparse.Namespace,
            device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Stage 3: a copy of the teacher with local attention, distilled (or read from the cache)."""
    recipe = "" if (args.distill_steps, args.distill_samples) == RECIPE else \
        f"-{args.distill_steps}steps-{args.distill_samples}samples"  # a longer distillation is another student
    name = f"{TEACHER}-local-" + label.replace(" ", "").replace(",", "-") + recipe + ("-smoke" if args.smoke else "")
    variant = copy.deepcopy(model)
    if pretrained.paths(name)[0].exists():
        weights, facts = pretrained.read(name, "python benchmarks/local_attention_quality.py")
        apply_local_attention(variant, LocalAttentionConfig(**rule))
        variant.load_state_dict(weights)
        return variant.to(device).eval(), facts["distillation"]
    argv = [f"--image-size={args.image_size}", f"--radius={rule['radius']}", f"--steps={args.distill_steps}",
            f"--samples={args.distill_samples}", f"--batch-size={args.distill_batch}", f"--lr={args.distill_lr}",
            f"--checkpoint-every={args.distill_steps}", "--keep-checkpoints=1", "--seed=0"]
    argv += [f"--pooled={rule['pooled']}"] if rule.get("pooled") else []
    argv += ["--cpu"] if device.type == "cpu" else []
    with tempfile.TemporaryDirectory() as folder:
        summary = distill_local_attention.main(argv + [f"--output={folder}"], model=variant)
    pretrained.store(name, variant.state_dict(), {"name": name, "teacher": TEACHER, "rule": rule,
                                                   "distillation": summary, "environment": environment()})
    return variant.eval(), summary


SETTINGS = ("image_size", "radius", "pooled", "distill_steps", "distill_samples", "distill_batch", "distill_lr",
            "sample_steps", "cfg_scale", "fid_samples", "smoke")  # what makes two runs' FIDs comparable


def kept(args: argparse.Namespace) -> dict[str, Any]:
    """With ``--keep``: the variants ``--out`` holds, refused where they were measured with other settings."""
    if not args.keep or not args.out.exists():
        return {}
    previous = json.loads(args.out.read_text())
    differ = [k for k in SETTINGS if previous["config"].get(k) != getattr(args, k)]
    if differ:
        raise SystemExit(f"--keep: {args.out} was measured with other settings ({', '.join(differ)}); drop --keep or "
                         "give the same settings")
    when = previous["environment"].get("date")
    return {label: row | {"measured": row.get("measured", when)} for label, row in previous["variants"].items()}


def plot(payload: dict[str, Any], path: Path) -> None:
    """FID per variant on a linear axis from 0, each bar labelled with its FID and its ratio to the teacher's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch as Swatch

    rows = payload["variants"]
    names = list(rows)
    colours = {"teacher": "0.4", "distilled": "C0", "not distilled": "C1"}
    kinds = ["teacher" if rows[n]["kind"] == "teacher" else "distilled" if rows[n]["distilled"] else "not distilled"
             for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(range(len(names)), [rows[n]["fid"] for n in names], color=[colours[k] for k in kinds])
    ax.bar_label(bars, [f"{rows[n]['fid']:.2f} ({rows[n]['fid_over_teacher']:.2f}x)" for n in names], fontsize=8)
    teacher_fid = rows["teacher (dense)"]["fid"]
    ax.axhline(teacher_fid * 1.1, ls="--", c="k", lw=1)
    ax.set_xticks(range(len(names)), [n.replace(", ", ",\n") for n in names], fontsize=8)
    ax.set_ylabel(f"FID ({payload['fid_features']})", fontsize=8)
    ax.set_ylim(0, max(rows[n]["fid"] for n in names) * 1.15)
    ax.legend(handles=[Swatch(color=colours[k], label=k) for k in colours if k in kinds]
              + [plt.Line2D([], [], ls="--", c="k", lw=1, label="target: teacher + 10%")], fontsize=8, loc="upper left")
    ax.set_title(f"Local attention on a 32x32-token DiT: FID, {payload['environment']['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--radius", type=float, default=8.0)
    parser.add_argument("--pooled", type=int, default=4, help="d of the pooled variant; 0: measure radius alone")
    parser.add_argument("--pretrain-minutes", type=float, default=4.0, help="for the pretrained model, if missing")
    parser.add_argument("--finetune-minutes", type=float, default=3.0, help="for the teacher, if missing")
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--distill-steps", type=int, default=RECIPE[0])
    parser.add_argument("--distill-samples", type=int, default=RECIPE[1], help="teacher samples to distil on")
    parser.add_argument("--distill-batch", type=int, default=64)
    parser.add_argument("--distill-lr", type=float, default=1e-4)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--fid-samples", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--stages", choices=("models", "all"), default="all",
                        help="models: build and cache the teacher and students only (no FID)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few samples: checks the script runs")
    parser.add_argument("--out", type=Path, default=RESULTS / "local_attention_quality.json")
    parser.add_argument("--keep", action="store_true",
                        help="keep the variants --out already holds (measured with the same settings), measure the rest")
    args = parser.parse_args(argv)
    if args.smoke:
        args.image_size, args.radius, args.pooled, args.distill_steps, args.distill_samples = 16, 2.0, 2, 3, 8
        args.distill_batch, args.sample_steps, args.fid_samples, args.batch = 4, 2, 20, 10
    previous = kept(args)  # refused before any work where the settings differ
    device = bench_device(cpu=args.cpu)
    model, facts = teacher(args, device)
    students = {label: (rule, *student(model, label, rule, args, device)) for label, rule in variants(args).items()}
    if args.stages == "models":
        return {"teacher": facts, "students": {label: s[2] for label, s in students.items()}}
    real, _ = fid.load_split("t10k", args.data_dir)
    meter = fid.FIDMeter(real[: max(args.fid_samples, 2)], device=device)
    labels = torch.arange(args.fid_samples) % 10
    sampler = pretrained.sampler(args.sample_steps, cfg_scale=args.cfg_scale)
    measured: dict[str, tuple[str, bool, torch.nn.Module, dict[str, Any]]] = {"teacher (dense)": ("teacher", False, model, {})}
    for label, (rule, distilled, summary) in students.items():  # the students first: a run cut short keeps them
        measured[f"{label}, distilled"] = ("local", True, distilled, {"distillation": summary})
    for label, (rule, _, _) in students.items():
        zero_shot = apply_local_attention(copy.deepcopy(model), LocalAttentionConfig(**rule))
        measured[f"{label}, not distilled"] = ("local", False, zero_shot, {})
    payload: dict[str, Any] = {
        "environment": environment(), "config": vars(args) | {"out": str(args.out)},
        "teacher": {k: facts.get(k) for k in ("name", "init", "size", "steps", "minutes", "lr", "command")},
        "fid_features": f"Fashion-MNIST classifier, test accuracy {fid.classifier_info()['test_accuracy']:.4f}",
        "variants": previous}
    for label, (kind, distilled, variant, extra) in measured.items():
        if label in payload["variants"]:
            continue
        images = caching.images(variant, sampler, args.fid_samples, args.batch, device, size=args.image_size)
        row = {"kind": kind, "distilled": distilled, "fid": meter(images),
               "class_accuracy": meter.accuracy(images, labels), **extra}
        row["fid_over_teacher"] = row["fid"] / payload["variants"]["teacher (dense)"]["fid"] if payload["variants"] else 1.0
        payload["variants"][label] = row
        print(f"{label:<40} FID {row['fid']:8.3f}  x{row['fid_over_teacher']:.3f} of the teacher's", flush=True)
        write_json(args.out, payload)  # what is measured so far survives a time limit
    payload["targets"] = {"within_10pct_of_teacher": [label for label, row in payload["variants"].items()
                                                      if row["distilled"] and row["fid_over_teacher"] <= 1.10]}
    write_json(args.out, payload)
    plot(payload, args.out.with_suffix(".png"))
    return payload


if __name__ == "__main__":
    main()
