"""examples/finetune_token_density.py: the converted model fine-tunes (merge and refine layers included), and a run
stopped at a checkpoint and resumed ends with the weights of a run straight through."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import finetune_token_density as script  # noqa: E402

from tokenroute.training import load_weights, write_synthetic_fashion_mnist  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    data = write_synthetic_fashion_mnist(tmp_path_factory.mktemp("fashion"), num_train=32, num_test=8)
    return ["--preset", "tiny", "--image-size", "16", "--routes", "1-2", "--schedule", "700:4,300:2,0:1",
            "--batch-size", "4", "--lr", "1e-3", "--data-dir", str(data), "--cpu"]


def test_a_resumed_run_ends_where_a_straight_run_ends(tiny, tmp_path):
    straight = script.main(tiny + ["--steps", "4", "--checkpoint-every", "2", "--output", str(tmp_path / "a")])
    script.main(tiny + ["--steps", "2", "--checkpoint-every", "2", "--output", str(tmp_path / "b")])
    resumed = script.main(tiny + ["--steps", "4", "--checkpoint-every", "2", "--output", str(tmp_path / "b"),
                                  "--resume"])
    assert straight["steps"] == resumed["steps"] == 4 and straight["last_losses"] == resumed["last_losses"]
    for name in ("weights", "ema"):
        a = load_weights(tmp_path / "a" / "checkpoints" / "step_0000004" / f"{name}.safetensors")
        b = load_weights(tmp_path / "b" / "checkpoints" / "step_0000004" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = load_weights(tmp_path / "a" / "checkpoints" / "step_0000002" / "weights.safetensors")
    moved = {k for k in a if not torch.equal(a[k], first[k])}
    assert any(k.startswith("token_density.0.merge.out") for k in moved) and \
        any(k.startswith("token_density.0.refine.out") for k in moved) and any(k.startswith("blocks.") for k in moved)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        script.parse_args(["--schedule", "700-4"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("")
    with pytest.raises(SystemExit):
        script.parse_args(["--output", str(tmp_path / "run")])


def test_grouped_times_run_each_factor_in_its_own_forward(tiny, tmp_path):
    """With --times grouped a step draws a time per sample and runs one forward per factor: block 1 (inside the
    route) sees several grids within one step, each sample once."""
    from tokenroute.core.splice.tracer import tracing
    from tokenroute.training import build_model

    model = build_model("dit", "tiny", input_size=16)
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda m, a: None if tracing() else seen.append(tuple(a[0].shape[:2])))
    args = [a if a != "4" else "8" for a in tiny]  # batch 8
    script.main(args + ["--times", "grouped", "--steps", "1", "--output", str(tmp_path / "g")], model=model)
    assert len({tokens for _, tokens in seen}) >= 2 and sum(batch for batch, _ in seen) == 8
