"""Load a train.py checkpoint into the plain (unwrapped) backbone and sample a grid from its EMA weights.

    python examples/load_and_sample.py RUN_DIR [--output samples_from_checkpoint.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tokenroute.training import build_model, latest_checkpoint, load_weights, make_task, sample_images, save_grid


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a train.py --output folder")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    checkpoint = latest_checkpoint(args.run)
    if checkpoint is None:
        raise SystemExit(f"load_and_sample.py: error: no checkpoint under {args.run}/checkpoints")
    config = json.loads((checkpoint / "config.json").read_text())
    model = build_model(config["backbone"], config["preset"])  # plain backbone, never wrapped
    model.load_state_dict(load_weights(checkpoint / "ema.safetensors"), strict=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    images = sample_images(model.to(device), make_task(config["objective"]), samples_per_class=8, device=device)
    out = save_grid(images, args.output or args.run / "samples_from_checkpoint.png", nrow=8)
    print(f"loaded {checkpoint} into a plain {type(model).__name__}; wrote {out}")
    return out


if __name__ == "__main__":
    main()
