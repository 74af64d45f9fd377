"""Fine-tune a pretrained flow-matching backbone into token density (FlexDiT): spans of blocks run on the pooled
grid, at a factor that follows the timestep; the converted model starts as the plain pooled route and learns
its merge and refine layers with the rest of the model.

    python examples/finetune_token_density.py --weights model.safetensors --routes 1-6 --schedule 700:4,300:2,0:1
    python examples/finetune_token_density.py ... --resume        # continue from --output's latest checkpoint

Each step draws a batch of Fashion-MNIST images (28 x 28 padded to 32, in [-1, 1]), fresh noise and, with a
schedule, one time for the whole batch (so that the batch runs at that time's grid; per-sample times in one forward
would all run at the densest factor any of them asks for), or, with ``--times grouped``, a time per sample and one
forward per factor, the losses weighed by the groups' sizes; loss: flow matching (velocity noise - x0), the backbone sees
t x 1000. The EMA of the weights is what the checkpoints and the final weights hold for sampling; checkpoints
hold the model, the EMA, the optimizer and the random state, and a resumed run continues exactly. Writes
--output/summary.json and --output/weights.safetensors (the EMA, loadable into the converted model).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from tokenroute.methods.token_density import Schedule, TokenDensityConfig, apply_token_density
from tokenroute.training import (EMA, Progress, build_model, latest_checkpoint, load_fashion_mnist, load_weights,
                                 pad_images, resize_images, save_weights, to_model_range,
                                 write_checkpoint, write_json)

TIME_SCALE = 1000.0  # the backbones see t * 1000, as the project's flow models are trained


def parse_schedule(text: str) -> int | list[tuple[float, int]]:
    """"2" -> 2; "700:4,300:2,0:1" -> [(700.0, 4), (300.0, 2), (0.0, 1)] (timestep: factor from there up)."""
    if ":" not in text:
        return int(text)
    return [(float(t), int(f)) for t, f in (part.split(":") for part in text.split(","))]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="finetune_token_density.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", default=None, help="the pretrained model's state dict (safetensors); none: random "
                                                   "weights, for a smoke run only")
    p.add_argument("--backbone", default="dit")
    p.add_argument("--preset", default="small")
    for name in ("width", "depth", "heads"):
        p.add_argument(f"--{name}", type=int, default=None, help=f"the model's {name} where not the preset's")
    p.add_argument("--image-size", type=int, default=32, help="the model's input (the images resized to it)")
    p.add_argument("--routes", default="1-6", help="spans of blocks run pooled, 'start-end' (inclusive), comma-separated")
    p.add_argument("--schedule", default="700:4,300:2,0:1", help="a factor, or 'timestep:factor,...' (from each "
                                                                   "timestep up, timesteps of 0..1000)")
    p.add_argument("--pooling-attention", default="", help="'block:d,...': blocks whose attention sees keys and "
                                                            "values pooled d x d")
    p.add_argument("--init", default="identity", choices=("identity", "flexdit"))
    p.add_argument("--times", default="shared", choices=("shared", "grouped"),
                   help="with a schedule: one time per batch, or a time per sample with one forward per factor")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--output", default="outputs/token-density")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "checkpoint_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    try:
        args.routes = [tuple(int(n) for n in span.split("-")) for span in args.routes.split(",")]
        args.schedule = parse_schedule(args.schedule)
        args.pooling_attention = {int(b): int(d) for b, d in (part.split(":") for part in args.pooling_attention.split(",")
                                                              if part)}
    except ValueError as err:
        p.error(f"--routes, --schedule or --pooling-attention could not be read ({err}); see --help for the forms")
    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not (args.resume or args.overwrite):
        p.error(f"--output {output} is not empty: pass --resume to continue its run or --overwrite to start over")
    return args


def groups(t: torch.Tensor, rule: Schedule | None) -> list[torch.Tensor]:
    """The batch's rows by the factor the schedule gives their time (one group: all rows, where the factor is
    fixed or the batch shares its time)."""
    rows = torch.arange(len(t), device=t.device)
    if rule is None or bool((t == t[0]).all()):
        return [rows]
    factors = torch.tensor([rule(float(v) * TIME_SCALE) for v in t.tolist()], device=t.device)
    return [rows[factors == f] for f in factors.unique()]


def convert(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """The model with token density as the arguments say (in place)."""
    return apply_token_density(model, TokenDensityConfig(routes=args.routes, factor=args.schedule, init=args.init,
                                                         pooling_attention=args.pooling_attention or None))


def main(argv: Sequence[str] | None = None, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Run the fine-tune; ``model``: convert and fine-tune this pretrained model in place (from code) instead of
    building one from --backbone, --preset and --weights."""
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    torch.manual_seed(args.seed)
    if model is None:
        sizes = {"hidden_size": args.width, "depth": args.depth, "num_heads": args.heads}
        model = build_model(args.backbone, args.preset, input_size=args.image_size,
                            **{k: v for k, v in sizes.items() if v is not None})
        if args.weights:
            model.load_state_dict(load_weights(args.weights))
    model = convert(model.to(device), args)
    ema = EMA(model, decay=args.ema)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    images, labels = load_fashion_mnist(args.data_dir, splits=("train",), download=False)
    data, labels = to_model_range(pad_images(images)).to(device), labels.to(device)
    data = resize_images(data, args.image_size)  # Fashion-MNIST at the model's input size
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    step, history = 0, []
    generator = torch.Generator(device=device).manual_seed(args.seed + 1)
    checkpoint = latest_checkpoint(output) if args.resume else None
    if checkpoint is not None:
        model.load_state_dict(load_weights(checkpoint / "weights.safetensors"))
        ema.load_state_dict(load_weights(checkpoint / "ema.safetensors"))
        state = torch.load(checkpoint / "training_state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        generator.set_state(state["generator"])
    scheduled = not isinstance(args.schedule, int)
    shared_time = scheduled and args.times == "shared"
    rule = Schedule(args.schedule, (0.0, TIME_SCALE), "--schedule") if scheduled else None
    null = getattr(model, "num_classes", 10)
    progress = Progress(args.steps, step, desc="token density")
    began = time.perf_counter()
    model.train()
    while step < args.steps:
        index = torch.randint(0, len(data), (args.batch_size,), device=device, generator=generator)
        x0, y = data[index], labels[index]
        y = torch.where(torch.rand(len(y), device=device, generator=generator) < args.label_dropout,
                        torch.full_like(y, null), y)
        noise = torch.randn(x0.shape, device=device, generator=generator)
        t = torch.rand(1 if shared_time else len(x0), device=device, generator=generator).expand(len(x0))
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=device)
        for rows in groups(t, rule):  # one forward per factor: each sample at its own time's grid
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                prediction = model(xt[rows], t[rows] * TIME_SCALE, y[rows])
            part = (prediction.float() - (noise[rows] - x0[rows])).square().mean() * (len(rows) / len(x0))
            part.backward()
            loss = loss + part.detach()
        optimizer.step()
        ema.update(model, step)
        step += 1
        history.append({"step": step, "loss": float(loss.detach()), "t": float(t[0]) if shared_time else None})
        progress.set(loss=float(loss.detach()))
        progress.update()
        if step % args.checkpoint_every == 0 or step == args.steps:
            write_checkpoint(output, step, {"weights": model.state_dict(), "ema": ema.state_dict()},
                             {"optimizer": optimizer.state_dict(), "step": step, "history": history,
                              "generator": generator.get_state()}, args.keep_checkpoints)
    progress.close()
    save_weights(ema.state_dict(), output / "weights.safetensors")
    model.load_state_dict(ema.state_dict())  # the model given in code leaves with the averaged weights
    summary = {"steps": step, "train_time_s": time.perf_counter() - began, "routes": args.routes,
               "schedule": args.schedule, "pooling_attention": args.pooling_attention, "init": args.init,
               "batch_size": args.batch_size, "lr": args.lr, "times": args.times if scheduled else "per sample",
               "first_loss": history[0]["loss"] if history else None,
               "last_losses": [h["loss"] for h in history[-20:]], "weights": args.weights, "device": str(device)}
    write_json(summary, output / "summary.json")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
