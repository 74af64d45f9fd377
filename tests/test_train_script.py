"""examples/train.py on the newcomer's path: a run directory is never reused silently, --unmask-steps is exact and
checked, resuming inside MaskDiT's unmasking phase continues exactly, negative route indices parse, and a route
that overlaps the masked encoder is explained in the user's terms."""

from __future__ import annotations

import shutil

import pytest

from tokenroute import training

from test_examples import data_dir, run_train, train  # noqa: F401  (module fixtures, reused)

MASKED = ["--backbone", "dit", "--mask", "0.5", "--loss-mode", "visible", "--sample-every", "0"]


def test_an_existing_run_is_refused_unless_resumed_or_overwritten(train, data_dir, tmp_path):  # noqa: F811
    args = ["--backbone", "dit", "--sample-every", "0", "--ckpt-every", "2"]
    run_train(train, data_dir, tmp_path / "run", *args, "--max-steps", "4")
    with pytest.raises(SystemExit, match=r"holds a run already .* --resume, .* --overwrite"):
        run_train(train, data_dir, tmp_path / "run", *args, "--max-steps", "2")
    with pytest.raises(SystemExit, match="contradict"):
        run_train(train, data_dir, tmp_path / "run", *args, "--max-steps", "2", "--resume", "--overwrite")
    fresh = run_train(train, data_dir, tmp_path / "run", *args, "--max-steps", "2", "--overwrite")
    assert fresh["start_step"] == 0 and fresh["steps"] == 2
    rows = training.read_loss_csv(tmp_path / "run" / "loss.csv")
    assert [r["step"] for r in rows] == ["1", "2"]  # nothing of the old run left
    assert [p.name for p in sorted((tmp_path / "run" / "checkpoints").iterdir())] == ["step_0000002"]


@pytest.mark.parametrize("extra, message", [(["--unmask-steps", "2"], "needs --mask"),
                                            (["--mask", "0.5", "--unmask-steps", "9"], "more than --max-steps")])
def test_bad_unmask_steps_are_refused_before_any_work(train, data_dir, tmp_path, extra, message):  # noqa: F811
    with pytest.raises(SystemExit):
        run_train(train, data_dir, tmp_path / "run", "--backbone", "dit", "--max-steps", "4", *extra)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("resume_at", [2, 4])  # inside the masked phase, inside the unmasking phase
def test_unmasking_lasts_exactly_n_steps_and_resume_is_exact_in_each_phase(train, data_dir, tmp_path,  # noqa: F811
                                                                            resume_at):
    """The last N steps draw no mask (checksum 0); a run stopped inside either phase and resumed continues it:
    the same losses, masks and final weights as the uninterrupted run."""
    from tokenroute.training import load_weights

    args = [*MASKED, "--unmask-steps", "3", "--max-steps", "6", "--ckpt-every", "2", "--keep-checkpoints", "0"]
    run_train(train, data_dir, tmp_path / "straight", *args)
    straight = training.read_loss_csv(tmp_path / "straight" / "loss.csv")
    assert [r["mask_checksum"] != "0" for r in straight] == [True, True, True, False, False, False]
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    for later in range(resume_at + 2, 7, 2):
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / f"step_{later:07d}")
    resumed = run_train(train, data_dir, tmp_path / "resumed", *args, "--resume")
    assert resumed["start_step"] == resume_at
    rows = training.read_loss_csv(tmp_path / "resumed" / "loss.csv")
    assert [(r["loss"], r["mask_checksum"]) for r in rows] == [(r["loss"], r["mask_checksum"]) for r in straight]
    final = "checkpoints/step_0000006/model.safetensors"
    a, b = load_weights(tmp_path / "straight" / final), load_weights(tmp_path / "resumed" / final)
    assert all(bool((a[k] == b[k]).all()) for k in a)


def test_negative_route_indices_parse_and_an_encoder_overlap_is_explained(train, data_dir, tmp_path):  # noqa: F811
    summary = run_train(train, data_dir, tmp_path / "neg", "--backbone", "dit", "--routes", "-4:-2:0.5",
                        "--max-steps", "1", "--sample-every", "0")
    assert summary["steps"] == 1
    with pytest.raises(SystemExit, match=r"with --mask: the encoder blocks 0\.\.3 .* decoder blocks, 4\.\.5"):
        run_train(train, data_dir, tmp_path / "overlap", *MASKED, "--routes", "1:4:0.5", "--max-steps", "1")


def test_init_from_starts_a_fresh_run_from_given_weights(train, data_dir, tmp_path):  # noqa: F811
    from tokenroute.training import load_weights

    args = ["--backbone", "dit", "--sample-every", "0", "--ckpt-every", "2"]
    run_train(train, data_dir, tmp_path / "first", *args, "--max-steps", "2")
    source = tmp_path / "first" / "checkpoints" / "step_0000002"
    run_train(train, data_dir, tmp_path / "second", *args, "--max-steps", "0", "--init-from", str(source))
    final = tmp_path / "second" / "checkpoints" / "step_0000000" / "model.safetensors"
    saved = load_weights(final)  # after no step: the weights it started from
    for key, value in load_weights(source / "model.safetensors").items():
        assert (saved[key] == value).all()
    with pytest.raises(SystemExit):
        run_train(train, data_dir, tmp_path / "third", *args, "--max-steps", "2", "--init-from", str(source), "--resume")
    with pytest.raises(SystemExit, match="--init-from .* must be a tiny uvit's model.safetensors"):
        run_train(train, data_dir, tmp_path / "fourth", "--backbone", "uvit", "--max-steps", "1", "--init-from",
                  str(source))


def test_report_to_tensorboard_logs_the_losses(train, data_dir, tmp_path):  # noqa: F811
    """Through Accelerate's tracker: event files under the run directory with the loss of every logged step."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_train(train, data_dir, tmp_path / "run", "--backbone", "dit", "--routes", "1:4:0.5", "--max-steps", "4",
              "--log-every", "2", "--sample-every", "0", "--report-to", "tensorboard")
    events = [p for p in (tmp_path / "run").rglob("events.out.tfevents*")]
    assert events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("loss")] == [1, 2, 3, 4]


def test_report_to_a_missing_tracker_is_refused(train, data_dir, tmp_path, monkeypatch):  # noqa: F811
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(SystemExit):
        run_train(train, data_dir, tmp_path / "run", "--backbone", "dit", "--max-steps", "1", "--report-to", "wandb")
    assert not (tmp_path / "run").exists()
