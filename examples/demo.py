"""tokenroute demo: train a tiny DiT on Fashion-MNIST with and without TREAD routing on the CPU, and compare.

The routed run differs from the baseline in one line, ``tokenroute.wrap(model, routes=...)``. Prints the
routing plan, the wall time and images/s of each run, the FLOPs a routed training step saves, and where the
two sample grids are.

    python examples/demo.py [--steps 600] [--output outputs/demo]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (examples/common.py)

import tokenroute  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps of each run (default: 600)")
    parser.add_argument("--routes", default="1:4:0.5", help="START:END:RATIO[,...] for the tiny DiT's 6 blocks")
    parser.add_argument("--output", default="outputs/demo")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST idx files (default: the Debian package's)")
    args = parser.parse_args(argv)
    routes = common.parse_routes(args.routes)

    model = tokenroute.wrap(common.build_model("dit", "tiny"), routes=routes, seed=0)  # the one line
    x = torch.zeros(2, 1, 32, 32)
    print(tokenroute.explain(model, x, torch.zeros(2), torch.zeros(2, dtype=torch.long)))
    print(f"\ntraining the tiny DiT for {args.steps} steps without routing, then with routes {args.routes} ...",
          flush=True)
    result = common.compare_routing("dit", "tiny", steps=args.steps, routes=routes, output=args.output,
                                    data_dir=args.data_dir, timing_rounds=8)
    base, routed, flops = result["baseline"], result["routed"], result["flops"]
    print(f"\ndata: {result['data']}")
    print(f"{'':>10} {'wall s':>8} {'images/s':>9} {'final loss':>11}")
    for name, run in (("baseline", base), ("routed", routed)):
        print(f"{name:>10} {run['wall_time_s']:8.1f} {run['images_per_s']:9.1f} {run['final_loss']:11.4f}")
    print(f"FLOPs of one training step: {flops['unrouted'] / 1e9:.3f} -> {flops['routed'] / 1e9:.3f} GFLOP "
          f"({100 * flops['saving']:.1f}% saved, FLOP-ideal speed-up {flops['unrouted'] / flops['routed']:.2f}x)")
    if result["interleaved_timing"]:
        print(f"step time measured interleaved: {result['interleaved_timing']['speedup']:.2f}x faster routed")
    print(f"sample grids: {result['samples']['baseline']} and {result['samples']['routed']}")
    print(f"everything else (loss curves, summaries, comparison.json): {result['output']}")
    return result


if __name__ == "__main__":
    main()
