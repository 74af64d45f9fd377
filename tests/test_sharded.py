"""Sharded training: a wrapped model under FSDP2 (blocks as the wrapping unit, two processes on the gloo backend)
trains exactly as the unsharded model does with the same data and masks, each rank draws its own masks, and the
gathered checkpoint loads into the plain backbone."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import backbone_inputs, make_backbone

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
STEPS, WORLD = 3, 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(rank: int, port: int, sharded: bool, out: str) -> None:
    """A few steps of a wrapped tiny DiT; sharded: FSDP2 on every block and the root, else the whole model on
    each rank with its gradients averaged (what DDP does)."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import tokenroute
    from tokenroute.training import mask_checksum

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = tokenroute.wrap(make_backbone("dit", depth=4, size=16), routes=[(1, 2, 0.5)], seed=0)
        if sharded:
            from torch.distributed.fsdp import fully_shard

            for block in tokenroute.core.find_stack(model).blocks:
                fully_shard(block)
            fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses, checksums = [], []
        for step in range(STEPS):
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
            losses.append(float(loss.detach()))
        state = None
        if sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        x, t, y = backbone_inputs(2, seed=999, size=16)
        with torch.no_grad():
            output = model.eval()(x, t, y)
        torch.save({"losses": losses, "checksums": checksums, "state": state, "output": output},
                   os.path.join(out, f"{'fsdp' if sharded else 'plain'}{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sharded"))
    for sharded in (False, True):
        mp.spawn(train, args=(free_port(), sharded, out), nprocs=WORLD)
    return {name: [torch.load(os.path.join(out, f"{name}{r}.pt"), weights_only=False) for r in range(WORLD)]
            for name in ("plain", "fsdp")}


def test_fsdp2_trains_as_the_unsharded_model_with_each_rank_its_own_masks(runs):
    for plain, fsdp in zip(runs["plain"], runs["fsdp"]):
        torch.testing.assert_close(torch.tensor(fsdp["losses"]), torch.tensor(plain["losses"]), rtol=1e-5, atol=1e-6)
        assert fsdp["checksums"] == plain["checksums"]
    assert runs["fsdp"][0]["checksums"] != runs["fsdp"][1]["checksums"]


def test_the_gathered_checkpoint_loads_into_the_plain_backbone(runs):
    """Rank 0's full state dict (gathered from the shards) loads strictly into an unwrapped DiT, which then gives
    the sharded model's eval output."""
    plain = make_backbone("dit", depth=4, size=16)
    plain.load_state_dict(runs["fsdp"][0]["state"], strict=True)
    x, t, y = backbone_inputs(2, seed=999, size=16)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x, t, y), runs["fsdp"][0]["output"], rtol=1e-5, atol=1e-6)
