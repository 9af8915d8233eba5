"""Where this process sits in the world: torchrun's variables, or a group of its own."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import deadlines
from .deadlines import DEFAULT_TIMEOUT_S


def _env_int(name: str, default: int | None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise RuntimeError(
                f"environment variable {name} is not set: launch with torchrun "
                f"(torchrun --nproc-per-node N ...) or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
            )
        return default
    try:
        return int(raw)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={raw!r} is not an integer") from None


@dataclass
class TensorParallelConfig:
    """Rank, world and TP-group layout of this process.

    ``tp_size`` defaults to the whole world. When it is smaller, the world is cut into
    contiguous TP groups of ``tp_size`` ranks (ranks 0..tp-1, tp..2tp-1, ...), as Megatron does.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    backend: str | None = None
    tp_size: int | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    device: torch.device | None = field(default=None)

    def __post_init__(self) -> None:
        if self.tp_size is None:
            self.tp_size = self.world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"RANK={self.rank} is outside WORLD_SIZE={self.world_size}")
        if self.tp_size < 1 or self.world_size % self.tp_size:
            raise ValueError(
                f"tensor-parallel size {self.tp_size} does not divide world size {self.world_size}: "
                f"choose a TP size that divides the number of processes"
            )
        if self.device is None:
            self.device = (
                torch.device("cuda", self.local_rank) if torch.cuda.is_available() and self.backend != "gloo" else torch.device("cpu")
            )
        if self.backend is None:
            self.backend = "nccl" if self.device.type == "cuda" else "gloo"

    @classmethod
    def from_env(cls, backend: str | None = None, tp_size: int | None = None, timeout_s: float | None = None,
                 device: str | torch.device | None = None) -> "TensorParallelConfig":
        """Read RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT as torchrun sets them."""
        world = _env_int("WORLD_SIZE", 1)
        return cls(
            rank=_env_int("RANK", 0 if world == 1 else None),
            world_size=world,
            local_rank=_env_int("LOCAL_RANK", 0),
            master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_env_int("MASTER_PORT", 29500 if world == 1 else None),
            backend=backend or os.environ.get("TPSERVE_BACKEND") or None,
            tp_size=tp_size,
            timeout_s=deadlines.DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s,  # set_default_timeout's
            device=torch.device(device) if device is not None else None,
        )

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    def tp_ranks(self) -> list[int]:
        """Global ranks of this process's TP group."""
        first = self.rank - self.tp_rank
        return list(range(first, first + self.tp_size))

    def init(self) -> dist.ProcessGroup:
        """Initialise torch.distributed (if needed) and return this rank's TP group."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group(
                self.backend,
                init_method=f"tcp://{self.master_addr}:{self.master_port}",
                rank=self.rank,
                world_size=self.world_size,
                timeout=datetime.timedelta(seconds=self.timeout_s),
            )
        elif dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise RuntimeError(
                f"torch.distributed is already initialised as rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"but this config says rank {self.rank} of {self.world_size}: use one or the other"
            )
        if self.tp_size == self.world_size:
            mine = dist.group.WORLD
        else:
            for first in range(0, self.world_size, self.tp_size):  # every rank must create every group
                g = dist.new_group(list(range(first, first + self.tp_size)))
                if first <= self.rank < first + self.tp_size:
                    mine = g
        if self.backend == "gloo":
            from .shm_setup import attach

            attach(mine, self.timeout_s)  # ranks that share a host then meet in shared memory
        return mine


def init_distributed(backend: str | None = None, tp_size: int | None = None, timeout_s: float | None = None) -> dist.ProcessGroup:
    """One-line setup for torchrun scripts: ``group = tpserve.parallel.init_distributed()``."""
    return TensorParallelConfig.from_env(backend=backend, tp_size=tp_size, timeout_s=timeout_s).init()
