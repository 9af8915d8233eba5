"""Setting up shared memory for a group: a collective over the group's own (gloo) channel.

Ranks compare host keys, the first rank of each host creates a segment, the others open it,
and every rank says whether it could; the segment is unlinked once all have mapped it. A
group over several hosts also gets a gloo group of one rank per host (``shm``'s docstring).
"""

from __future__ import annotations

import os
import socket
import uuid
import warnings
from pathlib import Path

import torch.distributed as dist

from .comm import all_gather_object, broadcast_object
from .groups import stateless_group
from .shm import (
    SHM_DIR,
    SPINS_OWN_CORE,
    SPINS_SHARED_CORE,
    ShmComm,
    attached,
    enabled,
    extension,
    remove_stale,
    segment_bytes,
)


def host_key() -> str:
    """What ranks compare to learn that they share a host: hostname, boot and the /dev/shm
    mount (containers or namespaces with their own /dev/shm count as hosts of their own)."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    try:
        shm_dev = os.stat(SHM_DIR).st_dev
    except OSError:
        shm_dev = -1
    return f"{socket.gethostname()}|{boot.read_text().strip() if boot.is_file() else ''}|{shm_dev}"


def _create_segment(world: int) -> tuple[str | None, int]:
    """A new segment for ``world`` ranks: its path and fd, or (None, -1) with a warning."""
    remove_stale()
    path, fd = SHM_DIR / f"tpserve-{os.getpid()}-{uuid.uuid4().hex[:12]}", -1
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.ftruncate(fd, segment_bytes(world))
        return str(path), fd
    except OSError as exc:  # /dev/shm full or read-only: the peers must hear it, not wait
        warnings.warn(f"tpserve: cannot create a shared-memory segment ({exc}); using gloo", stacklevel=3)
        if fd >= 0:
            os.close(fd)
            path.unlink(missing_ok=True)
        return None, -1


def _cross_host_group(group, leaders: list[int], timeout: float):
    """A gloo group of the first rank of each host (on those ranks; None elsewhere), on the
    default group's store, or None everywhere when there is no default group to meet on."""
    rank = group.rank()
    ok = dist.is_initialized()
    name = broadcast_object(f"tpserve-hosts-{uuid.uuid4().hex}" if rank == 0 and ok else None, 0, group, timeout)
    if name is None or rank not in leaders:
        return None
    try:
        store = dist.PrefixStore(name, dist.distributed_c10d._get_default_store())
        return stateless_group(store, leaders.index(rank), len(leaders), "gloo", timeout_s=timeout)
    except RuntimeError as exc:  # the peers hear of it in attach's next step, and keep plain gloo
        warnings.warn(f"tpserve: cannot connect the hosts' first ranks ({exc}); using gloo", stacklevel=3)
        return None


def attach(group, timeout: float) -> ShmComm | None:
    """Set up shared memory for ``group`` (every rank calls this, with gloo working): None when
    it is off or cannot be built, or when no two ranks share a host or a rank cannot open its
    host's segment. Ranks on one host share one segment; a group over several hosts also gets
    a gloo group of one rank per host (see the module's docstring). Every rank reaches the
    same answer."""
    world, rank = group.size(), group.rank()
    if world == 1 or group in attached:
        return attached.get(group)
    usable = enabled() and SHM_DIR.is_dir() and extension() is not None
    facts = all_gather_object((usable, host_key()), group, timeout)
    if not all(u for u, _ in facts):
        return None
    keys = [k for _, k in facts]
    members = [r for r in range(world) if keys[r] == keys[rank]]  # the group ranks on this host
    leaders = [keys.index(k) for k in dict.fromkeys(keys)]  # the first group rank of each host
    if len(leaders) == world:
        return None  # one rank per host: nothing to share
    path, fd = _create_segment(len(members)) if rank == members[0] else (None, -1)
    paths = all_gather_object(path, group, timeout)
    comm, error = None, None
    try:
        if paths[members[0]] is None:
            error = "no segment"
        else:
            if rank != members[0]:
                fd = os.open(paths[members[0]], os.O_RDWR)
            spins = SPINS_OWN_CORE if len(members) <= (os.cpu_count() or 1) else SPINS_SHARED_CORE
            comm = ShmComm(fd, members.index(rank), len(members), spins, members)
    except OSError as exc:  # not the host we took it for: this group keeps gloo
        error = f"{type(exc).__name__}: {exc}"
    finally:
        if fd >= 0:
            os.close(fd)
    try:
        ok = all(e is None for e in all_gather_object(error, group, timeout))  # every rank has it mapped, or failed
    finally:
        if rank == members[0] and path is not None:
            Path(path).unlink(missing_ok=True)
    if ok and len(leaders) > 1:
        cross = _cross_host_group(group, leaders, timeout)
        ok = all(all_gather_object(cross is not None or rank not in leaders, group, timeout))
        if comm is not None:
            comm.spans_hosts, comm.cross = True, cross
    if not ok:
        if comm is not None:
            comm.close()
        return None
    attached[group] = comm
    return comm
