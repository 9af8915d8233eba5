"""int8 weight-only quantization of a built, loaded model's parallel linear layers."""

from __future__ import annotations

import torch
from torch import nn

from . import comm, matvec
from .layers import ColumnParallelLinear, RowParallelLinear

QUANTIZATIONS = ("int8",)  # what LLM(quantization=...) / --quantization accept


def check_quantization(quantization: str | None) -> str | None:
    """``quantization`` if tpserve knows it (None / "none": full precision), else a ValueError."""
    if quantization in (None, "none"):
        return None
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is not supported; use one of {', '.join(QUANTIZATIONS)} "
                         f"or leave it unset for full precision")
    return quantization


def quantize_int8(model: nn.Module) -> int:
    """Turn every column- and row-parallel linear weight into int8 with one scale per output
    row, in place; returns how many. Every rank of the model's group must call it.

    A row's scale comes from the largest |w| of the *whole* row: a row-parallel layer's ranks
    hold pieces of each row, so they agree on its maximum first. The int8 weights are then the
    same at every TP degree. Embeddings and the LM head keep the model's dtype (the head is
    the one product whose errors reach the logits directly)."""
    count = 0
    with torch.no_grad():
        for mod in model.modules():
            if not isinstance(mod, (ColumnParallelLinear, RowParallelLinear)) or mod.weight_scale is not None:
                continue
            amax = matvec.row_absmax(mod.weight)
            if isinstance(mod, RowParallelLinear) and mod.tp_size > 1:
                amax = comm.all_gather(amax[None], dim=0, group=mod.group, sizes=[1] * mod.tp_size).amax(0)
            q, scale = matvec.quantize_rows(mod.weight, amax)
            mod.weight = nn.Parameter(q, requires_grad=False)
            mod.weight_scale = scale
            count += 1
    return count
