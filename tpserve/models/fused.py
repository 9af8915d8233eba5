"""A decoder layer's small steps fused into one call each (``csrc/fused.cpp``) for eager steps on
CPU, where every torch op costs a dispatch (a decode step of the default model made ~20 a layer
around its four products): RMSNorm, the residual add with the next RMSNorm, rope, rope with the
K/V cache write, and SiLU-and-multiply. Torch ops run inside ``torch.compile`` (inductor fuses them
itself), on CUDA, for autograd, and without a compiler; ``TPSERVE_NORM_KERNEL=0`` turns the fused
versions off."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from tpserve.utils.native import NATIVE_FLAGS, optional_extension

_ext = None


def extension():
    global _ext
    if _ext is None and os.environ.get("TPSERVE_NORM_KERNEL", "1") != "0":
        _ext = optional_extension(Path(__file__).with_name("csrc") / "fused.cpp", "tpserve_fused",
                                  ("-O3", "-fopenmp", "-fno-math-errno", *NATIVE_FLAGS),
                                  "the fused norm, rope and SiLU steps", "they run as torch ops")
    return _ext


def fits(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the fused call takes these tensors (eager, CPU, contiguous, one dtype, no autograd).
    A decode step asks ~4 times a layer, so the cheap checks come first and no generator is built."""
    if _ext is None or not x.is_cpu or not x.is_contiguous() or torch.compiler.is_compiling():
        return False
    dtype = x.dtype
    for o in others:
        if o.dtype != dtype or not o.is_contiguous():
            return False
    if torch.is_grad_enabled():
        return not (x.requires_grad or any(o.requires_grad for o in others))
    return True


def kernels_for(*tensors: torch.Tensor):
    """The kernels' module where it takes these tensors (see :func:`fits`), else None: for a caller
    that asks once and then calls the kernels on many tensors of the same kind (a decode step's
    layers), skipping the per-call checks."""
    return _ext if tensors and fits(*tensors) else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: normalise in float32, round to x's dtype, times the weight."""
    if fits(x, weight):
        return _ext.rms_norm(x, weight, eps)
    if x.dtype == torch.float32 and weight.dtype == torch.float32:  # one fused op, same math
        return F.rms_norm(x, weight.shape, weight, eps)
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + h, rms_norm(x + h))``: a sub-layer's output added to the residual stream, and the
    next sub-layer's input. ``h`` may be float32 with a lower-precision x (a row-parallel sum):
    it is rounded to x's dtype first, as ``finish_rows`` would."""
    if h.dtype in (x.dtype, torch.float32) and h.shape == x.shape and fits(x, weight) and fits(h):
        return _ext.add_rms_norm(x, h, weight, eps)
    x = x + h.to(x.dtype)
    return x, rms_norm(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotate-half rope, x*cos + rotate_half(x)*sin, with rotate_half's sign
    folded into ``signed_sin`` so the rotation is a single roll (fewer ops per decode step)."""
    if x.dim() == 3 and fits(x, cos, signed_sin):
        return _ext.rope(x, cos, signed_sin)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def rope_store(qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, slots: torch.Tensor,
               cache: tuple[torch.Tensor, torch.Tensor], heads: int, kv_heads: int) -> torch.Tensor | None:
    """From a fused q/k/v projection's output [tokens, (heads + 2 kv_heads) * head_dim]: rope on q
    and k, k and v written to the tokens' cache ``slots``; returns q [tokens, heads, head_dim].
    None where the fused call does not apply (the caller then runs the steps one by one)."""
    k_cache, v_cache = cache
    if not fits(qkv, cos, signed_sin, k_cache, v_cache) or qkv.dim() != 2:
        return None
    return _ext.rope_store(qkv, cos, signed_sin, slots, k_cache, v_cache, heads, kv_heads)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` from a fused gate/up projection's output [rows, 2 * width]."""
    if gate_up.dim() == 2 and fits(gate_up):
        return _ext.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
