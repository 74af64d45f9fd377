"""Sharded training: a wrapped model under FSDP2 (blocks as the wrapping unit, two processes on the gloo backend)
trains exactly as the unsharded model does with the same data and masks, each rank draws its own masks, and the
gathered checkpoint loads into the plain backbone."""

from __future__ import annotations

import os
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import backbone_inputs, make_backbone

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
STEPS, WORLD = 3, 2


def train(rank: int, rendezvous: str, sharded: bool, out: str, steps: tuple[int, int] = (0, STEPS),
          resume: str | None = None) -> None:
    """Steps ``steps[0]..steps[1]`` of a wrapped tiny DiT; sharded: FSDP2 on every block and the root, else the
    whole model on each rank with its gradients averaged (what DDP does). ``resume``: the name of a sharded run's
    saved state (full model and optimizer state dicts, each rank's routing state) to continue from; a sharded run
    saves its state at its end."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import tokenroute
    from tokenroute.training import (EMA, full_optimizer_state, full_state_dict, load_full_optimizer_state,
                                     load_full_state_dict, mask_checksum)

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = tokenroute.wrap(make_backbone("dit", depth=4, size=16), routes=[(1, 2, 0.5)], seed=0)
        ema = EMA(model, decay=0.9)  # before sharding: a whole copy
        if sharded:
            from torch.distributed.fsdp import fully_shard

            for block in tokenroute.core.find_stack(model).blocks:
                fully_shard(block)
            fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if resume is not None:
            saved = torch.load(os.path.join(out, f"{resume}{rank}.pt"), weights_only=False)
            first = torch.load(os.path.join(out, f"{resume}0.pt"), weights_only=False)  # rank 0 holds the whole
            load_full_state_dict(model, first["state"])
            load_full_optimizer_state(model, optimizer, first["optimizer"])
            ema.load_state_dict(first["ema"])
            tokenroute.load_routing_state_dict(model, saved["routing"])  # each rank its own
        losses, checksums = [], []
        for step in range(*steps):
            x, t, y = backbone_inputs(2, seed=100 * step + rank, size=16)
            loss = model(x, t, y).square().mean()
            checksums.append(int(mask_checksum(tokenroute.routing_masks(model))))
            optimizer.zero_grad()
            loss.backward()
            if not sharded:
                for p in model.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= WORLD
            optimizer.step()
            ema.update(model, step)
            losses.append(float(loss.detach()))
        state, optimizer_state = full_state_dict(model), full_optimizer_state(model, optimizer)
        routing = tokenroute.routing_state_dict(model)
        x, t, y = backbone_inputs(2, seed=999, size=16)
        with torch.no_grad():
            output = model.eval()(x, t, y)
        name = ("fsdp" if sharded else "plain") + ("" if steps == (0, STEPS) else f"_{steps[0]}_{steps[1]}")
        torch.save({"losses": losses, "checksums": checksums, "state": state, "optimizer": optimizer_state,
                    "ema": ema.state_dict(), "routing": routing, "output": output}, os.path.join(out, f"{name}{rank}.pt"))
    finally:
        dist.barrier()  # neither rank tears the group down while the other still talks to it
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sharded"))
    rendezvous = (os.path.join(out, f"rendezvous{i}") for i in itertools.count())  # a file store: no ports
    for sharded in (False, True):
        mp.spawn(train, args=(next(rendezvous), sharded, out), nprocs=WORLD)
    mp.spawn(train, args=(next(rendezvous), True, out, (0, 1)), nprocs=WORLD)  # stopped after a step, then resumed
    mp.spawn(train, args=(next(rendezvous), True, out, (1, STEPS), "fsdp_0_1"), nprocs=WORLD)
    return {name: [torch.load(os.path.join(out, f"{name}{r}.pt"), weights_only=False) for r in range(WORLD)]
            for name in ("plain", "fsdp", "fsdp_0_1", f"fsdp_1_{STEPS}")}


def test_fsdp2_trains_as_the_unsharded_model_with_each_rank_its_own_masks(runs):
    """The same losses and masks per rank, and the same EMA (kept whole, updated from the gathered shards)."""
    for plain, fsdp in zip(runs["plain"], runs["fsdp"]):
        torch.testing.assert_close(torch.tensor(fsdp["losses"]), torch.tensor(plain["losses"]), rtol=1e-5, atol=1e-6)
        assert fsdp["checksums"] == plain["checksums"]
        torch.testing.assert_close(fsdp["ema"], plain["ema"], rtol=1e-5, atol=1e-6)
    assert runs["fsdp"][0]["checksums"] != runs["fsdp"][1]["checksums"]


def test_the_gathered_checkpoint_loads_into_the_plain_backbone(runs):
    """Rank 0's full state dict (gathered from the shards) loads strictly into an unwrapped DiT, which then gives
    the sharded model's eval output."""
    plain = make_backbone("dit", depth=4, size=16)
    plain.load_state_dict(runs["fsdp"][0]["state"], strict=True)
    x, t, y = backbone_inputs(2, seed=999, size=16)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x, t, y), runs["fsdp"][0]["output"], rtol=1e-5, atol=1e-6)


def test_a_sharded_run_resumed_from_its_saved_state_continues_exactly(runs):
    """Stopped after one step (full model and optimizer state gathered, each rank's routing state) and resumed in
    a new process group: the same losses and masks as the run straight through, per rank."""
    for straight, first, rest in zip(runs["fsdp"], runs["fsdp_0_1"], runs[f"fsdp_1_{STEPS}"]):
        assert first["losses"] + rest["losses"] == straight["losses"]
        assert first["checksums"] + rest["checksums"] == straight["checksums"]
        assert all(torch.equal(rest["ema"][k], straight["ema"][k]) for k in straight["ema"])


def train_deepspeed(rank: int, rendezvous: str, stage: int, out: str) -> None:
    """The same steps under DeepSpeed ZeRO ``stage`` (its engine's backward and step)."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import deepspeed

    import tokenroute

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = tokenroute.wrap(make_backbone("dit", depth=4, size=16), routes=[(1, 2, 0.5)], seed=0)
        config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01, "torch_adam": True}}}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        losses = []
        for step in range(STEPS):
            x, t, y = backbone_inputs(2, seed=100 * step + rank, size=16)
            loss = engine(x, t, y).square().mean()
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        torch.save({"losses": losses}, os.path.join(out, f"zero{stage}_{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_as_the_unsharded_model(runs, stage, tmp_path):
    """Where DeepSpeed installs: ZeRO-2 and ZeRO-3 give the unsharded run's losses (under ZeRO-3 the splice routes
    with module hooks: the graph splice does not run there yet)."""
    pytest.importorskip("deepspeed")
    mp.spawn(train_deepspeed, args=(str(tmp_path / "rendezvous"), stage, str(tmp_path)), nprocs=WORLD)
    for rank, plain in enumerate(runs["plain"]):
        losses = torch.load(tmp_path / f"zero{stage}_{rank}.pt")["losses"]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(plain["losses"]), rtol=1e-5, atol=1e-6)
