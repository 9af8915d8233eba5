"""Preallocated per-rank KV cache: one K and one V tensor per layer, [batch, local KV heads, seq, head_dim]."""

from __future__ import annotations

import torch
from torch import nn


def allocate_kv_cache(model: nn.Module, batch: int, max_seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Room for ``batch`` sequences of ``max_seq`` tokens, holding only this rank's KV heads."""
    spec = model.spec
    if max_seq > spec.max_position_embeddings:
        raise ValueError(f"{max_seq} tokens exceed the model's context of {spec.max_position_embeddings}; "
                         f"shorten the prompt or lower max_tokens")
    weight = model.model.layers[0].self_attn.k_proj.weight
    out = []
    for layer in model.model.layers:
        attn = layer.self_attn
        shape = (batch, attn.num_local_kv, max_seq, attn.head_dim)
        out.append((torch.zeros(shape, dtype=weight.dtype, device=weight.device),
                    torch.zeros(shape, dtype=weight.dtype, device=weight.device)))
    return out
