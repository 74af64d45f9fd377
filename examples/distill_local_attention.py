"""Distil a flow-matching backbone into local attention (CLEAR): only the attention projections and the pooling
weights train, on images the model generates itself; the teacher is the same model with local attention off and
the trained projections' starting values.

    python examples/distill_local_attention.py --weights model.safetensors --preset small --radius 8 --pooled 2
    python examples/distill_local_attention.py ... --resume       # continue from --output's latest checkpoint

The teacher's samples are generated once (Euler steps of the flow ODE, classes in turn) and kept in --output, so a
resumed run trains on the same ones. Each step: fresh times and noise on a batch of them; loss = flow matching +
0.5 x prediction distillation + 0.5 x attention-output distillation. Checkpoints hold the weights (safetensors),
the optimizer and the random state; a resumed run continues exactly. Writes --output/summary.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from tokenroute.methods.local_attention import (DistillationConfig, LocalAttentionConfig, apply_local_attention,
                                                distillation_loss, distillation_parameters, teacher_mode)
from tokenroute.training import (NUM_CLASSES, Progress, build_model, flow_euler_sampler, latest_checkpoint,
                                 load_weights, write_checkpoint, write_json)

TIME_SCALE = 1000.0  # the backbones see t * 1000, as the project's flow models are trained


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="distill_local_attention.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", default=None, help="the pretrained model's state dict (safetensors); none: random "
                                                   "weights, for a smoke run only")
    p.add_argument("--backbone", default="dit")
    p.add_argument("--preset", default="small")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--radius", type=float, default=8.0)
    p.add_argument("--pooled", type=int, default=None, help="d: add the keys and values pooled d x d")
    p.add_argument("--samples", type=int, default=1024, help="images the teacher generates to train on")
    p.add_argument("--sample-steps", type=int, default=16)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--output", default="outputs/local-attention")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args(argv)
    for name in ("samples", "sample_steps", "steps", "batch_size", "checkpoint_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not (args.resume or args.overwrite):
        p.error(f"--output {output} is not empty: pass --resume to continue its run or --overwrite to start over")
    return args


@torch.no_grad()
def teacher_samples(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor,
                                                                                                      torch.Tensor]:
    """Images the teacher generates (its own distribution), classes in turn."""
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = [], []
    with teacher_mode(model):
        for start in range(0, args.samples, args.batch_size):
            n = min(args.batch_size, args.samples - start)
            y = (torch.arange(start, start + n) % NUM_CLASSES).to(device)
            noise = torch.randn(n, 1, args.image_size, args.image_size, generator=generator).to(device)
            x = flow_euler_sampler(lambda x, t, y: model(x, torch.full((len(x),), t * TIME_SCALE, device=device), y),
                                   noise, y, steps=args.sample_steps)
            images.append(x.clamp(-1, 1).cpu())
            labels.append(y.cpu())
    return torch.cat(images), torch.cat(labels)


def _mean(rows: list[dict[str, float]]) -> dict[str, float] | None:
    """Each loss part averaged over ``rows`` (one step's loss depends on its random times: compare means)."""
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "step"} if rows else None


def main(argv: Sequence[str] | None = None, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Run the distillation; ``model``: distil this pretrained model in place (from code) instead of building
    one from --backbone, --preset, --image-size and --weights."""
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    torch.manual_seed(args.seed)
    if model is None:
        model = build_model(args.backbone, args.preset, input_size=args.image_size)
        if args.weights:
            model.load_state_dict(load_weights(args.weights))
    model.to(device).eval()
    apply_local_attention(model, LocalAttentionConfig(radius=args.radius, pooled=args.pooled))
    trained = distillation_parameters(model)
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in trained))
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.0)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    data_path = output / "teacher_samples.pt"
    step, history, generator = 0, [], torch.Generator().manual_seed(args.seed + 1)
    checkpoint = latest_checkpoint(output) if args.resume else None
    if checkpoint is not None:
        model.load_state_dict(load_weights(checkpoint / "weights.safetensors"))
        state = torch.load(checkpoint / "training_state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        generator.set_state(state["generator"])
    if data_path.exists() and checkpoint is not None:
        images, labels = torch.load(data_path)
    else:
        images, labels = teacher_samples(model, args, device)
        torch.save((images, labels), data_path)
    progress = Progress(args.steps, step, desc="distil")
    began = time.perf_counter()
    model.train()
    while step < args.steps:
        index = torch.randint(0, len(images), (args.batch_size,), generator=generator)
        x0, y = images[index].to(device), labels[index].to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.rand(len(x0), generator=generator).to(device)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, parts = distillation_loss(model, lambda m: m(xt, t * TIME_SCALE, y),
                                            lambda v: (v.float() - (noise - x0)).square().mean(), DistillationConfig())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        history.append({"step": step, "loss": float(loss.detach()), **parts})
        progress.set(loss=float(loss.detach()), **{k: float(v) for k, v in parts.items()})
        progress.update()
        if step % args.checkpoint_every == 0 or step == args.steps:
            write_checkpoint(output, step, {"weights": model.state_dict()},
                             {"optimizer": optimizer.state_dict(), "step": step, "history": history,
                              "generator": generator.get_state()}, args.keep_checkpoints)
    progress.close()
    summary = {"steps": step, "train_time_s": time.perf_counter() - began, "radius": args.radius,
               "pooled": args.pooled, "trained_parameters": sum(p.numel() for p in trained),
               "first": history[0] if history else None, "last": history[-1] if history else None,
               "first_mean": _mean(history[:100]), "last_mean": _mean(history[-100:]),
               "weights": args.weights, "device": str(device)}
    write_json(summary, output / "summary.json")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
