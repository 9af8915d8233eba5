"""How a model's tensors are cut at a TP degree, asked of the layers themselves.

``param_shards`` reads one live rank's model; ``layout`` builds the model on the meta device
once per rank under torch's in-process "fake" backend, so any TP degree can be described
(``tpserve inspect``, checkpoint conversion) without starting a process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
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
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from .registry import model_class

    if dist.is_initialized():
        raise RuntimeError("layout() needs a process without an initialised process group")
    cls = model_class(config)
    ranks = []
    for rank in range(tp):
        dist.init_process_group("fake", rank=rank, world_size=tp, store=FakeStore())
        try:
            with torch.device("meta"):
                ranks.append(param_shards(cls(config)))
        finally:
            dist.destroy_process_group()
    return ranks
