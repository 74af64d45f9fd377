"""The examples under ``accelerate launch`` with the configs in examples/accelerate/, in two CPU processes (gloo).

Accelerate 1.16 selects FSDP only where every process has a GPU or another accelerator (``AcceleratorState``
keeps ``MULTI_CPU`` otherwise) and DeepSpeed only without ``cpu=True``, so on CPUs those configs would train whole
models under DDP: the examples refuse them, tested as they are. To run the examples' FSDP2 and DeepSpeed paths on
CPUs all the same, this file is also a launch target (``accelerate launch --config_file C
tests/test_accelerate_launch.py SCRIPT ARGS``): it has ``AcceleratorState`` choose what it chooses on GPUs from the
same config, FSDP (or DeepSpeed) instead of ``MULTI_CPU``, then runs SCRIPT. All after that choice is Accelerate's
own: ``prepare``'s ``fully_shard`` per block, DeepSpeed's engine and its ZeRO optimizer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "accelerate"


def select_sharding_on_cpus() -> None:
    """Patch ``AcceleratorState`` to choose FSDP or DeepSpeed on a ``MULTI_CPU`` state, as it does (state.py) in
    its multi-GPU branch and its DeepSpeed branch."""
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        fsdp, deepspeed = kwargs.get("fsdp_plugin"), kwargs.get("deepspeed_plugin")
        if self.distributed_type != DistributedType.MULTI_CPU or (fsdp is None and deepspeed is None):
            return
        if deepspeed is not None:
            self.distributed_type = DistributedType.DEEPSPEED
            deepspeed.set_mixed_precision(self._mixed_precision)
            deepspeed.select(_from_accelerator_state=True)
            self.deepspeed_plugins = deepspeed
            self._mixed_precision = "no"  # DeepSpeed's config carries it
        else:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp
        state.PartialState._shared_state["distributed_type"] = self.distributed_type

    state.AcceleratorState.__init__ = __init__


if __name__ == "__main__":  # the launch target: SCRIPT ARGS
    select_sharding_on_cpus()
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(Path(sys.argv[0]).parent))
    runpy.run_path(sys.argv[0], run_name="__main__")
    sys.exit(0)

from test_examples import EXAMPLES, FAST, free_port, subprocess_env  # noqa: E402

from tokenroute import training  # noqa: E402

pytest.importorskip("accelerate")
LAUNCHER = shutil.which("accelerate", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(LAUNCHER is None, reason="the accelerate launcher is not installed")]
TRAIN = ["--backbone", "dit", "--routes", "1:4:0.5", "--sample-every", "0", "--ckpt-every", "2",
         "--keep-checkpoints", "0"]
DEEPSPEED = importlib.util.find_spec("deepspeed") is not None and importlib.util.find_spec("transformers") is not None


def launch(config: str | None, processes: int, script: str, *args: str, sharded: bool = False,
           options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``accelerate launch`` on CPUs: with ``config`` (a file in examples/accelerate/), else plain data
    parallelism; ``sharded``: through this file, so that Accelerate selects the config's sharding; ``options``:
    more of the launcher's."""
    options = (*(["--config_file", str(CONFIGS / config)] if config else ["--multi_gpu"]), *options)
    target = [__file__, str(EXAMPLES / script)] if sharded else [str(EXAMPLES / script)]
    env = subprocess_env()
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([LAUNCHER, "launch", *options, "--num_processes", str(processes), "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                           *target, *args], capture_output=True, text=True, env=env, timeout=300)


def train(output: Path, data: Path, config: str | None = None, *args: str) -> dict:
    proc = launch(config, 2, "train.py", *FAST, *TRAIN, "--data-dir", str(data), "--output", str(output), *args,
                  sharded=config is not None)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((output / "summary.json").read_text())


def losses(output: Path) -> list[tuple[float, str]]:
    return [(float(r["loss"]), r["mask_checksum"]) for r in training.read_loss_csv(output / "loss.csv")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return training.write_synthetic_fashion_mnist(tmp_path_factory.mktemp("fashion"), num_train=48, num_test=16)


@pytest.fixture(scope="module")
def ddp(data_dir, tmp_path_factory) -> Path:
    """The reference: four steps in two processes under DDP."""
    output = tmp_path_factory.mktemp("ddp")
    train(output, data_dir, None, "--max-steps", "4")
    return output


@pytest.mark.parametrize("config, message", [
    ("fsdp2.yaml", "asks for FSDP, but Accelerate chose MULTI_CPU"),
    ("deepspeed_zero2.yaml",
     "asks for DeepSpeed, but Accelerate chose MULTI_CPU" if DEEPSPEED else "needs .*transformers")])
def test_a_sharding_config_accelerate_would_not_run_is_refused(data_dir, tmp_path, config, message):
    """On CPUs Accelerate would train whole models under DDP: the example says so, and how to launch instead."""
    if config.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed")
    proc = launch(config, 1, "train.py", *FAST, *TRAIN, "--max-steps", "1", "--data-dir", str(data_dir),
                  "--output", str(tmp_path / "run"))
    assert proc.returncode != 0
    assert re.search(f"train.py: error: .*{message}", proc.stderr), proc.stderr[-3000:]
    assert not (tmp_path / "run" / "summary.json").exists()


def test_fsdp2_trains_as_ddp_and_its_checkpoint_loads_into_the_plain_backbone(ddp, data_dir, tmp_path):
    """examples/train.py under fsdp2.yaml (each DiTBlock a unit): DDP's losses and masks per step, each rank its own
    masks, and a checkpoint that loads strictly into an unwrapped DiT with DDP's weights."""
    summary = train(tmp_path, data_dir, "fsdp2.yaml", "--max-steps", "4")
    assert summary["distributed_type"] == "FSDP" and summary["world_size"] == 2
    first = summary["first_step_mask_checksums"]
    assert first[0] != first[1]
    sharded, reference = losses(tmp_path), losses(ddp)
    assert [c for _, c in sharded] == [c for _, c in reference]
    torch.testing.assert_close(torch.tensor([v for v, _ in sharded]), torch.tensor([v for v, _ in reference]),
                               rtol=1e-5, atol=1e-6)
    model = training.build_model("dit", "tiny")
    for name in ("model", "ema"):
        state = training.load_weights(tmp_path / "checkpoints" / "step_0000004" / f"{name}.safetensors")
        model.load_state_dict(state, strict=True)
        expected = training.load_weights(ddp / "checkpoints" / "step_0000004" / f"{name}.safetensors")
        for key, value in expected.items():
            torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "step_0000004").glob("rank*.pt")) == ["rank0.pt",
                                                                                                   "rank1.pt"]
    shutil.rmtree(tmp_path / "checkpoints" / "step_0000004")  # stopped after step 2, then resumed
    resumed = train(tmp_path, data_dir, "fsdp2.yaml", "--max-steps", "4", "--resume")
    assert resumed["start_step"] == 2
    assert losses(tmp_path) == sharded  # each rank's masks, data and optimizer state continue exactly


def test_diffusers_example_under_fsdp2_saves_a_loadable_transformer(data_dir, tmp_path):
    """examples/diffusers_dit.py with each BasicTransformerBlock (and its embedding, which the model's forward calls
    again after the blocks) a unit: its weights (gathered from the shards, no EMA) load with from_pretrained."""
    diffusers = pytest.importorskip("diffusers")
    proc = launch("fsdp2.yaml", 2, "diffusers_dit.py", "--routes", "1:2:0.5", "--max-steps", "2", "--batch-size", "4",
                  "--num-layers", "4", "--ema-decay", "0", "--num-inference-steps", "1", "--samples-per-class", "1",
                  "--data-dir", str(data_dir), "--output", str(tmp_path), "--quiet", "--no-download", sharded=True,
                  options=("--fsdp_transformer_layer_cls_to_wrap",
                           "BasicTransformerBlock,CombinedTimestepLabelEmbeddings"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["distributed_type"] == "FSDP"
    loaded = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "transformer")
    assert loaded.config.num_layers == 4
    assert all(torch.isfinite(p).all() for p in loaded.parameters())


@pytest.mark.skipif(not DEEPSPEED, reason="Accelerate's DeepSpeed integration needs deepspeed and transformers")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_as_ddp_and_saves_the_plain_backbone(ddp, data_dir, tmp_path, stage):
    """examples/train.py under deepspeed_zero{2,3}.yaml: DDP's first losses and masks, a checkpoint (gathered from
    ZeRO-3's partitions) that loads strictly into an unwrapped DiT, and --resume refused with the way out."""
    summary = train(tmp_path, data_dir, f"deepspeed_zero{stage}.yaml", "--max-steps", "2")
    assert summary["distributed_type"] == "DEEPSPEED"
    sharded, reference = losses(tmp_path), losses(ddp)[:2]
    assert [c for _, c in sharded] == [c for _, c in reference]
    torch.testing.assert_close(torch.tensor([v for v, _ in sharded]), torch.tensor([v for v, _ in reference]),
                               rtol=1e-5, atol=1e-6)
    state = training.load_weights(tmp_path / "checkpoints" / "step_0000002" / "model.safetensors")
    training.build_model("dit", "tiny").load_state_dict(state, strict=True)
    expected = training.load_weights(ddp / "checkpoints" / "step_0000002" / "model.safetensors")
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5)
    proc = launch(f"deepspeed_zero{stage}.yaml", 2, "train.py", *FAST, *TRAIN, "--max-steps", "4", "--resume",
                  "--data-dir", str(data_dir), "--output", str(tmp_path), sharded=True)
    assert proc.returncode != 0 and "--init-from" in proc.stderr and "under DeepSpeed" in proc.stderr


def test_configure_sharding_makes_each_block_an_fsdp2_unit_and_refuses_a_class_the_model_lacks():
    """The config's wrapping class, filled in from the routed stack where it names none; a class the model lacks
    is refused with the model's block class to name instead."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    import tokenroute
    from helpers import make_backbone

    model = tokenroute.wrap(make_backbone("uvit", depth=5), routes=[(1, 2, 0.5)])
    for names, expected in ((None, ["UViTBlock"]), (["UViTBlock"], ["UViTBlock"]), (["DiTBlock"], None)):
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                transformer_cls_names_to_wrap=names)
        accelerator = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin))
        if expected is None:
            with pytest.raises(SystemExit, match="wraps DiTBlock, .* its blocks are UViTBlock: pass "
                                                 "--fsdp_transformer_layer_cls_to_wrap UViTBlock"):
                training.configure_sharding(accelerator, model, 4, 0.0, "train.py")
        else:
            training.configure_sharding(accelerator, model, 4, 0.0, "train.py")
            assert plugin.transformer_cls_names_to_wrap == expected
