"""Collectives, process-group setup and the failure paths: clear errors, never a hang."""

import os
import time

import pytest
import torch
import torch.distributed as dist
from distpool import comm_error_after, spawn_once

from tpserve.parallel import (
    ColumnParallelLinear,
    CommError,
    PartitionError,
    TensorParallelConfig,
    all_gather,
    all_reduce_sum,
    barrier,
    broadcast_object,
    broadcast_tensor,
    head_ranges,
    partition_range,
    partition_sizes,
)


def check_collectives() -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.full((3,), float(rank + 1))
    assert torch.equal(all_reduce_sum(t), torch.full((3,), world * (world + 1) / 2))
    # uneven pieces along dim 1, with and without known sizes
    piece = torch.full((2, rank + 1), float(rank))
    want = torch.cat([torch.full((2, r + 1), float(r)) for r in range(world)], dim=1)
    assert torch.equal(all_gather(piece, dim=1), want)
    assert torch.equal(all_gather(piece, dim=1, sizes=[r + 1 for r in range(world)]), want)
    src = world - 1
    b = torch.arange(4.0) if rank == src else torch.zeros(4)
    assert torch.equal(broadcast_tensor(b, src=src), torch.arange(4.0))
    obj = broadcast_object({"step": 7, "text": "héllo"} if rank == 0 else None)
    assert obj == {"step": 7, "text": "héllo"}
    barrier()


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_collectives(tp_run, tp):
    tp_run(tp, check_collectives)


def check_subgroups() -> list:
    cfg = TensorParallelConfig(rank=dist.get_rank(), world_size=dist.get_world_size(), tp_size=2, backend="gloo")
    group = cfg.init()
    t = torch.tensor([float(dist.get_rank())])
    all_reduce_sum(t, group=group)
    layer = ColumnParallelLinear(4, 6, group=group)
    return [cfg.tp_ranks(), t.item(), layer.tp_rank, layer.weight.shape[0]]


def test_tp_group_is_a_subgroup_of_the_world(tp_run):
    out = tp_run(4, check_subgroups)
    assert [o[0] for o in out] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [o[1] for o in out] == [1.0, 1.0, 5.0, 5.0]  # sums stay inside each group
    assert [o[2] for o in out] == [0, 1, 0, 1]
    assert [o[3] for o in out] == [3, 3, 3, 3]


def test_partition_rule():
    assert partition_sizes(10, 4) == [3, 3, 2, 2]
    assert partition_range(10, 4, 2) == (6, 8)
    assert partition_sizes(9 * 64, 4, unit=64) == [192, 128, 128, 128]  # whole heads: 3,2,2,2
    assert head_ranges(9, 3, 2, 0) == ((0, 5), (0, 2))  # 9 heads / 3 KV heads at TP=2
    assert head_ranges(9, 3, 2, 1) == ((5, 9), (1, 3))  # KV head 1 is held by both ranks
    assert [head_ranges(9, 3, 4, r)[1] for r in range(4)] == [(0, 1), (1, 2), (1, 3), (2, 3)]  # heads 3|2|2|2
    with pytest.raises(PartitionError, match="TP degree <= 4"):
        partition_sizes(4, 5)
    with pytest.raises(PartitionError, match="not a whole number"):
        partition_sizes(10, 2, unit=4)


def test_config_from_env(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "12345")
    cfg = TensorParallelConfig.from_env(backend="gloo", tp_size=2)
    assert (cfg.rank, cfg.world_size, cfg.local_rank, cfg.master_port, cfg.backend) == (3, 4, 1, 12345, "gloo")
    assert cfg.tp_rank == 1 and cfg.tp_ranks() == [2, 3]
    assert TensorParallelConfig.from_env(device="cpu").backend == "gloo"


def test_world_size_that_does_not_match(monkeypatch):
    with pytest.raises(ValueError, match="does not divide world size 2"):
        TensorParallelConfig(rank=0, world_size=2, tp_size=4)
    with pytest.raises(ValueError, match="outside WORLD_SIZE"):
        TensorParallelConfig(rank=2, world_size=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="RANK is not set.*torchrun"):
        TensorParallelConfig.from_env()


def test_layers_before_any_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="not initialised.*init_distributed"):
        ColumnParallelLinear(4, 4)


def check_too_many_ranks() -> str:
    with pytest.raises(PartitionError) as info:
        ColumnParallelLinear(8, 3)
    return str(info.value)


def test_tp_degree_larger_than_dimension(tp_run):
    msgs = tp_run(4, check_too_many_ranks)
    assert all("TP=4" in m and "TP degree <= 3" in m for m in msgs)


def _peer_exits(timeout: float) -> str:
    if dist.get_rank() == 1:
        os._exit(3)
    return comm_error_after(lambda: all_reduce_sum(torch.ones(2), timeout=timeout))


def _peer_hangs(timeout: float) -> str:
    if dist.get_rank() == 1:
        time.sleep(timeout + 4)
        os._exit(0)

    def talk() -> None:
        broadcast_object("hello", src=0, timeout=timeout)
        all_reduce_sum(torch.ones(2), timeout=timeout)

    return comm_error_after(talk)


@pytest.mark.parametrize("fn,word", [(_peer_exits, "rank(s) [1]"), (_peer_hangs, "timed out")])
def test_collective_with_gone_peer_raises_quickly(fn, word):
    t0 = time.monotonic()
    out = spawn_once(fn, 2, 3.0, timeout=60)
    status, value = out[0]
    assert status == "ok", value
    elapsed, msg = value.split("|", 1)
    assert float(elapsed) < 10, msg
    assert "on rank 0" in msg and word in msg, msg
    assert time.monotonic() - t0 < 60


def _slow_peer_inside_patience(delay: float) -> str:
    from tpserve.parallel.comm import patience, set_default_timeout

    set_default_timeout(1.0)
    if dist.get_rank() == 1:
        time.sleep(delay)  # e.g. still compiling its decode step
    with patience(delay + 10):
        total = all_reduce_sum(torch.ones(2))
    if dist.get_rank() == 1:
        time.sleep(delay)
    try:  # patience is over: the 1 s default applies again
        all_reduce_sum(torch.ones(2))
    except CommError:
        return f"{total.tolist()}|timed out after"
    return f"{total.tolist()}|no error"


def test_patience_raises_the_deadline_for_a_while():
    out = spawn_once(_slow_peer_inside_patience, 2, 3.0, timeout=60)
    status, value = out[0]
    assert status == "ok", value
    assert value == "[2.0, 2.0]|timed out after"
