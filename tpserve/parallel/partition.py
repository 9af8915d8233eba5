"""The one partition rule of tpserve.

Every split in the project — linear layers, vocabularies, attention heads, MLP widths,
checkpoint shards — goes through these functions, so a tensor saved at one TP degree and
loaded at another is cut the same way everywhere.

Rule: ``total`` is cut into ``parts`` contiguous pieces of whole ``unit``\\ s (1 for plain
dimensions, ``head_dim`` for attention), as evenly as possible; pieces differ by at most one
unit and the larger pieces come first (rank 0 gets the extra unit).
"""

from __future__ import annotations


class PartitionError(ValueError):
    """A dimension cannot be split the way the caller asked."""


def partition_sizes(total: int, parts: int, unit: int = 1, what: str = "dimension") -> list[int]:
    """Sizes of the ``parts`` pieces of ``total`` (each a multiple of ``unit``)."""
    if parts < 1:
        raise PartitionError(f"cannot split {what} into {parts} parts: the TP degree must be >= 1")
    if unit < 1 or total % unit:
        raise PartitionError(f"{what} of size {total} is not a whole number of units of {unit}")
    units = total // unit
    if parts > units:
        noun = "heads" if unit > 1 else "elements"
        raise PartitionError(
            f"cannot split {what} ({units} {noun}) over TP={parts}: every rank needs at least one; "
            f"use a TP degree <= {units}"
        )
    base, extra = divmod(units, parts)
    return [(base + (1 if r < extra else 0)) * unit for r in range(parts)]


def partition_range(total: int, parts: int, rank: int, unit: int = 1, what: str = "dimension") -> tuple[int, int]:
    """``(start, end)`` of ``rank``'s piece of ``total``."""
    sizes = partition_sizes(total, parts, unit, what)
    if not 0 <= rank < parts:
        raise PartitionError(f"rank {rank} is outside a TP group of size {parts}")
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def head_ranges(num_heads: int, num_kv_heads: int, parts: int, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Query-head and KV-head ranges ``((q0, q1), (kv0, kv1))`` held by ``rank``.

    Query heads split by the rule above; a rank then holds exactly the KV heads its query heads
    attend with. When TP exceeds the KV-head count, or the counts do not divide, neighbouring
    ranks hold copies of the same KV head (replication) instead of failing.
    """
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise PartitionError(
            f"num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}"
        )
    q0, q1 = partition_range(num_heads, parts, rank, what="attention heads")
    group = num_heads // num_kv_heads
    return (q0, q1), (q0 // group, (q1 - 1) // group + 1)


def slice_shape(full: tuple[int, ...] | list[int], dim: int | None, start: int, end: int) -> tuple[int, ...]:
    """The shape of ``[start:end]`` along ``dim`` of a tensor of shape ``full`` (all of it when
    ``dim`` is None): a rank's shard of a full tensor."""
    shape = list(full)
    if dim is not None:
        shape[dim] = end - start
    return tuple(shape)
