"""tokenroute demo: wrap a DiT with one line, show the plan and the FLOPs a routed training step saves.

    python examples/demo.py [--preset DiT-S/2] [--routes 2:8:0.5]
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

import tokenroute
from tokenroute.models import DiT


def parse_routes(text: str) -> list[tuple[int, int, float]]:
    routes = []
    for part in text.split(","):
        start, end, ratio = part.split(":")
        routes.append((int(start), int(end), float(ratio)))
    return routes


def training_step_flops(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one forward + backward in training mode."""
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(x, t, y).square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="DiT-S/2", help="a DiT preset (tiny, DiT-S/2, DiT-B/2, DiT-XL/2)")
    parser.add_argument("--routes", default="2:8:0.5", help="START:END:RATIO[,START:END:RATIO...]")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = DiT.from_preset(args.preset)
    size = model.x_embedder.img_size
    x = torch.randn(args.batch, model.in_channels, *size)
    t = torch.rand(args.batch) * 1000
    y = torch.randint(0, model.num_classes, (args.batch,))

    unrouted = training_step_flops(model, x, t, y)
    model = tokenroute.wrap(model, routes=parse_routes(args.routes), seed=0)  # the one line
    training_step_flops(model, x, t, y)  # the first routed forward traces the graph; count the next
    routed = training_step_flops(model, x, t, y)

    print(tokenroute.explain(model))
    print()
    print(f"{args.preset}, {model.x_embedder.num_patches} tokens, batch {args.batch}, routes {args.routes}")
    print(f"  training step FLOPs, unrouted: {unrouted / 1e9:8.2f} GFLOP")
    print(f"  training step FLOPs, routed:   {routed / 1e9:8.2f} GFLOP")
    print(f"  saved: {100 * (1 - routed / unrouted):.1f}%  (FLOP-ideal speedup {unrouted / routed:.2f}x)")
    masks = tokenroute.routing_masks(model)
    print(f"  tokens that skipped each route in the last step: {[int(m[0].sum()) for m in masks]} per sample")


if __name__ == "__main__":
    main()
