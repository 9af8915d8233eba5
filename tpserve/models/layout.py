"""How a model's tensors are cut at a TP degree, asked of the layers themselves.

``param_shards`` reads one live rank's model; ``layout`` builds the model on the meta device
once per rank with a fake group of its own, so any TP degree can be described (``tpserve
inspect``, checkpoint conversion) without starting a process, inside a process group or not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tpserve.parallel.layers import _TPModule


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


def layout(config, tp: int) -> list[dict[str, Shard]]:
    """``param_shards`` of every rank at TP degree ``tp``, computed in this process."""
    from torch._C._distributed_c10d import FakeProcessGroup

    from .registry import model_class

    cls = model_class(config)
    ranks = []
    for rank in range(tp):
        with torch.device("meta"):  # the layers only ask the group for its rank and size
            ranks.append(param_shards(cls(config, group=FakeProcessGroup._create_internal(rank, tp))))
    return ranks
