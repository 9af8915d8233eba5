"""How a model's tensors are cut at a TP degree, asked of the layers themselves.

``parallel.shards.param_shards`` reads one live rank's model; ``layout`` builds the model on the meta device
once per rank with a fake group of its own, so any TP degree can be described (``tpserve
inspect``, checkpoint conversion) without starting a process, inside a process group or not.
"""

from __future__ import annotations

import torch

from tpserve.parallel.quantize import checkpoint_quantization, prepare, q8_embedding
from tpserve.parallel.shards import Shard, param_shards

from .registry import model_class


def layout(config, tp: int) -> list[dict[str, Shard]]:
    """``param_shards`` of every rank at TP degree ``tp``, computed in this process."""
    from torch._C._distributed_c10d import FakeProcessGroup

    cls = model_class(config)
    quantized = checkpoint_quantization(config)
    ranks = []
    for rank in range(tp):
        with torch.device("meta"):  # the layers only ask the group for its rank and size
            model = cls(config, group=FakeProcessGroup._create_internal(rank, tp))
            if quantized:
                prepare(model, quantized, q8_embedding(config))
                model.tie_weights()
            ranks.append(param_shards(model))
    return ranks
