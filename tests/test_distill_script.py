"""examples/distill_local_attention.py: it trains only the attention projections and pooling weights, and a run
stopped at a checkpoint and resumed ends with the weights of a run straight through."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import distill_local_attention as script  # noqa: E402

from tokenroute.training import load_weights  # noqa: E402

TINY = ["--preset", "tiny", "--radius", "1.5", "--pooled", "2", "--samples", "8", "--sample-steps", "2",
        "--batch-size", "4", "--lr", "1e-3", "--cpu"]


def test_a_resumed_run_ends_where_a_straight_run_ends(tmp_path):
    straight = script.main(TINY + ["--steps", "4", "--checkpoint-every", "2", "--output", str(tmp_path / "a")])
    script.main(TINY + ["--steps", "2", "--checkpoint-every", "2", "--output", str(tmp_path / "b")])
    resumed = script.main(TINY + ["--steps", "4", "--checkpoint-every", "2", "--output", str(tmp_path / "b"),
                                  "--resume"])
    assert straight["steps"] == resumed["steps"] == 4 and straight["last"] == resumed["last"]
    a = load_weights(tmp_path / "a" / "checkpoints" / "step_0000004" / "weights.safetensors")
    b = load_weights(tmp_path / "b" / "checkpoints" / "step_0000004" / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = load_weights(tmp_path / "a" / "checkpoints" / "step_0000002" / "weights.safetensors")
    moved = {k for k in a if not torch.equal(a[k], first[k])}
    assert moved and all(".attn." in k or "local_attention_pool" in k for k in moved)  # only what distils


def test_an_output_in_use_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("")
    with pytest.raises(SystemExit):
        script.parse_args(["--output", str(tmp_path / "run")])
