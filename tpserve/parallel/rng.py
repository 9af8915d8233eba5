"""Random numbers inside tensor-parallel regions (Megatron's RNG tracker idea).

Dropout on a replicated activation (the residual stream) must draw the same mask on every rank,
or the replicas drift apart; dropout on a sharded activation (attention probabilities of this
rank's heads, an MLP's hidden slice) must draw a different one on every rank, or every shard
repeats the same pattern. So each rank keeps two streams: torch's default generator, seeded
alike on every rank, and a sharded stream seeded with ``seed + SHARDED_OFFSET + rank``;
:func:`sharded_region` swaps the default generator's state for the sharded stream's while it is
open. Drawing in a sharded region never advances the replicated stream, so the replicated one
stays in step on every rank however differently sized the shards are.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.distributed as dist

from . import comm

SHARDED_OFFSET = 2718  # Megatron's offset between the two streams' seeds


class _Streams(threading.local):
    def __init__(self) -> None:
        self.sharded: dict[str, torch.Tensor] | None = None  # the sharded stream's saved states
        self.outside: dict[str, torch.Tensor] | None = None  # the replicated stream's, while inside
        self.depth = 0
        self.hooked = False  # a sharded region opened by mark_regions' hooks


_streams = _Streams()


def _states() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _restore(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])


def _seeded(seed: int) -> dict[str, torch.Tensor]:
    saved = _states()
    torch.manual_seed(seed)
    fresh = _states()
    _restore(saved)
    return fresh


def manual_seed(seed: int, group: dist.ProcessGroup | None = None) -> None:
    """Seed both streams: the replicated one (``torch.manual_seed(seed)``, the same on every rank)
    and this rank's sharded one. Call it on every rank with the same ``seed``."""
    if _streams.depth:
        raise RuntimeError("manual_seed inside a sharded_region(); call it outside")
    rank = comm.group_rank(comm.get_group(group)) if dist.is_initialized() else 0
    torch.manual_seed(seed)
    _streams.sharded = _seeded(seed + SHARDED_OFFSET + rank)


def enter_sharded(group: dist.ProcessGroup | None = None) -> None:
    """Switch the default generator to this rank's sharded stream (nested calls count)."""
    if _streams.depth == 0:
        if _streams.sharded is None:  # never seeded: derive it from the replicated stream's seed
            rank = comm.group_rank(comm.get_group(group)) if dist.is_initialized() else 0
            _streams.sharded = _seeded(torch.initial_seed() + SHARDED_OFFSET + rank)
        _streams.outside = _states()
        _restore(_streams.sharded)
    _streams.depth += 1


def leave_sharded() -> None:
    """Back to the replicated stream, keeping where the sharded one got to."""
    if _streams.depth == 0:
        return
    _streams.depth -= 1
    if _streams.depth == 0:
        _streams.sharded = _states()
        _restore(_streams.outside)
        _streams.outside = None


def in_sharded_region() -> bool:
    return _streams.depth > 0


@contextlib.contextmanager
def sharded_region(group: dist.ProcessGroup | None = None):
    """Random draws inside come from this rank's own stream (dropout on sharded activations)."""
    enter_sharded(group)
    try:
        yield
    finally:
        leave_sharded()


def mark_regions(parent: torch.nn.Module, opens: list[torch.nn.Module], closes: list[torch.nn.Module],
                 group: dist.ProcessGroup | None = None) -> None:
    """Hooks that make ``parent``'s forward, in training mode, draw from the sharded stream from
    the end of the first of ``opens`` (column-parallel layers, whose outputs are sharded) to the
    start of the next of ``closes`` (row-parallel layers, whose outputs are replicated again).
    ``parallelize`` calls it for each module holding both kinds: attention blocks, MLPs."""

    def open_(module, args, output):
        if module.training and not _streams.hooked:
            enter_sharded(group)
            _streams.hooked = True

    def close(module, *_):
        if _streams.hooked:
            _streams.hooked = False
            leave_sharded()

    for m in opens:
        m.register_forward_hook(open_)
    for m in closes:
        m.register_forward_pre_hook(close)
    parent.register_forward_hook(close, always_call=True)  # also when the forward raised
