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


# what a quantized checkpoint's config.json says (transformers' key, a method of tpserve's own)
INT8_CONFIG = {"quant_method": "tpserve-int8", "bits": 8, "symmetric": True, "scales": "one per output row"}


def checkpoint_quantization(config) -> str | None:
    """"int8" when ``config`` (a config object or dict) describes tpserve int8 weights, else None."""
    q = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    if method is None:
        return None
    if method != INT8_CONFIG["quant_method"]:
        raise ValueError(f"quantization_config.quant_method={method!r} is not supported (tpserve reads "
                         f"{INT8_CONFIG['quant_method']!r} checkpoints, which it writes itself)")
    return "int8"


def _linears(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]


def _set_int8(mod: nn.Module, q: torch.Tensor, scale: torch.Tensor) -> None:
    mod.weight = nn.Parameter(q, requires_grad=False)
    mod.weight_scale = nn.Parameter(scale, requires_grad=False)  # saved, loaded and resharded like the weight
    for p in (mod.weight, mod.weight_scale):
        p.weight_loader = mod.weight_loader


def prepare_int8(model: nn.Module) -> None:
    """Give every linear layer empty int8 weights and scales, to load a quantized checkpoint into."""
    for mod in _linears(model):
        if mod.weight.dtype != torch.int8:
            w = mod.weight
            _set_int8(mod, torch.empty(w.shape, dtype=torch.int8, device=w.device),
                      torch.empty(w.shape[0], dtype=torch.float32, device=w.device))


def quantize_int8(model: nn.Module) -> int:
    """Turn every column- and row-parallel linear weight into int8 with one scale per output
    row, in place; returns how many. Every rank of the model's group must call it.

    A row's scale comes from the largest |w| of the *whole* row: a row-parallel layer's ranks
    hold pieces of each row, so they agree on its maximum first. The int8 weights are then the
    same at every TP degree. Embeddings and the LM head keep the model's dtype (the head is
    the one product whose errors reach the logits directly)."""
    count = 0
    with torch.no_grad():
        for mod in _linears(model):
            if mod.weight_scale is not None:
                continue
            amax = matvec.row_absmax(mod.weight)
            if isinstance(mod, RowParallelLinear) and mod.tp_size > 1:
                amax = comm.all_gather(amax[None], dim=0, group=mod.group, sizes=[1] * mod.tp_size).amax(0)
            _set_int8(mod, *matvec.quantize_rows(mod.weight, amax))
            count += 1
    return count
