"""The project's pretrained model to measure inference methods on (feature caching, local attention, token
density): a class-conditional DiT trained on Fashion-MNIST with rectified flow, on the GPU in a few minutes.

No pretrained diffusion weights exist offline, so the benchmarks train their own and cache them outside the
repository (``$TOKENROUTE_CACHE``, default ``~/.cache/tokenroute``), with the facts of the run beside them:

    python benchmarks/pretrained.py                      # build (or rebuild) dit-small-fmnist on the GPU
    python benchmarks/pretrained.py --minutes 1 --cpu    # a quick stand-in on the CPU
    python benchmarks/pretrained.py --name dit-small-fmnist-64 --image-size 64 --init dit-small-fmnist --minutes 3
                                                         # fine-tuned at 64 x 64 (32 x 32 tokens): local attention
    python benchmarks/pretrained.py --diffusers          # dit-diffusers-fmnist: diffusers' DiTTransformer2DModel,
                                                         # trained by examples/diffusers_dit.py (needs diffusers)

In code (benchmarks folder on ``sys.path``)::

    import pretrained
    model, facts = pretrained.load("dit-small-fmnist", device="cuda")   # refuses, with the command, if missing

``dit-diffusers-fmnist`` is diffusers' ``DiTTransformer2DModel`` of the same size, trained the way
``examples/diffusers_dit.py`` trains it (epsilon prediction, DDPM noise schedule), so that diffusers' own caches run
beside the project's on the same weights: ``load_diffusers()`` and ``ddim_sampler(steps)``.

The project's model predicts the flow velocity ``noise - x0`` from ``(x, t * 1000, y)`` (label 10 is the null label for
classifier-free guidance); ``sampler(steps)`` gives the matching ``tokenroute.methods.caching.Sampler``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from tokenroute.training import (EMA, build_model, drop_labels, load_fashion_mnist, make_task, model_config,
                                 pad_images, resize_images, to_model_range)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_device, environment  # noqa: E402

NAME = "dit-small-fmnist"
TIME_SCALE = 1000.0  # the backbone sees t * 1000, as the flow task of the examples does
# The small preset's patch size (256 tokens) at a width and depth whose bf16 weights (about 14 MB) travel as one file
SIZE = dict(hidden_size=224, depth=8, num_heads=4)
DIFFUSERS_NAME = "dit-diffusers-fmnist"
DIFFUSERS_SIZE = dict(num_layers=SIZE["depth"], num_attention_heads=SIZE["num_heads"],
                      attention_head_dim=SIZE["hidden_size"] // SIZE["num_heads"], patch_size=2)


def cache_dir() -> Path:
    return Path(os.environ.get("TOKENROUTE_CACHE", Path.home() / ".cache" / "tokenroute"))


def paths(name: str = NAME) -> tuple[Path, Path]:
    """The weights (safetensors) and the facts of the run that made them (JSON)."""
    folder = cache_dir() / "pretrained"
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def train(name: str = NAME, *, backbone: str = "dit", preset: str = "small", size: dict[str, int] | None = None,
          minutes: float = 4.0,
          batch_size: int = 256, lr: float = 3e-4, label_dropout: float = 0.1, seed: int = 0,
          device: torch.device | None = None, data_dir: str | None = None, out: Path | None = None,
          image_size: int | None = None, init: str | None = None) -> dict[str, Any]:
    """Train for ``minutes`` of wall time (bf16 autocast on CUDA, fused AdamW, EMA 0.999) and write the EMA
    weights and the run's facts (``out``: a folder to write them to instead of the cache). ``image_size``: the
    images (28 x 28 padded to 32) resized bilinearly, and the model's input size (64: a larger token grid); ``init``: the name of a cached
    model of the same size to fine-tune (its positional embedding is fixed sin-cos, made for any grid)."""
    device = device or bench_device()
    torch.manual_seed(seed)
    images, labels = load_fashion_mnist(data_dir, splits=("train",), download=False)
    data = to_model_range(pad_images(images))
    data = (data if image_size is None else resize_images(data, image_size)).to(device)
    labels = labels.to(device)
    size = dict(SIZE if size is None else size) | ({} if image_size is None else {"input_size": image_size})
    model = build_model(backbone, preset, **size).to(device)
    if init is not None:
        model.load_state_dict(read(init, "python benchmarks/pretrained.py")[0])
    ema = EMA(model, decay=0.999)
    task = make_task("flow")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(seed)
    null = model.num_classes
    start, step, losses = time.perf_counter(), 0, []
    model.train()
    while time.perf_counter() - start < minutes * 60:
        index = torch.randint(0, data.shape[0], (batch_size,), device=device, generator=generator)
        x0, y = data[index], drop_labels(labels[index], label_dropout, null, generator)
        batch = task.objective.prepare(x0, generator=generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            prediction = model(batch.model_input, batch.timestep * TIME_SCALE, y)
        loss = (prediction.float() - batch.target).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema.update(model, step)
        step += 1
        if step % 100 == 0:
            losses.append((step, float(loss.detach())))
    facts = {"name": name, "backbone": backbone, "preset": preset, "size": size,
             "config": model_config(backbone, preset) | size, "init": init,
             "objective": "flow (rectified flow, velocity noise - x0), backbone time t * 1000, null label "
                          f"{null}", "steps": step, "minutes": minutes, "batch_size": batch_size, "lr": lr,
             "label_dropout": label_dropout, "seed": seed, "losses": losses, "environment": environment(),
             "command": "python " + " ".join(sys.argv)}
    return store(name, ema.state_dict(), facts, out)


def downsample(images: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Samples (N, 1, s, s) back to the classifier's ``size`` x ``size`` frame (area average)."""
    if images.shape[-1] == size:
        return images
    return torch.nn.functional.adaptive_avg_pool2d(images.float(), size)


def store(name: str, state_dict: dict[str, torch.Tensor], facts: dict[str, Any],
           out: Path | None = None) -> dict[str, Any]:
    """Cache a model's weights (bf16: they travel as one file of a few MB) and the facts of the run beside them
    (``out``: a folder to write them to instead of the cache)."""
    from safetensors.torch import save_file

    weights_path, facts_path = paths(name) if out is None else (out / f"{name}.safetensors", out / f"{name}.json")
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in state_dict.items()}, str(weights_path))
    facts_path.write_text(json.dumps(facts, indent=1, default=str) + "\n")
    return facts


def read(name: str, command: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A cached model's weights (float32) and facts; refuses with the ``command`` that builds them."""
    weights_path, facts_path = paths(name)
    if not weights_path.exists() or not facts_path.exists():
        raise SystemExit(f"no pretrained {name} in {weights_path.parent}; build it on a GPU with `{command}` (a few "
                         "minutes), or set TOKENROUTE_CACHE")
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(weights_path)).items()}, json.loads(facts_path.read_text())


def ensure(name: str = NAME, *, device: torch.device | str = "cpu", **train_args: Any
           ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The cached model ``name``, trained first (``train(name, **train_args)``) where it is missing."""
    if not paths(name)[0].exists():
        train(name, device=torch.device(device), **train_args)
    return load(name, device=device)


def load(name: str = NAME, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The cached pretrained model (eval mode) and its facts; refuses with the command that builds it."""
    weights, facts = read(name, "python benchmarks/pretrained.py")
    model = build_model(facts["backbone"], facts["preset"], **facts.get("size", {}))
    model.load_state_dict(weights)
    return model.to(device).eval(), facts


def train_diffusers(name: str = DIFFUSERS_NAME, *, steps: int = 3000, batch_size: int = 256, lr: float = 3e-4,
                    data_dir: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Train diffusers' DiT with ``examples/diffusers_dit.py`` (its defaults: epsilon prediction, EMA, bf16 on
    CUDA) and cache its EMA weights (bf16) and config beside the project's model."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import diffusers_dit
    from diffusers import DiTTransformer2DModel

    size = [f"--{k.replace('_', '-')}={v}" for k, v in DIFFUSERS_SIZE.items()]
    with tempfile.TemporaryDirectory() as folder:
        argv = [f"--max-steps={steps}", f"--batch-size={batch_size}", f"--lr={lr}", f"--seed={seed}",
                f"--output={folder}", "--no-download", "--quiet", *size]
        summary = diffusers_dit.main(argv + ([f"--data-dir={data_dir}"] if data_dir else []))
        model = DiTTransformer2DModel.from_pretrained(Path(folder) / "transformer")
    facts = {"name": name, "class": "DiTTransformer2DModel", "config": dict(model.config),
             "objective": "epsilon prediction, DDPM noise schedule (1000 steps), null label 10",
             "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
             "train_time_s": summary.get("train_time_s"), "final_loss": summary.get("final_loss"),
             "environment": environment(), "command": "python benchmarks/pretrained.py --diffusers"}
    return store(name, model.state_dict(), facts)


def load_diffusers(name: str = DIFFUSERS_NAME, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The cached diffusers DiT (eval mode) and its facts; refuses with the command that builds it."""
    from diffusers import DiTTransformer2DModel

    weights, facts = read(name, "python benchmarks/pretrained.py --diffusers")
    model = DiTTransformer2DModel.from_config(facts["config"])
    model.load_state_dict(weights)
    return model.to(device).eval(), facts


def ddim_sampler(steps: int, cfg_scale: float = 1.0, null_label: int = 10):
    """DDIM (diffusers' scheduler) over the diffusers DiT's epsilon prediction, as a
    ``tokenroute.methods.caching.Sampler``; classifier-free guidance batched as in ``sampler``."""
    from diffusers import DDIMScheduler

    from tokenroute.methods.caching import Sampler

    def call(model: torch.nn.Module, x: torch.Tensor, timestep: Any, y: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if cfg_scale != 1.0:
            x, y = torch.cat([x, x]), torch.cat([y, torch.full_like(y, null_label)])
        t = torch.as_tensor(timestep, device=x.device).expand(x.shape[0])
        eps = model(x, timestep=t, class_labels=y).sample.float()
        if cfg_scale == 1.0:
            return eps
        cond, uncond = eps[:rows], eps[rows:]
        return uncond + cfg_scale * (cond - uncond)

    return Sampler.from_scheduler(DDIMScheduler(num_train_timesteps=1000), steps, call)


def velocity(model: torch.nn.Module, x: torch.Tensor, t: float | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The model's flow velocity at time t (1 = noise, 0 = data)."""
    t = torch.as_tensor(t, device=x.device, dtype=torch.float32).expand(x.shape[0])
    return model(x, t * TIME_SCALE, y)


def sampler(steps: int, cfg_scale: float = 1.0, null_label: int = 10):
    """The Euler sampler of the flow ODE as a ``tokenroute.methods.caching.Sampler``; with ``cfg_scale`` > 1
    classifier-free guidance runs batched (conditional and null labels in one call)."""
    from tokenroute.methods.caching import Sampler

    def call(model: torch.nn.Module, x: torch.Tensor, t: float, y: torch.Tensor) -> torch.Tensor:
        if cfg_scale == 1.0:
            return velocity(model, x, t, y)
        both = velocity(model, torch.cat([x, x]), t, torch.cat([y, torch.full_like(y, null_label)]))
        cond, uncond = both.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    return Sampler.flow_euler(steps, call)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default=NAME)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--width", type=int, default=SIZE["hidden_size"])
    parser.add_argument("--depth", type=int, default=SIZE["depth"])
    parser.add_argument("--heads", type=int, default=SIZE["num_heads"])
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=None, help="write here instead of the cache folder")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--image-size", type=int, default=None, help="64: upsampled images, a larger token grid")
    parser.add_argument("--init", default=None, help="fine-tune this cached model instead of starting afresh")
    parser.add_argument("--diffusers", action="store_true", help=f"build {DIFFUSERS_NAME} instead")
    parser.add_argument("--diffusers-steps", type=int, default=3000)
    args = parser.parse_args(argv)
    if args.diffusers:
        facts = train_diffusers(steps=args.diffusers_steps, batch_size=args.batch_size, lr=args.lr,
                                data_dir=args.data_dir)
        print(json.dumps({k: facts[k] for k in ("name", "steps", "train_time_s", "final_loss")}))
        return facts
    facts = train(args.name, preset=args.preset, size=dict(hidden_size=args.width, depth=args.depth,
                                                              num_heads=args.heads), minutes=args.minutes, batch_size=args.batch_size, lr=args.lr,
                  device=bench_device(cpu=args.cpu), data_dir=args.data_dir, out=args.out,
                  image_size=args.image_size, init=args.init)
    print(json.dumps({k: facts[k] for k in ("name", "preset", "steps", "minutes")}))
    return facts


if __name__ == "__main__":
    main()
