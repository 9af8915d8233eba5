"""Shared-memory collectives for the ranks of a group that share a host.

gloo takes ~400 us for a 4 KiB all-reduce on loopback, and a decode step makes two per layer:
tensor parallelism on CPU spent more time talking than computing. Ranks on one host can
instead meet in one mapped segment (``csrc/shm_comm.cpp``): each copies its data into its own
slot, publishes a round number and spins (with a pause instruction, yielding once past a
budget, so more ranks than cores still finish) until its peers published theirs, then reads
their slots. Every wait has the group's deadline and notices a dead peer (``CommError``
naming it). The segment is unlinked from ``/dev/shm`` as soon as every rank has mapped it, so
nothing is left behind after a close, an exception or a kill -9.

``shm_setup.attach`` sets it up for a group (a collective); ``comm``'s functions then use it for CPU
tensors and keep gloo for everything else, and when ``TPSERVE_SHM=0`` or no C++ compiler can
build the module (one warning). A group that spans hosts gets one segment per host: its
all-reduce sums on each host in shared memory, then the hosts' sums over gloo between one
rank per host, and spreads the result on each host; its other collectives stay on gloo.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import torch

from tpserve.utils.fs import pid_alive
from tpserve.utils.native import NATIVE_FLAGS, optional_extension

SLOT_BYTES = 1 << 20  # per rank and slot; larger messages go through in several rounds
SHM_DIR = Path("/dev/shm")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
SPINS_OWN_CORE = 1 << 16  # ~3 ms of pause instructions before yielding
SPINS_SHARED_CORE = 64  # more ranks than cores: a waiting rank must give its core to the one it waits for

_ext = None
attached: dict = {}  # group -> ShmComm


class ShmError(RuntimeError):
    """A shared-memory wait failed; ``peer`` is the group rank waited for."""

    def __init__(self, kind: str, peer: int, detail: str) -> None:
        super().__init__(f"{kind} waiting for rank {peer} ({detail})")
        self.kind, self.peer, self.detail = kind, peer, detail


def enabled() -> bool:
    return os.environ.get("TPSERVE_SHM", "1") != "0"


def extension():
    """The C++ module, built once per machine (torch caches the build, and a lock keeps ranks
    from building it at the same time); None, with one warning, when it cannot be built."""
    global _ext
    if _ext is None:
        _ext = optional_extension(Path(__file__).with_name("csrc") / "shm_comm.cpp", "tpserve_shm", ("-O3", *NATIVE_FLAGS),
                                  "shared-memory collectives", "using gloo (set TPSERVE_SHM=0 to silence this)")
    return _ext


class ShmComm:
    """One group's segment and the C++ object that runs its rounds."""

    def __init__(self, fd: int, rank: int, world: int, spins: int, members: list[int] | None = None) -> None:
        self._map = mmap.mmap(fd, segment_bytes(world))
        self._anchor = ctypes.c_char.from_buffer(self._map)  # keeps the mapping's address fixed
        self._comm = extension().Comm(ctypes.addressof(self._anchor), rank, world, SLOT_BYTES, spins)
        self.rank, self.world = rank, world
        self.members = members or list(range(world))  # group rank of each segment rank
        self.spans_hosts = False  # True: this segment is one host's share of a larger group
        self.cross = None  # on the first rank of each host of such a group: the gloo group of those ranks
        self.broken: str | None = None

    def takes(self, tensor: torch.Tensor) -> bool:
        """Whether this tensor can go through shared memory (the same answer on every rank)."""
        return tensor.is_cpu and tensor.dtype in _DTYPES

    def _call(self, fn, *args) -> None:
        if self.broken:
            raise ShmError("failed earlier", -1, self.broken)
        try:
            fn(*args)
        except RuntimeError as exc:
            kind, _, rest = str(exc).partition(":")
            peer, _, detail = rest.partition(":")
            if kind not in ("dead", "timeout"):
                raise
            peer = self.members[int(peer)]
            self.broken = f"rank {peer} {'exited' if kind == 'dead' else 'timed out'}"
            raise ShmError("peer exited" if kind == "dead" else "timed out",
                           peer, f"pid {detail}" if kind == "dead" else f"{float(detail):.1f}s") from None

    def all_reduce(self, tensor: torch.Tensor, timeout: float) -> None:
        """Sum in place; ``tensor`` must be contiguous."""
        self._call(self._comm.all_reduce, tensor.data_ptr(), tensor.numel(), _DTYPES[tensor.dtype], timeout)

    def gather_bytes(self, tensor: torch.Tensor, nbytes: list[int], out: torch.Tensor | None, dst: int,
                     timeout: float) -> None:
        """Every rank's contiguous ``tensor`` (``nbytes[r]`` bytes each) into ``out`` in rank
        order, on rank ``dst`` only (-1: everywhere; ranks that copy nothing pass out=None)."""
        self._call(self._comm.all_gather, tensor.data_ptr(), nbytes, 0 if out is None else out.data_ptr(), dst,
                   timeout)

    def broadcast(self, tensor: torch.Tensor, src: int, timeout: float) -> None:
        self._call(self._comm.broadcast, tensor.data_ptr(), tensor.numel() * tensor.element_size(), src, timeout)

    def close(self) -> None:
        self.cross = None
        self._comm = None
        self._anchor = None
        self._map.close()


def segment_bytes(world: int) -> int:
    return extension().Comm.header_bytes(world) + world * 2 * SLOT_BYTES


def of(group) -> ShmComm | None:
    return attached.get(group)


def detach(group) -> None:
    comm = attached.pop(group, None)
    if comm is not None:
        comm.close()


def remove_stale() -> None:
    """Segments of processes that died between creating and unlinking them (a tiny window)."""
    for path in SHM_DIR.glob("tpserve-*-*"):
        try:
            pid = int(path.name.split("-")[1])
        except ValueError:
            continue
        if not pid_alive(pid):
            path.unlink(missing_ok=True)
