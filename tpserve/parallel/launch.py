"""Run a function on N local processes joined in one gloo/NCCL group (one machine only).

For several machines use torchrun: it sets the same variables this sets here.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import torch.multiprocessing as mp

from tpserve.utils.net import free_port


def _entry(rank: int, fn: Callable, world: int, port: int, backend: str | None, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    from .config import init_distributed

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    init_distributed(backend=backend)
    fn(*args)
    # Everyone arrives before anyone tears down: a rank that destroys its group while a peer
    # is still using the connection can abort the peer.
    dist.barrier()
    dist.destroy_process_group()
    # Leave without interpreter teardown: after a backward pass through collectives, torch's
    # exit-time thread cleanup can abort a spawned child (SIGABRT) although its work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch_local(fn: Callable, nprocs: int, *args, backend: str | None = None) -> None:
    """``fn(*args)`` on ``nprocs`` spawned ranks; if one fails the others are stopped and the
    failure is re-raised here."""
    mp.spawn(_entry, args=(fn, nprocs, free_port(), backend, args), nprocs=nprocs, join=True)
