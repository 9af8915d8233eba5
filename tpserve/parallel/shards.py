"""Which slice of each full tensor a rank holds, asked of the layers that make the cuts."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .layers import _TPModule


@dataclass(frozen=True)
class Shard:
    dim: int | None  # None: the whole tensor (replicated)
    start: int
    end: int
    full_shape: tuple[int, ...]


def param_shards(model: nn.Module) -> dict[str, Shard]:
    """For each parameter (tied ones once): the slice of the full tensor this rank holds."""
    out = {}
    for name, param in model.named_parameters():
        owner = model.get_submodule(name.rpartition(".")[0])
        shape = tuple(param.shape)
        if isinstance(owner, _TPModule):
            dim, start, end, full = owner.shard_of(param)
            if dim is not None:
                shape = shape[:dim] + (full,) + shape[dim + 1:]
            out[name] = Shard(dim, start, end, shape)
        else:
            out[name] = Shard(None, 0, shape[0] if shape else 1, shape)
    return out
