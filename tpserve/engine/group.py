"""An engine's ranks find each other: the TCP store rank 0 serves on loopback, the process
group built on it (outside torch's default group), and each rank's device. The driver and
its workers both start here."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from tpserve.parallel import set_group_timeout
from tpserve.parallel.deadlines import STARTUP_TIMEOUT_S
from tpserve.parallel.groups import stateless_group
from tpserve.parallel.shm_setup import attach

CONNECT_TIMEOUT_S = 60.0  # ranks already running find each other in well under a second


def engine_device(device: str | None, rank: int) -> torch.device:
    """This rank's device: ``cuda`` without an index means one GPU per rank."""
    from tpserve.models.loading import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and (device is None or torch.device(device).index is None):
        dev = torch.device("cuda", rank % max(1, torch.cuda.device_count()))
    return dev


def join_engine_group(store: dist.Store, rank: int, world: int, device: torch.device,
                      comm_timeout: float) -> dist.ProcessGroup:
    """The engine's own process group over ``store`` (see ``parallel.groups.stateless_group``), with the
    engine's deadline for its collectives."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Every rank is known alive when this starts (the workers said "started"), so connecting is quick;
    # a short deadline bounds the wait should one die in between. Then the long one, for compiles.
    group = stateless_group(store, rank, world, backend, timeout_s=CONNECT_TIMEOUT_S, host="127.0.0.1")
    group.set_timeout(datetime.timedelta(seconds=max(STARTUP_TIMEOUT_S, comm_timeout)))
    set_group_timeout(group, comm_timeout)
    if backend == "gloo":
        attach(group, comm_timeout)  # the ranks share this host: collectives through shared memory
    return group


def engine_store(port: int, world: int, is_master: bool) -> dist.TCPStore:
    """The engine's rendezvous on loopback: rank 0 serves it on ``port`` (0: any free port,
    read back from ``store.port``), the workers connect to it."""
    return dist.TCPStore("127.0.0.1", port, world, is_master=is_master, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S), use_libuv=True)
