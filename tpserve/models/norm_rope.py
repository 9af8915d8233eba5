"""RMSNorm and rope in one call each (``csrc/norm_rope.cpp``) for eager steps on CPU, where
their torch ops cost a dispatch apiece (transformers' bf16 RMSNorm is eight); torch ops inside
``torch.compile`` (inductor fuses them itself), on CUDA, for autograd, and without a compiler.
``TPSERVE_NORM_KERNEL=0`` turns the one-call versions off."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tpserve.utils.native import NATIVE_FLAGS, optional_extension

_ext = None


def extension():
    global _ext
    if _ext is None and os.environ.get("TPSERVE_NORM_KERNEL", "1") != "0":
        _ext = optional_extension(Path(__file__).with_name("csrc") / "norm_rope.cpp", "tpserve_norm_rope",
                                  ("-O3", "-fopenmp", *NATIVE_FLAGS), "the one-pass RMSNorm and rope",
                                  "they run as torch ops")
    return _ext


def _fits(x: torch.Tensor, *others: torch.Tensor) -> bool:
    return (_ext is not None and x.device.type == "cpu" and not torch.compiler.is_compiling()
            and x.is_contiguous() and all(o.dtype == x.dtype and o.is_contiguous() for o in others)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *others))))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: normalise in float32, round to x's dtype, times the weight."""
    if _fits(x, weight):
        return _ext.rms_norm(x, weight, eps)
    if x.dtype == torch.float32 and weight.dtype == torch.float32:  # one fused op, same math
        return torch.nn.functional.rms_norm(x, weight.shape, weight, eps)
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotate-half rope, x*cos + rotate_half(x)*sin, with rotate_half's sign
    folded into ``signed_sin`` so the rotation is a single roll (fewer ops per decode step)."""
    if x.dim() == 3 and _fits(x, cos, signed_sin):
        return _ext.rope(x, cos, signed_sin)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
