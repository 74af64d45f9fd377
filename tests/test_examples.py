"""The examples (examples/train.py, examples/diffusers_dit.py, examples/demo.py) as smoke runs on the CPU.

Every run trains a tiny model for a few steps on a synthetic stand-in for Fashion-MNIST written in the same
idx gz format (so these tests run anywhere); one run reads the real files when they are installed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenroute import training

pytest.importorskip("accelerate")
pytest.importorskip("safetensors")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"  # on pytest's pythonpath (pyproject.toml): the scripts import as modules

REAL_DATA = Path(training.DEFAULT_DATA_DIR)
# Small and fast: a few steps of the tiny presets, tiny sampling.
FAST = ["--preset", "tiny", "--batch-size", "4", "--samples-per-class", "1", "--sample-steps", "2", "--quiet",
        "--no-download"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return training.write_synthetic_fashion_mnist(tmp_path_factory.mktemp("fashion"), num_train=48, num_test=16)


@pytest.fixture(scope="module")
def train():
    import train

    return train


def run_train(train, data_dir: Path, output: Path, *args: str) -> dict:
    return train.main([*FAST, "--data-dir", str(data_dir), "--output", str(output), *args])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def test_idx_files_round_trip(tmp_path):
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8).numpy()
    training.write_idx(tmp_path / "x-idx3-ubyte.gz", images)
    assert (training.read_idx(tmp_path / "x-idx3-ubyte.gz") == images).all()
    raw = (tmp_path / "x-idx3-ubyte.gz").read_bytes()
    (tmp_path / "bad.gz").write_bytes(raw[:-50])
    with pytest.raises(training.DataError, match="not an idx file|truncated"):
        training.read_idx(tmp_path / "bad.gz")


def test_synthetic_fixture_loads_like_fashion_mnist(data_dir):
    images, labels = training.load_fashion_mnist(data_dir, download=False)
    assert images.shape == (64, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    padded = training.pad_images(images)
    assert padded.shape == (64, 1, 32, 32) and torch.equal(padded[:, 0, 2:30, 2:30], images)
    x = training.to_model_range(padded)
    assert x.min() >= -1 and x.max() <= 1
    assert training.resize_images(x, 32) is x  # the same size: unchanged
    larger = training.resize_images(x, 64)  # a larger grid: the same picture (its mean), in range
    assert larger.shape == (64, 1, 64, 64) and larger.min() >= -1 and larger.max() <= 1
    torch.testing.assert_close(larger.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), rtol=0, atol=1e-4)


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"Fashion-MNIST is not installed in {REAL_DATA} "
                    "(Debian package dataset-fashion-mnist)")
def test_real_fashion_mnist_files():
    images, labels = training.load_fashion_mnist(REAL_DATA, download=False)
    assert images.shape == (70_000, 28, 28)
    assert torch.bincount(labels).tolist() == [7_000] * 10


def test_step_batches_are_a_function_of_the_step():
    a, b = training.StepBatches(100, 8, seed=3), training.StepBatches(100, 8, seed=3)
    assert a.steps_per_epoch == 12
    assert torch.equal(a.indices(30), b.indices(30)) and torch.equal(a.indices(5), b.indices(5))
    epoch = torch.cat([a.indices(s) for s in range(12)])
    assert len(set(epoch.tolist())) == 96  # no repeats within an epoch
    ranks = [training.StepBatches(100, 8, seed=3, rank=r, world_size=2).indices(0) for r in range(2)]
    assert not set(ranks[0].tolist()) & set(ranks[1].tolist())


def test_mask_checksum_tells_apart_masks_of_equal_size_and_position_sum():
    """The fingerprint that resume tests compare: masks that keep as many tokens at the same sum of positions
    (which linear weights could not tell apart) get different checksums."""
    a = torch.tensor([[True, False, False, True]])
    b = torch.tensor([[False, True, True, False]])
    assert int(training.mask_checksum([a])) != int(training.mask_checksum([b]))
    assert int(training.mask_checksum([a, b])) != int(training.mask_checksum([b, a]))  # the route's order counts
    assert int(training.mask_checksum([])) == 0


def test_parse_routes():
    assert training.parse_routes("2:8:0.5") == [(2, 8, 0.5)]
    assert training.parse_routes("1:2:0.5, -3:-2:0.25") == [(1, 2, 0.5), (-3, -2, 0.25)]
    assert training.parse_routes("none") is None and training.parse_routes("tread") == "tread"
    assert training.tread_routes(12) == [(2, 8, 0.5)] and training.tread_routes(6) == [(1, 4, 0.5)]
    for bad in ("2:8", "a:b:c", "1:2:1.0", "1:2:-0.1"):
        with pytest.raises(Exception, match="route"):
            training.parse_routes(bad)


# --------------------------------------------------------------------------------------------------
# train.py
# --------------------------------------------------------------------------------------------------


def check_run(output: Path, summary: dict, backbone: str, steps: int) -> None:
    for name in ("samples.png", "summary.json", "loss.csv", "loss.png"):
        assert (output / name).is_file() and (output / name).stat().st_size > 0, name
    on_disk = json.loads((output / "summary.json").read_text())
    assert on_disk["steps"] == summary["steps"] == steps
    assert on_disk["images_per_s"] > 0 and on_disk["wall_time_s"] > 0 and on_disk["train_time_s"] > 0
    assert math.isfinite(on_disk["final_loss"])
    assert on_disk["device"] == "cpu" and on_disk["torch_version"] == torch.__version__
    assert on_disk["config"]["backbone"] == backbone and on_disk["model"]["backbone"] == backbone
    assert len(training.read_loss_csv(output / "loss.csv")) == steps

    # The checkpoint loads into the plain (never wrapped) backbone: wrap leaves state_dict keys alone.
    ckpt = training.latest_checkpoint(output)
    assert ckpt is not None and ckpt.name == f"step_{steps:07d}"
    for name in ("model.safetensors", "ema.safetensors", "training_state.pt", "rank0.pt", "config.json"):
        assert (ckpt / name).is_file(), name
    plain = training.build_model(backbone, "tiny")
    plain.load_state_dict(training.load_weights(ckpt / "model.safetensors"), strict=True)
    plain.load_state_dict(training.load_weights(ckpt / "ema.safetensors"), strict=True)
    assert not hasattr(plain, "_tokenroute")


@pytest.mark.parametrize("backbone, extra", [
    ("dit", ["--routes", "1:4:0.5", "--guidance-routing", "--loss-mode", "routes"]),
    ("uvit", ["--routes", "tread", "--objective", "flow"]),
    ("mamba", ["--routes", "1:4:0.5", "--objective", "eps"]),
])
def test_train_smoke(train, data_dir, tmp_path, backbone, extra):
    if "eps" in extra:
        pytest.importorskip("diffusers")
    out = tmp_path / backbone
    summary = run_train(train, data_dir, out, "--backbone", backbone, "--max-steps", "3", "--sample-every", "2",
                        "--ckpt-every", "2", "--keep-checkpoints", "0", *extra)
    check_run(out, summary, backbone, 3)
    assert (out / "samples" / "step_0000002.png").is_file()  # periodic grid
    assert [p.name for p in training.checkpoint_dirs(out)] == ["step_0000002", "step_0000003"]
    assert summary["routes"] and summary["first_step_mask_checksums"][0] > 0
    rank_state = torch.load(training.latest_checkpoint(out) / "rank0.pt", weights_only=False)
    assert rank_state["routing"]  # the routing generator's state, for an exact resume


def test_baseline_has_no_routing(train, data_dir, tmp_path):
    summary = run_train(train, data_dir, tmp_path, "--backbone", "dit", "--max-steps", "2")
    check_run(tmp_path, summary, "dit", 2)
    assert summary["routes"] == [] and summary["first_step_mask_checksums"] == [0]
    assert {r["mask_checksum"] for r in training.read_loss_csv(tmp_path / "loss.csv")} == {"0"}


def test_resume_continues_exactly(train, data_dir, tmp_path):
    args = ["--backbone", "dit", "--routes", "1:4:0.5", "--ckpt-every", "3", "--sample-every", "0"]
    straight = run_train(train, data_dir, tmp_path / "straight", *args, "--max-steps", "6")
    first = run_train(train, data_dir, tmp_path / "resumed", *args, "--max-steps", "3")
    assert first["steps"] == 3
    resumed = run_train(train, data_dir, tmp_path / "resumed", *args, "--max-steps", "6", "--resume")
    assert resumed["start_step"] == 3 and resumed["steps"] == straight["steps"] == 6

    a = training.read_loss_csv(tmp_path / "straight" / "loss.csv")
    b = training.read_loss_csv(tmp_path / "resumed" / "loss.csv")
    assert [r["step"] for r in b] == [str(s) for s in range(1, 7)]
    assert [r["mask_checksum"] for r in a] == [r["mask_checksum"] for r in b]  # the same routing masks
    assert len({r["mask_checksum"] for r in a}) == 6  # which change every step
    for ra, rb in zip(a, b):  # the same loss curve (bitwise on one CPU; float noise allowed)
        assert math.isclose(float(ra["loss"]), float(rb["loss"]), rel_tol=1e-6, abs_tol=1e-7)
    for name in ("model.safetensors", "ema.safetensors"):
        wa = training.load_weights(tmp_path / "straight" / "checkpoints" / "step_0000006" / name)
        wb = training.load_weights(tmp_path / "resumed" / "checkpoints" / "step_0000006" / name)
        assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7) for k in wa), name


def test_compiled_training_routes_and_learns_as_eager_training(train, data_dir, tmp_path):
    """--compile: routing compiles into the model's graph and draws the eager run's masks; the losses follow."""
    args = ["--backbone", "dit", "--routes", "1:4:0.5", "--max-steps", "3", "--sample-every", "0"]
    from torch._dynamo.utils import counters

    run_train(train, data_dir, tmp_path / "eager", *args)
    torch._dynamo.reset()
    counters.clear()
    run_train(train, data_dir, tmp_path / "compiled", *args, "--compile", "aot_eager")
    assert counters["stats"]["unique_graphs"] >= 1  # compiled (tests/test_compile.py: in one piece after step 1)
    torch._dynamo.reset()
    a = training.read_loss_csv(tmp_path / "eager" / "loss.csv")
    b = training.read_loss_csv(tmp_path / "compiled" / "loss.csv")
    assert len(a) == len(b) == 3
    assert [r["mask_checksum"] for r in a] == [r["mask_checksum"] for r in b] and a[0]["mask_checksum"] != "0"
    for ra, rb in zip(a, b):
        assert math.isclose(float(ra["loss"]), float(rb["loss"]), rel_tol=1e-4, abs_tol=1e-6)


def test_time_budget_stops_early(train, data_dir, tmp_path):
    summary = run_train(train, data_dir, tmp_path, "--backbone", "dit", "--max-steps", "1000", "--time-budget", "0")
    assert summary["stopped_by"] == "time_budget" and summary["steps"] == 1
    assert training.latest_checkpoint(tmp_path).name == "step_0000001"


@pytest.mark.parametrize("args, message", [
    (["--backbone", "vit"], "invalid choice"),
    (["--backbone", "dit", "--routes", "2:8"], "START:END:RATIO"),
    (["--backbone", "dit", "--routes", "two:8:0.5"], "must be integers"),
    (["--backbone", "dit", "--routes", "1:4:1.5"], r"\[0, 1\)"),
    (["--backbone", "dit", "--routes", "2:30:0.5"], "out of range"),  # tokenroute's RouteError, 6-block tiny DiT
    (["--backbone", "uvit", "--routes", "1:3:0.5,3:5:0.5"], "overlap"),
    (["--backbone", "dit", "--preset", "huge"], "invalid choice"),
    (["--backbone", "dit", "--batch-size", "0"], "positive"),
    (["--backbone", "dit", "--data-dir", "MISSING"], "Fashion-MNIST not found"),
])
def test_bad_arguments_exit_before_any_work(train, data_dir, tmp_path, capsys, args, message):
    args = [a.replace("MISSING", str(tmp_path / "nowhere")) for a in args]
    if "--data-dir" not in args:
        args += ["--data-dir", str(data_dir)]
    with pytest.raises(SystemExit) as exc:
        train.main([*FAST, "--output", str(tmp_path / "out"), "--max-steps", "2", *args])
    code = exc.value.code
    assert code not in (0, None)
    text = (code if isinstance(code, str) else "") + capsys.readouterr().err
    assert re.search(message, text), text
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.slow
def test_cli_exit_code_and_message(data_dir, tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLES / "train.py"), "--backbone", "dit", "--routes", "2:30:0.5",
                           "--data-dir", str(data_dir), "--output", str(tmp_path)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    assert proc.returncode != 0
    assert "out of range" in proc.stderr and "6 blocks" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"Fashion-MNIST is not installed in {REAL_DATA}")
def test_cli_trains_on_real_fashion_mnist(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLES / "train.py"), "--backbone", "dit", "--routes", "1:4:0.5",
                           "--max-steps", "2", "--batch-size", "8", "--samples-per-class", "1", "--sample-steps", "2",
                           "--output", str(tmp_path)], capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["data"]["images"] == 70_000 and summary["steps"] == 2
    assert "done: 2 steps" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable) + os.pathsep
                                 + os.environ.get("PATH", "")) is None, reason="the accelerate launcher is not installed")
def test_two_processes_draw_different_masks(data_dir, tmp_path):
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env = subprocess_env()
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # two CPU processes (gloo), even on a GPU machine
    proc = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                           str(EXAMPLES / "train.py"), *FAST, "--backbone", "dit", "--routes", "1:4:0.5",
                           "--max-steps", "2", "--data-dir", str(data_dir), "--output", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 8
    first = summary["first_step_mask_checksums"]
    assert len(first) == 2 and first[0] != first[1] and min(first) > 0  # every rank routes its own tokens
    assert sorted(p.name for p in training.latest_checkpoint(tmp_path).glob("rank*.pt")) == ["rank0.pt", "rank1.pt"]


# --------------------------------------------------------------------------------------------------
# diffusers_dit.py and compare_routing
# --------------------------------------------------------------------------------------------------


def test_diffusers_example_saves_a_loadable_transformer(data_dir, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    import diffusers_dit as example
    summary = example.main(["--routes", "1:2:0.5", "--max-steps", "3", "--batch-size", "4", "--num-layers", "4",
                            "--num-inference-steps", "2", "--samples-per-class", "1", "--guidance-routing",
                            "--data-dir", str(data_dir), "--output", str(tmp_path), "--quiet", "--no-download"])
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"]) and summary["routes"] == [[1, 2, 0.5]]
    for name in ("samples.png", "summary.json", "loss.csv", "loss.png", "scheduler/scheduler_config.json"):
        assert (tmp_path / name).is_file(), name
    rows = training.read_loss_csv(tmp_path / "loss.csv")
    assert len(rows) == 3 and all(int(r["mask_checksum"]) > 0 for r in rows)

    loaded = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "transformer")
    assert loaded.config.num_layers == 4 and loaded.config.in_channels == 1
    saved = training.load_weights(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    state = loaded.state_dict()
    assert set(saved) == set(state) and all(torch.equal(saved[k], state[k]) for k in saved)
    loaded.eval()
    with torch.no_grad():
        out = loaded(torch.randn(2, 1, 32, 32), torch.tensor([10, 500]), torch.tensor([1, 10])).sample
    assert out.shape == (2, 1, 32, 32) and torch.isfinite(out).all()


def test_compare_routing(data_dir, tmp_path):
    import demo

    result = demo.compare_routing("dit", "tiny", steps=2, batch_size=4, output=tmp_path, data_dir=data_dir,
                                  sample_steps=2, samples_per_class=1, timing_rounds=2)
    assert result["routes"] == [[1, 4, 0.5]] and result["steps"] == 2 and result["objective"] == "flow"
    assert result["data"] == str(data_dir)
    for name in ("baseline", "routed"):
        run = result[name]
        assert run["steps"] == 2 and math.isfinite(run["final_loss"]) and run["wall_time_s"] > 0
        assert Path(run["samples"]).is_file()
    flops = result["flops"]
    assert 0 < flops["routed"] < flops["unrouted"]
    assert 0.2 < flops["saving"] < 0.5  # 4 of 6 blocks at half the tokens
    timing = result["interleaved_timing"]
    assert timing["routed_s"] > 0 and timing["unrouted_s"] > 0 and timing["rounds"] == 2
    assert all(len(ts) == 2 for ts in timing["each_round_s"].values())
    assert result["speedup"] == timing["speedup"]  # the one speed figure is the interleaved one
    assert result["samples"] == {"baseline": result["baseline"]["samples"], "routed": result["routed"]["samples"]}
    assert json.loads((tmp_path / "comparison.json").read_text())["steps"] == 2
    again = demo.compare_routing("dit", "tiny", steps=1, batch_size=4, output=tmp_path, data_dir=data_dir,
                                 sample_steps=1, samples_per_class=1, timing_rounds=0)
    assert again["steps"] == 1 and again["speedup"] is None  # an earlier demo run in the folder is replaced


DEMO_FAST = ["--steps", "3", "--batch-size", "4", "--samples-per-class", "1", "--sample-steps", "2",
             "--timing-rounds", "1"]


def test_demo_on_request_synthetic(tmp_path, capsys):
    import demo

    result = demo.main([*DEMO_FAST, "--synthetic", "--output", str(tmp_path)])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    plan = next(i for i, line in enumerate(lines) if line.startswith("tokenroute plan"))
    assert any("SYNTHETIC" in line for line in lines[:plan])  # said at the start, before any training
    assert "route 0 (tread): blocks 1..4" in out
    speed = [line for line in lines if line.startswith("speed:")]
    assert len(speed) == 1 and "x as fast" in speed[0] and "fewer FLOPs" in speed[0]
    assert "images/s" not in out  # no sequential throughput beside the interleaved figure
    for name in ("baseline", "routed"):
        assert result[name]["samples"] in out and Path(result[name]["samples"]).is_file()
    assert "100%" in err  # progress lines where stderr is no terminal


def test_demo_falls_back_only_where_the_data_is_not_installed(tmp_path, monkeypatch, capsys):
    import importlib.util

    import demo

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision would download the data set instead")
    monkeypatch.setattr(training.data, "DEFAULT_DATA_DIR", str(tmp_path / "not-installed"))
    result = demo.main([*DEMO_FAST, "--timing-rounds", "0", "--output", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert out.index("NOT INSTALLED") < out.index("tokenroute plan")
    assert "synthetic-data" in result["data"]


def test_demo_refuses_a_mistyped_data_dir_before_any_work(tmp_path):
    import demo

    with pytest.raises(SystemExit) as exc:
        demo.main([*DEMO_FAST, "--data-dir", str(tmp_path / "fashoin"), "--output", str(tmp_path / "out")])
    assert "Fashion-MNIST not found" in str(exc.value.code) and "--synthetic" in str(exc.value.code)
    assert not (tmp_path / "out").exists()


def test_masked_training_smoke(train, data_dir, tmp_path):
    """MaskDiT through the trainer: masked steps, then unmasking tuning for the last ones."""
    summary = run_train(train, data_dir, tmp_path, "--backbone", "dit", "--max-steps", "4", "--mask", "0.5",
                        "--decoder", "2", "--loss-mode", "visible", "--unmask-steps", "2", "--sample-every", "0")
    assert (tmp_path / "samples.png").is_file() and summary["steps"] == 4
    checksums = [int(r["mask_checksum"]) for r in training.read_loss_csv(tmp_path / "loss.csv")]
    assert len(checksums) == 4 and all(c > 0 for c in checksums[:2])
    with pytest.raises(SystemExit, match="does not fit"):
        run_train(train, data_dir, tmp_path / "bad", "--backbone", "dit", "--max-steps", "2", "--mask", "0.5",
                  "--decoder", "9")


def test_checkpoint_loads_into_the_plain_backbone_and_samples(train, data_dir, tmp_path):
    run_train(train, data_dir, tmp_path, "--backbone", "uvit", "--routes", "tread", "--max-steps", "2",
              "--ckpt-every", "2", "--sample-every", "0")
    import load_and_sample as loader
    out = loader.main([str(tmp_path), "--output", str(tmp_path / "from_checkpoint.png")])
    assert out.is_file() and out.stat().st_size > 0
    with pytest.raises(SystemExit, match="no checkpoint"):
        loader.main([str(tmp_path / "empty")])
