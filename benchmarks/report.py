"""Print the README's performance tables from the result files (so the README can be regenerated).

    python benchmarks/report.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def caption(text: str, path: Path) -> str:
    """A table's caption, naming the result file it is read from."""
    return f"{text} (`{path.relative_to(RESULTS.parent.parent)}`):"


def header(columns: list[str]) -> list[str]:
    """A markdown table's header row and its separator."""
    return ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]


def throughput(path: Path = RESULTS / "throughput.json") -> str:
    data = json.loads(path.read_text())
    env = data["environment"]
    rows = [caption(f"Training step, {env['device']}, torch {env['torch']}, bf16 autocast, AdamW, median of "
                    f"{data['config']['repetitions']} interleaved repetitions of {data['config']['steps_per_repetition']} "
                    "steps", path), "",
            *header(["model", "batch", "unwrapped ms", "wrapped, routing off ms", "routed ms", "hand-written TREAD ms",
                     "FLOP-ideal", "achieved", "achieved / ideal", "routed / hand-written", "off / unwrapped",
                     "MaskDiT ms (speed-up, ideal)"])]
    for r in data["results"]:
        v = {k: x["ms_per_step"] for k, x in r["variants"].items()}
        name = r["model"] + (" (compiled)" if r["compile"] else "") + (", fused AdamW" if "fused" in r.get("optimizer", "") else "")
        masked = (f"{v['masked']:.1f} ({r['masked_speedup']:.2f}x, {r['masked_ideal_speedup']:.2f}x)"
                  if "masked" in v else "")
        rows.append(f"| {name} | {r['batch']} | {v['unwrapped']:.1f} | {v['wrapped_off']:.1f} | {v['routed']:.1f} | "
                    f"{v['handwritten']:.1f} | {r['ideal_speedup']:.2f}x | {r['achieved_speedup']:.2f}x | "
                    f"{r['achieved_over_ideal']:.2f} | {r['routed_over_handwritten_time']:.3f} | "
                    f"{r['wrapped_off_over_unwrapped_time']:.3f} | {masked} |")
    return "\n".join(rows)


def _profile_label(r: dict) -> str:
    """A profiled step's name in the tables: model, batch, mode and, where fused, the optimizer."""
    return (f"{r['model']}, batch {r['batch']}" + (" (compiled)" if r["compile"] else " (eager)")
            + (", fused AdamW" if "fused" in r.get("optimizer", "") else ""))


def profile(path: Path = RESULTS / "profile_step.json", top: int = 12) -> str:
    data = json.loads(path.read_text())
    env = data["environment"]
    present = data["results"][0]["kernel_ms_per_step"]["unwrapped"]
    categories = [c for c in ("matmul", "attention", "gather_scatter", "copy", "optimizer", "other") if c in present]
    rows = [caption(f"Kernel time per training step by category, {env['device']}, torch {env['torch']}", path), "",
            *header(["model", *(f"{c.replace('_', '/')} ms" for c in categories), "kernel speed-up", "FLOP-ideal",
                     "kernel speed-up / ideal", "same without the optimizer"])]
    for r in data["results"]:
        ms = r["kernel_ms_per_step"]
        cells = " | ".join(f"{ms['unwrapped'][c]:.1f} -> {ms['routed'][c]:.1f}" for c in categories)
        rows.append(f"| {_profile_label(r)} | {cells} | {r['kernel_speedup']:.2f}x | {r['ideal_speedup']:.2f}x | "
                    f"{r['kernel_achieved_over_ideal']:.2f} | {r['achieved_over_ideal_without_optimizer']:.2f} |")
    for r in data["results"]:  # files from before the kernels were listed one by one have none
        listed = f"{r['model']}, batch {r['batch']}{' (compiled)' if r['compile'] else ''}"
        if r.get("top_kernels"):
            rows += ["", f"{listed}: the kernels that take the unwrapped step longest", "",
                     *header(["kernel", "category", "unwrapped ms", "routed ms", "speed-up"])]
            rows += [f"| `{k['kernel'][:80]}` | {k['category']} | {k['unwrapped_ms']:.2f} | {k['routed_ms']:.2f} | "
                     + ("-" if k["speedup"] is None else f"{k['speedup']:.2f}x") + " |" for k in r["top_kernels"][:top]]
        if r.get("operators_over_tokens_ratio"):  # profiles from before the operators were summed have none
            rows += ["", f"{listed}: the operators whose routed time exceeds the tokens' ratio "
                     f"({r['tokens_ratio']:.2f}x) most", "",
                     *header(["operator", "category", "unwrapped ms", "routed ms", "over the tokens' ratio, ms"])]
            rows += [f"| `{o['operator']}` | {o['category']} | {o['unwrapped_ms']:.2f} | {o['routed_ms']:.2f} | "
                     f"{o['excess_ms']:+.2f} |" for o in r["operators_over_tokens_ratio"][:top]]
    return "\n".join(rows)


# The step profiles (``profile_step.py``), today's DiT-XL/2 at a full GPU first, then the earlier default batches.
PROFILE_FILES = ("profile_step_dit_xl_fused_b160.json", "profile_step.json", "profile_step_mamba_uvit.json",
                 "profile_step_uvit_fused.json")


def _against_ideal(ms: dict[str, dict[str, float]], ideal: dict[str, float], category: str, reference: str) -> str:
    """One category's kernel speed-up, the ``reference`` category's FLOP ideal, and their ratio; "-" where the
    profile has no such kernels or the count no such FLOPs."""
    if not ms["routed"].get(category) or reference not in ideal:
        return "-"
    speedup = ms["unwrapped"][category] / ms["routed"][category]
    return f"{speedup:.2f}x ({ideal[reference]:.2f}x): {speedup / ideal[reference]:.2f}"


def profile_against_flops(paths: tuple[Path, ...] = tuple(RESULTS / name for name in PROFILE_FILES),
                          flops_path: Path = RESULTS / "profile_flops.json") -> str:
    """Each category's kernel speed-up beside the speed-up its FLOPs allow: matmuls and attention against their
    own FLOP ratios, the other kernels against the matmuls' (what work that scales with the tokens kept allows).
    The ideals come from the profile where it recorded them, else from ``profile_step.py --flops-only``."""
    counted = {r["model"]: r["ideal_speedup_by_category"] for r in json.loads(flops_path.read_text())["results"]}
    rows = [f"Kernel speed-up by category against its FLOP ideal (`{flops_path.relative_to(RESULTS.parent.parent)}` "
            "where a profile has none):", "",
            *header(["model", "matmul (ideal)", "attention (ideal)", "other (against the matmuls' ideal)"])]
    for path in paths:
        for r in json.loads(path.read_text())["results"]:
            ideal = r.get("ideal_speedup_by_category") or counted[r["model"]]
            cells = [_against_ideal(r["kernel_ms_per_step"], ideal, category, reference)
                     for category, reference in (("matmul", "matmul"), ("attention", "attention"), ("other", "matmul"))]
            rows.append(f"| {_profile_label(r)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def convergence(path: Path = RESULTS / "convergence.json") -> str:
    data = json.loads(path.read_text())
    env, config, summary = data["environment"], data["config"], data["summary"]
    rows = [caption(f"Fashion-MNIST, DiT `{config.get('preset')}`, {env['device']}, {summary['baseline_gpu_seconds']:.0f} "
                    f"training GPU seconds per variant, batch {config.get('batch_size')}, "
                    f"{config.get('optimizer', '').split(',')[0]}, FID of {config.get('num_samples')} "
                    "samples against the test set on the features of a classifier with "
                    f"{data['classifier']['test_accuracy']:.3f} test accuracy", path), "",
            *header(["variant", "images/s", "final FID", "GPU time to the baseline's final FID",
                     "ratio to the baseline's time", "samples recognised as their class"])]
    for name, v in summary["variants"].items():
        reach = "not reached" if v["time_to_baseline_final_fid"] is None else f"{v['time_to_baseline_final_fid']:.1f} s"
        ratio = "-" if v["time_ratio_to_baseline"] is None else f"{v['time_ratio_to_baseline']:.2f}"
        accuracy = data["variants"][name].get("final_sample_accuracy")
        rows.append(f"| {name} | {v['images_per_s']:.0f} | {v['final_fid']:.2f} | {reach} | {ratio} | "
                    + ("-" if accuracy is None else f"{accuracy:.1%}") + " |")
    return "\n".join(rows)


STEP_TIME_FILES = ("convergence_step_times_b128_foreach.json", "convergence_step_times_b128_fused.json",
                   "convergence_step_times_b128_fused_compiled.json", "convergence_step_times_b256_fused.json",
                   "convergence_step_times_b256_fused_compiled.json")


def step_times(names: tuple[str, ...] = STEP_TIME_FILES) -> str:
    """The time-to-quality benchmark's training step per setting (``convergence.py --step-times``): ms per step
    of the first variant, each variant's speed-up over it."""
    runs = [(RESULTS / name, json.loads((RESULTS / name).read_text())) for name in names]
    variants = list(runs[0][1]["variants"])
    rows = [f"Training step of the time-to-quality benchmark, {runs[0][1]['environment']['device']}, DiT "
            f"`{runs[0][1]['config']['preset']}`, bf16 autocast, median of {runs[0][1]['config']['reps']} interleaved "
            "repetitions (`benchmarks/results/convergence_step_times_*.json`):", "",
            *header(["batch", "AdamW", "torch.compile", f"{variants[0]} ms",
                     *(f"{v} speed-up" for v in variants[1:])])]
    for _, run in runs:
        config, v = run["config"], run["variants"]
        kind = config["optimizer"].split("(")[1].split(")")[0]
        rows.append(f"| {config['batch_size']} | {kind} | {'yes' if config['compile'] else 'no'} | "
                    f"{v[variants[0]]['ms_per_step']:.1f} | "
                    + " | ".join(f"{v[variants[0]]['ms_per_step'] / v[name]['ms_per_step']:.2f}x" for name in variants[1:])
                    + " |")
    return "\n".join(rows)


# The training-step figures each target is judged on, most current first: a backbone's row comes from the first
# file that has it. Eager: fused AdamW at the largest batch the unrouted model fits. Compiled: fused AdamW once
# timed (``throughput.py --compile-only --optimizer fused``), else the earlier unfused run. Mamba-B/2's short run
# (2 x 2 steps, cap 2048) follows its standard one (cap 288) for the variants' own largest batches, which only it has.
EAGER_FILES = ("throughput_largest_batch_dit_xl.json", "throughput_largest_batch_others.json",
               "throughput_largest_batch_mamba.json", "throughput_largest_batch_mamba_short.json")
COMPILED_FILES = ("throughput_compiled_fused.json", "throughput_compiled_recheck.json", "throughput_compiled.json")


def _rows_by_model(results: Path, names: tuple[str, ...]) -> dict[str, dict]:
    """Each model's result from the first of ``names`` (files in ``results``) that has it; absent files skipped."""
    rows: dict[str, dict] = {}
    for name in names:
        path = results / name
        if path.exists():
            data = json.loads(path.read_text())
            config = data["config"]
            timing = f"median of {config['repetitions']} x {config['steps_per_repetition']} steps"
            for result in data["results"]:
                rows.setdefault(result["model"], {**result, "file": name, "timing": timing})
    return rows


def _verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def targets(results: Path = RESULTS, eager_files: tuple[str, ...] = EAGER_FILES,
            compiled_files: tuple[str, ...] = COMPILED_FILES) -> str:
    """Where the training-speed targets stand, one row per backbone, then the first step and time to quality:
    each figure beside its target and the file it comes from, judged by ``throughput.meets_targets`` (today's
    targets, whatever an older file recorded)."""
    from throughput import TARGETS, floor_target as floor, meets_targets  # imports torch: only this table needs it

    eager, compiled = _rows_by_model(results, eager_files), _rows_by_model(results, compiled_files)
    verdicts = {mode: {model: meets_targets(r) for model, r in rows.items()}
                for mode, rows in (("eager", eager), ("compiled", compiled))}

    def speed(mode: str, rows: dict[str, dict], model: str) -> str:
        if model not in rows:
            return "not measured"
        r = rows[model]
        optimizer = "fused" if "fused" in r.get("optimizer", "") else "unfused"
        return (f"{r['achieved_over_ideal']:.3f} ({_verdict(verdicts[mode][model][floor(model)])}; batch "
                f"{r['batch']}, {optimizer} AdamW, {r['timing']}, `{r['file']}`)")

    def ratios(model: str, key: str) -> str:
        found = [(mode, rows[model][key], verdicts[mode][model][key])
                 for mode, rows in (("eager", eager), ("compiled", compiled)) if model in rows]
        return (", ".join(f"{value:.3f} {mode}" for mode, value, _ in found)
                + f" ({_verdict(all(met for _, _, met in found))})")

    rows = ["Where the training-speed targets stand (eager: fused AdamW at the largest batch the unrouted model fits):",
            "", *header(["backbone", "achieved / FLOP-ideal, target", "eager", "compiled",
                         f"routed / hand-written (<= {TARGETS['routed_over_handwritten_time']})",
                         f"routing off / unwrapped (within {TARGETS['wrapped_off_over_unwrapped_time'] - 1:.0%})"])]
    for model in eager | compiled:
        rows.append(f"| {model} | >= {TARGETS[floor(model)]} | {speed('eager', eager, model)} | "
                    f"{speed('compiled', compiled, model)} | {ratios(model, 'routed_over_handwritten_time')} | "
                    f"{ratios(model, 'wrapped_off_over_unwrapped_time')} |")
    first = json.loads((results / "first_step.json").read_text())
    limit = first["targets"]["first_over_later_peak_memory"]
    peaks = [(r["batch"], r["first_over_later_peak_memory"]) for r in first["results"]]
    rows += ["", "- First routed step's peak memory over a later step's (target <= "
             f"{limit}): " + ", ".join(f"{p:.3f} at batch {b}" for b, p in peaks)
             + f" ({_verdict(all(p <= limit for _, p in peaks))}; `first_step.json`)."]
    quality = json.loads((results / "convergence_long.json").read_text())["summary"]
    reached = {name: v["time_ratio_to_baseline"] for name, v in quality["variants"].items()
               if name != "baseline" and v["time_ratio_to_baseline"] is not None}
    best = min(reached, key=reached.get) if reached else None
    rows.append(f"- Time to the baseline's final FID over the baseline's time (target <= {quality['target_ratio']}): "
                + (f"best {reached[best]:.2f} ({best}; {_verdict(reached[best] <= quality['target_ratio'])}"
                   if best else "no variant reaches it (**missed**") + "; `convergence_long.json`).")
    return "\n".join(rows)


def caching(path: Path = RESULTS / "caching.json") -> str:
    """One table per step count, variants by their speed-up at a full batch."""
    data = json.loads(path.read_text())
    rows = [caption(f"{data['environment']['device']}, FID on {data['fid_features']}", path)]
    for steps, run in data["runs"].items():
        rows += ["", *header([f"{steps} steps", "speed-up, batch 1000", "speed-up, batch 1", "GFLOPs per image",
                              "slot calls computed", "FID"])]
        for name, v in sorted(run["variants"].items(), key=lambda item: item[1]["speedup_full_batch"]):
            computed = v.get("slot_calls_computed")
            rows.append(f"| {name} | {v['speedup_full_batch']:.2f}x | {v['speedup_batch_1']:.2f}x | "
                        f"{v['flops_per_image'] / 1e9:.1f} | {'' if computed is None else f'{computed:.0%}'} | "
                        f"{v['fid']:.2f} |")
    return "\n".join(rows)


def local_attention(path: Path = RESULTS / "local_attention.json") -> str:
    """Milliseconds and speed-up over dense attention, per token count: the call reordering around itself, the call
    on a sequence in tile order (as a stack run in tile order makes it), the FlexAttention kernel alone, each mask's
    block sparsity; the whole model, and reordering around each attention where it was timed."""
    data = json.loads(path.read_text())
    batch = data["config"].get("batch", 1)
    rows = [caption(f"{data['environment']['device']}, bf16, batch {batch}, forward", path), "",
            *header(["image tokens", "variant", "attention ms (reordered per call)", "in tile order ms", "speed-up",
                     "kernel alone ms", "block sparsity", "DiT-XL forward ms", "speed-up", "reordered per attention ms"])]
    for tokens, run in data["runs"].items():
        for name, a in run["attention"].items():
            models = run.get("model", {})
            m, per = models.get(name), models.get(f"{name}, reordered per attention")
            sparsity = "" if a["block_sparsity"] is None else f"{a['block_sparsity']:.1%}"
            kernel = f"{a['kernel_ms']:.3f}" if "kernel_ms" in a else "-"
            stacked = f"{a['in_stack_ms']:.3f}" if "in_stack_ms" in a else "-"
            speedup = a.get("in_stack_speedup", a["speedup"])
            model = f"{m['ms']:.1f} | {m['speedup']:.2f}x" if m else "- | -"
            per_ms = f"{per['ms']:.1f} ({per['speedup']:.2f}x)" if per else "-"
            rows.append(f"| {tokens} | {name} | {a['ms']:.3f} | {stacked} | {speedup:.2f}x | {kernel} | {sparsity} | "
                        f"{model} | {per_ms} |")
    return "\n".join(rows)


def largest_batches(path: Path = RESULTS / "throughput_largest_batch_dit_xl.json") -> str:
    """Each variant at its own largest batch (``throughput.py --largest-batch``)."""
    data = json.loads(path.read_text())
    rows = [caption(f"{data['environment']['device']}, each variant at its own largest batch", path), "",
            *header(["model", "variant", "batch alone", "batch interleaved", "ms per step", "images/s",
                     "peak memory GiB"])]
    for result in data["results"]:
        for name, v in result["own_largest_batch"].items():
            rows.append(f"| {result['model']} | {name} | {v.get('batch_fitting_alone', '-')} | {v['batch']} | "
                        f"{v['ms_per_step']:.1f} | {v['images_per_s']:.0f} | {v['peak_memory_gib']:.1f} |")
    return "\n".join(rows)


def local_attention_quality(path: Path = RESULTS / "local_attention_quality.json") -> str:
    data = json.loads(path.read_text())
    rows = [caption(f"{data['environment']['device']}, FID of {data['config']['fid_samples']} samples on "
                    f"{data['fid_features']}", path), "",
            *header(["variant", "FID", "over the teacher's", "samples recognised as their class"])]
    for name, v in data["variants"].items():
        rows.append(f"| {name} | {v['fid']:.2f} | {v['fid_over_teacher']:.2f}x | {v['class_accuracy']:.1%} |")
    return "\n".join(rows)


def token_density(path: Path = RESULTS / "token_density.json") -> str:
    data = json.loads(path.read_text())
    rows = [caption(f"{data['environment']['device']}, {data['config']['steps']} Euler steps, batch "
                    f"{data['config']['batch']}, FID of {data['config']['fid_samples']} samples on "
                    f"{data['fid_features']}", path), "",
            *header(["variant", "images/s", "throughput", "FLOPs", "FID"])]
    for name, v in data["variants"].items():
        rows.append(f"| {name} | {v['images_per_s']:.0f} | {v['throughput_speedup']:.2f}x | {v['flops_share']:.0%} | "
                    f"{v['fid']:.2f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(targets())  # the README's order: targets, a full GPU, the default batches, the profiles, earlier runs
    for name in EAGER_FILES:
        print()
        print(throughput(RESULTS / name))
        print()
        print(largest_batches(RESULTS / name))
    for name in ("throughput_fused_dit_xl.json", "throughput_fused_others.json"):
        print()
        print(throughput(RESULTS / name))
    print()
    print(throughput(RESULTS / "throughput_compiled_fused.json"))
    for name in PROFILE_FILES:
        print()
        print(profile(RESULTS / name))
    print()
    print(profile_against_flops())
    for name in ("throughput.json", "throughput_compiled.json", "throughput_compiled_recheck.json"):
        print()
        print(throughput(RESULTS / name))
    print()
    print(convergence())
    print()
    print(convergence(RESULTS / "convergence_lr1e-4.json"))
    print()
    print(step_times())
    print()
    print(convergence(RESULTS / "convergence_long.json"))
    print()
    print(convergence(RESULTS / "convergence_long_lr1e-4.json"))
    print()
    print(caching())
    print()
    print(caching(RESULTS / "caching_diffusers.json"))
    for part in (local_attention, local_attention_quality, token_density):
        try:
            text = part()
        except FileNotFoundError as err:
            text = f"({part.__name__}: no results yet: {err.filename})"
        print()
        print(text)
