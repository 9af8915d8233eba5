"""Weight-only quantization of a built model's parallel layers: int8 linear weights with one scale
per output row; 4-bit ones in groups of 32 (GGUF's Q4_0 / Q4_1 blocks, kept as the file holds
them); and an input embedding (with the head tied to it) in int8 groups of 32 (GGUF's Q8_0)."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import comm, matvec
from .layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding

QUANTIZATIONS = ("int8", "q4")  # what LLM(quantization=...) / --quantization accept


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
Q4_CONFIG = {"quant_method": "tpserve-q4", "bits": 4, "group_size": matvec.Q4_GROUP,
             "layout": "GGUF Q4 blocks: w = q * scale + min; float16 scale and min per row and group"}
CONFIGS = {"int8": INT8_CONFIG, "q4": Q4_CONFIG}
Q8_EMBEDDING = "q8_0"  # quantization_config["embedding"]: the embedding (and a tied head) in GGUF's Q8_0 groups


def _config_dict(config) -> dict:
    q = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    return q if isinstance(q, dict) else (q.to_dict() if hasattr(q, "to_dict") else {})


def q8_embedding(config) -> bool:
    """Whether the checkpoint holds its input embedding as int8 groups of 32 (GGUF's Q8_0)."""
    return _config_dict(config).get("embedding") == Q8_EMBEDDING


def quantization_config(model: nn.Module) -> dict | None:
    """What a saved checkpoint of ``model`` must say about its quantized tensors, read off the model."""
    q = getattr(model, "quantization", None)
    if q not in CONFIGS:
        return None
    out = dict(CONFIGS[q])
    if any(type(m) is VocabParallelEmbedding and m.weight_scale is not None for m in model.modules()):
        out["embedding"] = Q8_EMBEDDING
    return out


def checkpoint_quantization(config) -> str | None:
    """"int8" / "q4" when ``config`` (a config object or dict) describes tpserve's quantized weights, else None."""
    q = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    if method is None:
        return None
    for name, known in CONFIGS.items():
        if method == known["quant_method"]:
            return name
    raise ValueError(f"quantization_config.quant_method={method!r} is not supported (tpserve reads "
                     f"{', '.join(repr(c['quant_method']) for c in CONFIGS.values())} checkpoints, which it writes itself)")


def parameter_count(shapes: dict[str, tuple[int, ...]]) -> int:
    """How many weights a checkpoint's tensors (name -> shape) hold, as the model counts them: a
    quantized weight's ``weight_scale`` / ``weight_min`` are not weights of their own, and a 4-bit
    weight (the one with a ``weight_min``) packs two values a byte."""
    total = 0
    for name, shape in shapes.items():
        if name.endswith((".weight_scale", ".weight_min")):
            continue
        n = math.prod(shape)
        total += 2 * n if name.endswith(".weight") and name + "_min" in shapes else n
    return total


def _linears(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]


def _set_int8(mod: nn.Module, q: torch.Tensor, scale: torch.Tensor) -> None:
    mod.weight = nn.Parameter(q, requires_grad=False)
    mod.weight_scale = nn.Parameter(scale, requires_grad=False)  # saved, loaded and resharded like the weight
    for p in (mod.weight, mod.weight_scale):
        p.weight_loader = mod.weight_loader


def _set_q4(mod: nn.Module, qweight: torch.Tensor, scale: torch.Tensor, minv: torch.Tensor) -> None:
    mod.weight = nn.Parameter(qweight, requires_grad=False)
    mod.weight_scale = nn.Parameter(scale, requires_grad=False)
    mod.weight_min = nn.Parameter(minv, requires_grad=False)
    for p in (mod.weight, mod.weight_scale, mod.weight_min):
        p.weight_loader = mod.weight_loader


def _check_q4(mod: nn.Module) -> None:
    """4-bit groups run along each row's inputs: this rank's inputs must be whole groups."""
    start, end = (mod.in_start, mod.in_end) if isinstance(mod, RowParallelLinear) else (0, mod.in_features)
    if start % matvec.Q4_GROUP or end % matvec.Q4_GROUP:
        raise ValueError(f"{type(mod).__name__}({mod.in_features}, {mod.out_features}) cannot hold 4-bit weights "
                         f"at TP={mod.tp_size}: rank {mod.tp_rank}'s inputs {start}:{end} are not whole groups of "
                         f"{matvec.Q4_GROUP}; choose another TP degree or a dense dtype (--dtype float32 / bfloat16)")


def prepare(model: nn.Module, quantization: str, embedding_q8: bool = False) -> None:
    """Give every linear layer empty quantized weights (and scales, mins), to load a checkpoint
    saved so; ``embedding_q8``: the input embedding too, as int8 groups (tie the head again after)."""
    if embedding_q8:
        for mod in model.modules():
            if type(mod) is VocabParallelEmbedding and mod.weight_scale is None:
                w = mod.weight
                if w.shape[1] % matvec.Q4_GROUP:
                    raise ValueError(f"an int8-group embedding needs a width that is a multiple of {matvec.Q4_GROUP}")
                mod.out_dtype = w.dtype
                mod.weight = nn.Parameter(torch.empty(w.shape, dtype=torch.int8, device=w.device), requires_grad=False)
                mod.weight_scale = nn.Parameter(torch.empty(w.shape[0], w.shape[1] // matvec.Q4_GROUP,
                                                            dtype=torch.float16, device=w.device), requires_grad=False)
                for p in (mod.weight, mod.weight_scale):
                    p.weight_loader = mod.weight_loader
    for mod in _linears(model):
        w = mod.weight
        if quantization == "int8" and w.dtype != torch.int8:
            _set_int8(mod, torch.empty(w.shape, dtype=torch.int8, device=w.device),
                      torch.empty(w.shape[0], dtype=torch.float32, device=w.device))
        elif quantization == "q4" and w.dtype != torch.uint8:
            _check_q4(mod)
            rows, cols = w.shape
            groups = cols // matvec.Q4_GROUP
            _set_q4(mod, torch.empty(rows, cols // 2, dtype=torch.uint8, device=w.device),
                    torch.empty(rows, groups, dtype=torch.float16, device=w.device),
                    torch.empty(rows, groups, dtype=torch.float16, device=w.device))


def quantize_q4(model: nn.Module) -> int:
    """Turn every column- and row-parallel linear weight into 4-bit groups of 32 (Q4_1's
    min-and-scale), in place; returns how many. Groups run along rows and ranks hold whole
    groups, so each rank quantizes alone and the result is the same at every TP degree."""
    count = 0
    with torch.no_grad():
        for mod in _linears(model):
            if mod.weight_scale is None:
                _check_q4(mod)
                _set_q4(mod, *matvec.quantize_q4(mod.weight))
                count += 1
    return count


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


def quantize_head_int8(model: nn.Module, float_heads: bool = True) -> int:
    """Give LM heads an int8 copy (one scale per vocabulary row, over the whole row, so the same at
    every TP degree) that their forward multiplies with, by ``int8_linear`` from float
    activations; returns how many. ``float_heads``: float heads too (``quantization="int8"``);
    heads in GGUF's Q8_0 groups (a GGUF embedding kept as the file holds it) always get one.

    At int8 the head is the largest weight a decoded token reads (a third of the default model's
    bytes in bf16). A Q8_0 head's own kernel quantizes the activations to int8 as llama.cpp does,
    which on the default model turned the greedy answer to "What is the capital of France?" into
    "L'Étoile, la Marseillaise, ..." where fp32 says Paris; from float activations it says Paris.
    The copy lives beside the weight and is never saved: checkpoints keep the head, or the
    embedding it is tied to, as it was, and loading makes the copy again."""
    count = 0
    with torch.no_grad():
        for mod in model.modules():
            if not isinstance(mod, ParallelLMHead):
                continue
            if mod.weight_scale is not None and mod.weight_scale.dim() == 2:  # Q8_0 groups
                weight = matvec.dequantize_q8(mod.weight, mod.weight_scale)
            elif float_heads and mod.weight_scale is None and mod.weight.is_floating_point():
                weight = mod.weight
            else:
                continue
            q, scale = matvec.quantize_rows(weight)
            mod.int8_weight, mod.int8_scale = q.contiguous(), scale
            count += 1
    return count
