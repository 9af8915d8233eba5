"""Preallocated per-rank KV cache: one K and one V tensor per layer, [batch, local KV heads, seq, head_dim]."""

from __future__ import annotations

import torch
from torch import nn


def allocate_kv_cache(model: nn.Module, batch: int, max_seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Room for ``batch`` rows of ``max_seq`` cache columns, holding only this rank's KV heads.

    Columns are not positions: a left-padded batch may need more columns than the context
    while every row's positions stay inside it (callers check positions)."""
    weight = model.model.layers[0].self_attn.k_proj.weight
    out = []
    for layer in model.model.layers:
        attn = layer.self_attn
        shape = (batch, attn.num_local_kv, max_seq, attn.head_dim)
        out.append((torch.zeros(shape, dtype=weight.dtype, device=weight.device),
                    torch.zeros(shape, dtype=weight.dtype, device=weight.device)))
    return out
