"""Collectives with deadlines, on any process group.

Every function here waits at most ``timeout`` seconds (default: the group's own deadline, set
by the engine that owns it, else ``TPSERVE_COMM_TIMEOUT`` or 300) and turns a dead or silent
peer into a :class:`CommError` that says which rank was waiting and for whom, instead of
hanging forever. Groups are asked for their rank and size themselves, so a group built
without torch's default group (an engine's own, see ``groups.stateless_group``) works
everywhere the default one does.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import pickle
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from . import deadlines as _deadlines
from . import shm as _shm


class CommError(RuntimeError):
    """A collective failed or timed out: a peer process has exited or hung."""


# A group's own deadline, when its owner (an engine) set one; other groups use the process default.
# Keyed by the group object: several engines in one process keep their own deadlines.
_group_timeouts: dict[object, float] = {}


def set_default_timeout(seconds: float) -> None:
    """Deadline for every later collective on a group without a deadline of its own."""
    _deadlines.DEFAULT_TIMEOUT_S = float(seconds)


def set_group_timeout(group: dist.ProcessGroup, seconds: float | None) -> None:
    """Give ``group`` its own deadline (None: back to the process default)."""
    if seconds is None:
        _group_timeouts.pop(group, None)
    else:
        _group_timeouts[group] = float(seconds)


def group_timeout(group: dist.ProcessGroup | None = None) -> float:
    return _group_timeouts.get(get_group(group), _deadlines.DEFAULT_TIMEOUT_S)


@contextlib.contextmanager
def patience(seconds: float, group: dist.ProcessGroup | None = None):
    """Wait up to ``seconds`` (if longer than its deadline) in ``group``'s collectives run inside:
    for steps where peers do slow one-off work, such as torch.compile compiling a new shape.
    Other groups in the process keep their deadlines."""
    group = get_group(group)
    before = _group_timeouts.get(group)
    _group_timeouts[group] = max(group_timeout(group), float(seconds))
    try:
        yield
    finally:
        set_group_timeout(group, before)


def get_group(group: dist.ProcessGroup | None = None) -> dist.ProcessGroup:
    """``group``, or the default (world) group; a clear error if neither exists."""
    if group is not None:
        return group
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call tpserve.parallel.init_distributed() "
            "(or torch.distributed.init_process_group) before building or running tensor-parallel "
            "layers, launch with torchrun, or pass the layers a group of their own"
        )
    return dist.group.WORLD


def group_rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group``, asked of the group itself: ``dist.get_rank(group)``
    only knows groups made through torch's default group."""
    return get_group(group).rank()


def group_size(group: dist.ProcessGroup | None = None) -> int:
    return get_group(group).size()


def comm_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Device that tensors must live on for this group's backend (CUDA for NCCL)."""
    backend = get_group(group).name()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _eager(fn):
    """Collectives wait with a deadline, which torch.compile cannot trace: a compiled decode
    step (``LlamaForCausalLM.compile_decode``) runs them eagerly between its compiled pieces."""
    return torch.compiler.disable(fn, recursive=True)


def _wait(work: dist.Work, op: str, group: dist.ProcessGroup, timeout: float | None) -> None:
    seconds = group_timeout(group) if timeout is None else timeout
    start = time.monotonic()
    try:
        work.wait(timeout=datetime.timedelta(seconds=seconds))
    except Exception as exc:  # gloo raises RuntimeError, NCCL DistBackendError
        elapsed = time.monotonic() - start
        peers = [r for r in range(group.size()) if r != group.rank()]
        _raise_comm_error(op, group, "timed out" if elapsed >= seconds * 0.95 else "failed", elapsed, seconds,
                          peers, str(exc), exc)


def _raise_comm_error(op: str, group, what: str, elapsed: float, seconds: float, peers: list[int], detail: str,
                      cause: BaseException | None = None):
    raise CommError(
        f"{op} on rank {group.rank()} {what} after {elapsed:.1f}s (limit {seconds:g}s) waiting for rank(s) {peers}: "
        f"a peer process exited, crashed or hung. Check the other ranks' logs; raise "
        f"TPSERVE_COMM_TIMEOUT if they are just slow. ({detail})"
    ) from cause


def _fast(group: dist.ProcessGroup, tensor: torch.Tensor, reduce: bool = False):
    """The group's shared-memory path when it can take ``tensor`` (the same answer on every rank)."""
    fast = _shm.of(group)
    if fast is None or not tensor.is_cpu or (reduce and not fast.takes(tensor)):
        return None
    if fast.spans_hosts and not reduce:  # only all-reduce knows how to cross hosts; the rest use gloo
        return None
    return fast


def _run_fast(op: str, group: dist.ProcessGroup, timeout: float | None, fn, *args) -> None:
    seconds = group_timeout(group) if timeout is None else timeout
    start = time.monotonic()
    try:
        fn(*args, seconds)
    except _shm.ShmError as exc:
        what = "timed out" if exc.kind == "timed out" else "failed"
        peers = [exc.peer] if exc.peer >= 0 else [r for r in range(group.size()) if r != group.rank()]
        _raise_comm_error(op, group, what, time.monotonic() - start, seconds, peers,
                          f"shared memory: {exc}", None)


@_eager
def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None = None, timeout: float | None = None) -> torch.Tensor:
    """Sum ``tensor`` over the group, in place; returns it."""
    group = get_group(group)
    if group.size() == 1:
        return tensor
    fast = _fast(group, tensor, reduce=True)
    if fast is not None:
        x = tensor.contiguous()
        _run_fast("all_reduce_sum", group, timeout, fast.all_reduce, x)
        if fast.spans_hosts:  # this host's sum; then the hosts' sums meet over gloo and spread on each host
            if fast.cross is not None:
                seconds = group_timeout(group) if timeout is None else timeout
                _wait(dist.all_reduce(x, group=fast.cross, async_op=True), "all_reduce_sum(hosts)", group, seconds)
            _run_fast("all_reduce_sum", group, timeout, fast.broadcast, x, 0)
        if x.data_ptr() != tensor.data_ptr():
            tensor.copy_(x)
        return tensor
    _wait(dist.all_reduce(tensor, group=group, async_op=True), "all_reduce_sum", group, timeout)
    return tensor


def summer(group: dist.ProcessGroup | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that does ``all_reduce_sum(t, group)`` for eager callers, with what that asks
    on every call (the group's path, its deadline, torch.compile's eager wrapper: ~15 us, ~0.9 ms
    of a ~17 ms bf16 step of the default model at TP = 2) asked once, here. For a decode loop
    that sums twice a layer; ask again each step, since ``patience`` can change the deadline."""
    group = get_group(group)
    fast = _shm.of(group)
    if group.size() == 1 or fast is None or fast.spans_hosts:
        return lambda t: all_reduce_sum(t, group)
    seconds, run = group_timeout(group), fast.all_reduce

    def total(t: torch.Tensor) -> torch.Tensor:
        if not (t.is_contiguous() and fast.takes(t)):
            return all_reduce_sum(t, group)
        _run_fast("all_reduce_sum", group, seconds, run, t)
        return t
    return total


@_eager
def all_gather(tensor: torch.Tensor, dim: int = -1, group: dist.ProcessGroup | None = None,
               sizes: list[int] | None = None, timeout: float | None = None) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along ``dim``.

    Pieces may differ in size along ``dim`` (uneven partitions): pass ``sizes`` when they are
    known, otherwise one extra small collective finds them. Uses a padded list all_gather,
    which gloo supports, instead of all_gather_into_tensor, which it does not.
    """
    group = get_group(group)
    world = group.size()
    if world == 1:
        return tensor
    dim = dim % tensor.dim()
    fast = _fast(group, tensor)
    if sizes is None:
        mine = torch.tensor([tensor.shape[dim]], dtype=torch.int64, device=tensor.device)
        if fast is not None:
            parts = torch.empty(world, dtype=torch.int64)
            _run_fast("all_gather(sizes)", group, timeout, fast.gather_bytes, mine, [8] * world, parts, -1)
            sizes = parts.tolist()
        else:
            parts = [torch.empty_like(mine) for _ in range(world)]
            _wait(dist.all_gather(parts, mine, group=group, async_op=True), "all_gather(sizes)", group, timeout)
            sizes = [int(p.item()) for p in parts]
    if len(sizes) != world or sizes[group.rank()] != tensor.shape[dim]:
        raise ValueError(f"all_gather: sizes {sizes} do not match this rank's piece of size {tensor.shape[dim]} along dim {dim}")
    if fast is not None:
        return _gather_fast(fast, "all_gather", tensor, dim, sizes, -1, group, timeout)
    biggest = max(sizes)
    x = tensor.contiguous()
    if x.shape[dim] < biggest:
        pad_shape = list(x.shape)
        pad_shape[dim] = biggest - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    out = [torch.empty_like(x) for _ in range(world)]
    _wait(dist.all_gather(out, x, group=group, async_op=True), "all_gather", group, timeout)
    return torch.cat([o.narrow(dim, 0, n) for o, n in zip(out, sizes)], dim=dim)


def _gather_fast(fast, op: str, tensor: torch.Tensor, dim: int, sizes: list[int], dst: int, group,
                 timeout: float | None) -> torch.Tensor | None:
    """Pieces of different sizes along ``dim`` through shared memory: each rank's bytes in rank
    order, then (for an inner ``dim``) one cat; ``dst`` >= 0: that rank only, others get None."""
    x = tensor.detach().contiguous()
    outer = math.prod(x.shape[:dim])
    inner = math.prod(x.shape[dim + 1:])
    nbytes = [outer * n * inner * x.element_size() for n in sizes]
    copies = dst < 0 or dst == group.rank()
    flat = torch.empty(sum(nbytes) // x.element_size(), dtype=x.dtype) if copies else None
    _run_fast(op, group, timeout, fast.gather_bytes, x, nbytes, flat, dst)
    if not copies:
        return None
    shape = list(x.shape)
    shape[dim] = sum(sizes)
    if outer == 1:
        return flat.view(shape)
    pieces = flat.split([outer * n * inner for n in sizes])
    return torch.cat([p.view(outer, n, inner) for p, n in zip(pieces, sizes)], dim=1).view(shape)


def broadcast_tensor(tensor: torch.Tensor, src: int = 0, group: dist.ProcessGroup | None = None,
                     timeout: float | None = None) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with group-rank ``src``'s; returns it."""
    group = get_group(group)
    if group.size() == 1:
        return tensor
    fast = _fast(group, tensor)
    if fast is not None:
        x = tensor.contiguous()
        _run_fast("broadcast_tensor", group, timeout, fast.broadcast, x, src)
        if x.data_ptr() != tensor.data_ptr():
            tensor.copy_(x)
        return tensor
    _wait(dist.broadcast(tensor, group=group, group_src=src, async_op=True), "broadcast_tensor", group, timeout)
    return tensor


def broadcast_object(obj: object = None, src: int = 0, group: dist.ProcessGroup | None = None,
                     timeout: float | None = None) -> object:
    """Send a picklable object from group-rank ``src`` to all; every rank returns it."""
    group = get_group(group)
    if group.size() == 1:
        return obj
    device = comm_device(group)
    is_src = group.rank() == src
    payload = pickle.dumps(obj) if is_src else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    broadcast_tensor(size, src, group, timeout)
    if is_src:
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    else:
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    broadcast_tensor(buf, src, group, timeout)
    return obj if is_src else pickle.loads(buf.cpu().numpy().tobytes())


def all_gather_object(obj: object, group: dist.ProcessGroup | None = None, timeout: float | None = None) -> list:
    """Every rank's picklable ``obj``, in group-rank order, on every rank."""
    group = get_group(group)
    if group.size() == 1:
        return [obj]
    device = comm_device(group)
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
    world = group.size()
    sizes = all_gather(torch.tensor([payload.numel()], device=device), 0, group, [1] * world, timeout).tolist()
    parts = all_gather(payload, 0, group, sizes, timeout)
    out, at = [], 0
    for n in sizes:
        out.append(pickle.loads(parts[at:at + n].cpu().numpy().tobytes()))
        at += n
    return out


@_eager
def gather_to_rank0(x: torch.Tensor, sizes: list[int], group: dist.ProcessGroup | None = None,
                    timeout: float | None = None) -> torch.Tensor | None:
    """Concatenate the last-dim pieces on group-rank 0 only (inference; no autograd)."""
    group = get_group(group)
    world = group.size()
    if world == 1:
        return x
    fast = _fast(group, x)
    if fast is not None:
        return _gather_fast(fast, "gather_to_rank0", x, x.dim() - 1, sizes, 0, group, timeout)
    biggest = max(sizes)
    x = x.detach()
    if x.shape[-1] < biggest:
        x = torch.cat([x, x.new_zeros(*x.shape[:-1], biggest - x.shape[-1])], dim=-1)
    x = x.contiguous()
    rank = group.rank()
    out = [torch.empty_like(x) for _ in range(world)] if rank == 0 else None
    _wait(dist.gather(x, out, group=group, group_dst=0, async_op=True), "gather_to_rank0", group, timeout)
    if rank != 0:
        return None
    return torch.cat([o[..., :n] for o, n in zip(out, sizes)], dim=-1)


def barrier(group: dist.ProcessGroup | None = None, timeout: float | None = None) -> None:
    """Wait until every rank of the group arrives (a tiny all-reduce, so it honours the deadline)."""
    group = get_group(group)
    if group.size() > 1:
        all_reduce_sum(torch.zeros(1, device=comm_device(group)), group, timeout)
