"""A process group of one's own, built directly on a store: what lets several engines, each
with its own peers, live in one process without torch's default group."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .deadlines import DEFAULT_TIMEOUT_S


def stateless_group(store: dist.Store, rank: int, world: int, backend: str = "gloo",
                    timeout_s: float = DEFAULT_TIMEOUT_S, host: str | None = None) -> dist.ProcessGroup:
    """A process group built directly on ``store``, outside torch's default group.

    Any number of these live in one process (one per engine, each with its own store and
    peers), and none of them makes ``torch.distributed.is_initialized()`` true, so torchrun
    scripts and other libraries are not disturbed. Ask it for its rank and size with
    ``group.rank()`` / ``group.size()`` (``comm.group_rank``): ``dist.get_rank(group)`` only
    knows groups made through the default group. Dropping the last reference closes it.
    ``host``: the address gloo connects on (``127.0.0.1`` keeps a one-machine group on
    loopback); by default the interfaces in ``GLOO_SOCKET_IFNAME``, else gloo picks one from
    the hostname.
    """
    from torch._C._distributed_c10d import ProcessGroup

    timeout = datetime.timedelta(seconds=timeout_s)
    pg = ProcessGroup(store, rank, world)
    if backend == "gloo":
        from torch.distributed import ProcessGroupGloo

        options = ProcessGroupGloo._Options()
        options._timeout = timeout
        interfaces = [i for i in os.environ.get("GLOO_SOCKET_IFNAME", "").split(",") if i]
        if host:
            options._devices = [ProcessGroupGloo.create_device(hostname=host)]
        elif interfaces:  # as torch's own gloo groups do
            options._devices = [ProcessGroupGloo.create_device(interface=i) for i in interfaces]
        else:
            options._devices = [ProcessGroupGloo.create_default_device()]
        impl = ProcessGroupGloo(store, rank, world, options)
        kind, device = ProcessGroup.BackendType.GLOO, torch.device("cpu")
    elif backend == "nccl":
        from torch.distributed import ProcessGroupNCCL

        options = ProcessGroupNCCL.Options()
        options._timeout = timeout
        impl = ProcessGroupNCCL(store, rank, world, options)
        kind, device = ProcessGroup.BackendType.NCCL, torch.device("cuda")
    else:
        raise ValueError(f"backend {backend!r} is not supported for an engine's own group; use gloo or nccl")
    pg._set_default_backend(kind)
    impl._set_sequence_number_for_group()
    pg._register_backend(device, kind, impl)
    return pg
