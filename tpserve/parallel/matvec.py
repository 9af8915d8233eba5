"""Linear products for decode on CPU with bf16 or int8 weights, and int8 quantization.

A decoded token reads every weight once, so batch-1 decode runs at the speed weights stream
from memory. Stock torch streams bf16 and int8 weights at a few rows much slower than fp32
(``benchmarks/matvec.py``); ``csrc/matvec.cpp`` streams them at close to the memory bandwidth.
It is used for up to ``BF16_KERNEL_ROWS`` / ``INT8_KERNEL_ROWS`` rows: for bf16 on CPUs with
AVX-512 (AVX512-BF16 dot products, else weights widened to float32 in registers), for int8 on
every CPU. Elsewhere, and for prefill, the stock products run: ``F.linear`` for bf16, and for
int8 ``_weight_int8pack_mm`` or a dequantized ``F.linear``. ``TPSERVE_MATVEC_KERNEL=0`` turns the
kernel off.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from tpserve.utils.native import NATIVE_FLAGS, optional_extension

# up to these many rows the kernel beat torch's products (benchmarks/matvec.py, Xeon with AMX):
BF16_KERNEL_ROWS = 8  # bf16 at 8 rows: 10.8 GB/s of weights against oneDNN's 9.9; at 16 oneDNN's AMX wins
# Without AVX512-BF16 torch's bf16 products are slow at every size (Xeon with AVX512-VNNI only,
# 16 [1536, 576] / [576, 1536] products: F.linear 13 / 70 / 263 ms at 16 / 128 / 512 rows); the
# widening kernel took 4.7 / 28 / 136 ms, float32 copies of the weights 11 / 33 / 71 ms. The
# kernel's time grows with the rows (it is compute-bound there), a float32 copy's cost does not:
# prefill of the default model / the 281M Llama at TP=1, bf16, same CPU, kernel up to 96 rows
# against up to 64: 1.09x / 1.09x faster at 80 tokens with 64, a tie / 0.81x at 64 tokens with 32.
BF16_WIDE_ROWS = 64
# 4-bit and Q8_0 weights with bf16 activations, same CPU: their kernel up to these rows, where
# torch's bf16 products (and a dequantized copy) are slower still
GROUPED_BF16_ROWS = 128
# int8 beyond these rows: one dequantized copy and the dense product (prefill). The kernel is
# compute-bound there but dequantizing costs more: 2 threads, Xeon with AVX512-VNNI only, the
# kernel against dequantize + F.linear at 16 / 64 / 128 rows, float32 x: [5632, 1024] 1.3 / 5.7 /
# 11.7 ms against 5.8 / 8.4 / 23 ms; [1536, 576] 0.25 / 1.0 / 2.1 against 3.0 / 1.2 / 1.6; the
# default model's head [49152, 576] 7.1 / 27 / 57 against 97 / 113 / 126 (bf16 x: wider gaps)
INT8_KERNEL_ROWS = 64
# beyond, one dequantized copy and the dense product (prefill); 30 [1536, 576] products on an AMD
# EPYC (Zen 4): the kernel 1.3 / 2.9 / 5.9 / 12.0 ms at 2 / 4 / 8 / 16 rows, dequantizing 24-142 ms
Q4_KERNEL_ROWS = 32
Q4_GROUP = 32  # 4-bit weights: one scale and one min per row and group of 32 inputs, as GGUF's Q4 blocks
INT8_MAX = 127  # symmetric: -127..127, so a row's scale is its largest |w| / 127

_ext = None


def kernel_enabled() -> bool:
    return os.environ.get("TPSERVE_MATVEC_KERNEL", "1") != "0"


def extension():
    """The kernels' module, built once per machine; None (one warning) when it cannot be built."""
    global _ext
    if _ext is None and kernel_enabled():
        _ext = optional_extension(Path(__file__).with_name("csrc") / "matvec.cpp", "tpserve_matvec",
                                  ("-O3", "-fopenmp", *NATIVE_FLAGS), "the bf16/int8 decode kernel",
                                  "stock torch products run instead, slower at a few rows")
    return _ext if kernel_enabled() else None


_found: dict[str, bool] = {}  # asked once, eagerly (the engine asks at load), so compiled code reads a constant


def available() -> bool:
    """Whether the kernels are built and enabled."""
    if "kernel" not in _found:
        _found["kernel"] = extension() is not None
    return _found["kernel"]


def native_q4() -> bool:
    """Whether 4-bit products at a few rows run through the kernel's AVX512-VNNI dot products."""
    if "q4" not in _found:
        _found["q4"] = available() and bool(extension().native_q4())
    return _found["q4"]


def native_bf16() -> bool:
    """Whether bf16 products at a few rows run through the kernel's AVX512-BF16 dot products
    (bf16 computed natively, so ``dtype="auto"`` keeps a bf16 checkpoint in bf16)."""
    if "bf16" not in _found:
        _found["bf16"] = available() and bool(extension().native_bf16())
    return _found["bf16"]


def bf16_kernel() -> str | None:
    """How the kernel multiplies bf16 weights at a few rows on this CPU: "avx512bf16" (native dot
    products), "avx512f" (each weight widened to float32 in registers: half of fp32's bytes read,
    float32 arithmetic), or None: torch's products run (the compiler's plain loop was slower)."""
    if "bf16_path" not in _found:
        path = extension().bf16_path() if available() else "plain"
        _found["bf16_path"] = None if path == "plain" else path
    return _found["bf16_path"]


@torch.library.custom_op("tpserve::bf16_linear", mutates_args=())
def _bf16_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    float_out: bool) -> torch.Tensor:
    return _ext.bf16_linear(x, weight, bias, float_out)


@_bf16_linear_op.register_fake
def _(x, weight, bias, float_out):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32 if float_out else x.dtype)


@torch.library.custom_op("tpserve::int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None, float_out: bool) -> torch.Tensor:
    return _ext.int8_linear(x, weight, scale, bias, float_out)


@_int8_linear_op.register_fake
def _(x, weight, scale, bias, float_out):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32 if float_out else x.dtype)


@torch.library.custom_op("tpserve::q8_linear", mutates_args=())
def _q8_linear_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  float_out: bool) -> torch.Tensor:
    return _ext.q8_linear(x, qweight, scale, bias, float_out)


@_q8_linear_op.register_fake
def _(x, qweight, scale, bias, float_out):
    return x.new_empty(x.shape[0], qweight.shape[0], dtype=torch.float32 if float_out else x.dtype)


@torch.library.custom_op("tpserve::q4_linear", mutates_args=())
def _q4_linear_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, minv: torch.Tensor,
                  bias: torch.Tensor | None, float_out: bool) -> torch.Tensor:
    return _ext.q4_linear(x, qweight, scale, minv, bias, float_out)


@_q4_linear_op.register_fake
def _(x, qweight, scale, minv, bias, float_out):
    return x.new_empty(x.shape[0], qweight.shape[0], dtype=torch.float32 if float_out else x.dtype)


def _rows(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2 and x.stride(1) == 1:
        return x
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _out(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                float_out: bool = False) -> torch.Tensor | None:
    """The kernel's product when it applies (CPU, bf16, AVX-512, no autograd), else None: the
    caller runs the stock one. With AVX512-BF16 the kernel takes a few rows and oneDNN the rest;
    without, the kernel takes up to ``BF16_WIDE_ROWS`` rows and float32 products the rest.
    ``float_out``: float32 results (a row-parallel rank's partial sums, so the all-reduce rounds
    once, as TP=1 does). Eager calls skip the custom op's dispatch (~10 us, a tenth of a small
    layer's product); compiled code needs it."""
    path = bf16_kernel()
    if (x.dtype != torch.bfloat16 or not x.is_cpu or path is None or not weight.is_contiguous()
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return None
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows == 0:
        return None
    if rows > _bf16_rows(path):
        if path == "avx512bf16":
            return None
        y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())  # prefill
        return y if float_out else y.to(x.dtype)
    if torch.compiler.is_compiling():
        return _out(_bf16_linear_op(_rows(x), weight, bias, float_out), x)
    return _out(_ext.bf16_linear(_rows(x), weight, bias, float_out), x)


def row_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.max(-1)`` of float32 logits [rows, vocab]: each row's largest value and its first
    index (a NaN first). Greedy decoding takes one per generated token, and torch's index-tracking
    reductions run ~8x slower than a plain maximum (~110 us for 49,152 logits), so the kernel
    takes it where it is built."""
    if (x.is_cpu and x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] and x.stride(1) == 1 and available()
            and not torch.compiler.is_compiling()):
        return _ext.row_max(x)
    return x.max(-1)


def int8_kernel_takes(x: torch.Tensor) -> bool:
    """Whether :func:`int8_linear` multiplies ``x`` through the kernel (CPU, a few rows): the one
    place that says so, for callers that choose between an int8 weight and another form."""
    return x.is_cpu and 0 < x.numel() <= INT8_KERNEL_ROWS * x.shape[-1] and available()


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None, float_out: bool = False) -> torch.Tensor:
    """``x (weight * scale[:, None])^T + bias`` for an int8 ``weight`` with one scale per row
    (``float_out``: in float32 where the kernel runs, else in x's dtype)."""
    if int8_kernel_takes(x):
        op = _int8_linear_op if torch.compiler.is_compiling() else _ext.int8_linear
        return _out(op(_rows(x), weight, scale, bias, float_out), x)
    # torch's own kernel is fast with bf16 x, and with float32 x only at one row (a scalar loop:
    # [5632, 1024] at 1 / 16 rows 3.9 / 49 ms, against 16 / 5.4 ms dequantized)
    k = x.shape[-1]
    if x.is_cpu and (x.dtype is torch.bfloat16 and 0 < x.numel() <= INT8_KERNEL_ROWS * k
                     or x.dtype is torch.float32 and 0 < x.numel() <= k):
        y = _out(torch.ops.aten._weight_int8pack_mm(_rows(x), weight, scale.to(x.dtype)), x)
        return y if bias is None else y + bias
    # many rows (prefill) or another device: one dequantized copy, then the dense product
    return F.linear(x, weight.to(x.dtype) * scale.to(x.dtype)[:, None], bias)


def _bf16_rows(path: str) -> int:
    return BF16_KERNEL_ROWS if path == "avx512bf16" else BF16_WIDE_ROWS


def _grouped_rows(dtype: torch.dtype) -> int:
    return GROUPED_BF16_ROWS if dtype is torch.bfloat16 and not native_bf16() else Q4_KERNEL_ROWS


def _grouped_kernel_takes(x: torch.Tensor) -> bool:
    """Whether the 4-bit and Q8_0 kernels take ``x``'s rows: up to ``Q4_KERNEL_ROWS``, or up to
    ``GROUPED_BF16_ROWS`` for bf16 activations on a CPU without native bf16, where torch's bf16
    products are slow at every size (q4 [5632, 1024], bf16 x, 2 threads, Xeon with AVX512-VNNI
    only: the kernel 4.6 / 10.0 ms at 64 / 128 rows against 21.5 / 34.6 ms dequantized; with
    float32 x they tie from ~48 rows)."""
    if not (x.is_cpu and x.numel() > 0 and available()):
        return False
    return x.numel() <= _grouped_rows(x.dtype) * x.shape[-1]


def q4_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, minv: torch.Tensor,
              bias: torch.Tensor | None = None, float_out: bool = False) -> torch.Tensor:
    """``x W^T + bias`` for W held in 4-bit groups (:func:`dequantize_q4` says how). At a few
    rows the kernel reads the packed weight (activations quantized to int8 per group of 32, as
    llama.cpp does); prefill and other devices multiply by one dequantized copy."""
    if _grouped_kernel_takes(x):
        op = _q4_linear_op if torch.compiler.is_compiling() else _ext.q4_linear
        return _out(op(_rows(x), qweight, scale, minv, bias, float_out), x)
    return F.linear(x, dequantize_q4(qweight, scale, minv, x.dtype), bias)


def q8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
              float_out: bool = False) -> torch.Tensor:
    """``x W^T + bias`` for an int8 W with a float16 scale per row and group of 32 inputs (GGUF's
    Q8_0): the kernel at a few rows, as :func:`q4_linear`; else one dequantized copy."""
    if _grouped_kernel_takes(x):
        op = _q8_linear_op if torch.compiler.is_compiling() else _ext.q8_linear
        return _out(op(_rows(x), qweight, scale, bias, float_out), x)
    return F.linear(x, dequantize_q8(qweight, scale, x.dtype), bias)


def weight_kind(weight: torch.Tensor, scale: torch.Tensor | None) -> str | None:
    """Which product a weight takes: "q4" (uint8, two 4-bit values a byte), "q8" (int8 with a
    scale per row and group of 32: GGUF's Q8_0), "int8" (a scale per row), "bf16", or None (the
    stock one): the one place the products read a weight's form, ``layers.linear`` and
    :func:`kernel_call` alike."""
    if weight.dtype is torch.uint8:
        return "q4"
    if scale is not None:
        return "q8" if scale.dim() == 2 else "int8"
    return "bf16" if weight.dtype is torch.bfloat16 else None


def kernel_call(weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None, float_out: bool,
                minv: torch.Tensor | None, dtype: torch.dtype) -> tuple[Callable[[torch.Tensor], torch.Tensor], int] | None:
    """The extension call ``layers.linear`` makes for these arguments and 2-D, contiguous CPU rows
    of ``dtype`` outside autograd and ``torch.compile``, and up to how many rows it makes it; None
    where it makes none. A decode loop calls it directly: the checks of the wrappers above cost
    ~7 us a call, ~0.8 ms of a ~15 ms bf16 step of the default model (120 products)."""
    if not available() or weight.device.type != "cpu":
        return None
    ext, kind = _ext, weight_kind(weight, scale)
    if kind == "q4":
        return (lambda x: ext.q4_linear(x, weight, scale, minv, bias, float_out)), _grouped_rows(dtype)
    if kind == "q8":
        return (lambda x: ext.q8_linear(x, weight, scale, bias, float_out)), _grouped_rows(dtype)
    if kind == "int8":
        return (lambda x: ext.int8_linear(x, weight, scale, bias, float_out)), INT8_KERNEL_ROWS
    path = bf16_kernel()
    if kind == "bf16" and dtype is torch.bfloat16 and path is not None and weight.is_contiguous():
        return (lambda x: ext.bf16_linear(x, weight, bias, float_out)), _bf16_rows(path)
    return None


def dequantize_q8(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense [N, K] weight ``q * scale`` of int8 ``qweight`` with ``scale`` [N, K / 32]
    (any leading rows: an embedding lookup dequantizes only the rows it took)."""
    n, groups = scale.shape[-2:]
    q = qweight.reshape(*qweight.shape[:-1], groups, Q4_GROUP).float()
    return (q * scale.float()[..., None]).reshape(qweight.shape).to(dtype)


def quantize_q8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(qweight, scale)`` of ``weight`` [N, K] as GGUF's Q8_0 makes them: per group of 32,
    ``scale`` is the largest |w| / 127 (float16)."""
    n, k = weight.shape
    if k % Q4_GROUP:
        raise ValueError(f"8-bit groups need an input width that is a multiple of {Q4_GROUP}, not {k}")
    g = weight.detach().float().reshape(n, k // Q4_GROUP, Q4_GROUP)
    scale = (g.abs().amax(-1) / INT8_MAX).half()
    step = torch.where(scale.float() > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    q = torch.round(g / step[..., None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.reshape(n, k).contiguous(), scale


def dequantize_q4(qweight: torch.Tensor, scale: torch.Tensor, minv: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense [N, K] weight ``q * scale + min``: ``qweight`` [N, K / 2] holds each group of 32
    in 16 bytes (byte j: element j in the low nibble, j + 16 in the high), GGUF's Q4 order;
    ``scale`` and ``min`` are [N, K / 32]."""
    n, groups = scale.shape
    if (qweight.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and available()
            and qweight.is_contiguous() and scale.is_contiguous() and minv.is_contiguous()):
        return _ext.q4_dequantize(qweight, scale, minv, dtype)  # one pass, no temporaries
    q = qweight.reshape(n, groups, Q4_GROUP // 2)
    values = torch.cat([q & 15, q >> 4], dim=-1).float()
    w = values * scale.float()[..., None] + minv.float()[..., None]
    return w.reshape(n, groups * Q4_GROUP).to(dtype)


def pack_q4(values: torch.Tensor) -> torch.Tensor:
    """[N, K] integers 0..15 packed two a byte in GGUF's Q4 order (:func:`dequantize_q4`)."""
    n, k = values.shape
    v = values.to(torch.uint8).reshape(n, k // Q4_GROUP, 2, Q4_GROUP // 2)
    return (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def quantize_q4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(qweight, scale, min)`` of ``weight`` [N, K] as GGUF's Q4_1 makes them: per group of
    32, ``min`` is the smallest value and ``scale`` spans the range in 15 steps."""
    n, k = weight.shape
    if k % Q4_GROUP:
        raise ValueError(f"4-bit groups need an input width that is a multiple of {Q4_GROUP}, not {k}")
    g = weight.detach().float().reshape(n, k // Q4_GROUP, Q4_GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).half()
    lo = lo.half()
    step = torch.where(scale.float() > 0, scale.float(), torch.ones_like(lo, dtype=torch.float32))
    q = torch.round((g - lo.float()[..., None]) / step[..., None]).clamp_(0, 15)
    return pack_q4(q.reshape(n, k)), scale, lo


def row_absmax(weight: torch.Tensor) -> torch.Tensor:
    """Each row's largest |w| in float32 (the caller combines the pieces of a split row)."""
    return weight.detach().abs().amax(dim=1).float()


def quantize_rows(weight: torch.Tensor, absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: ``(q, scale)`` with ``weight ~= q * scale[:, None]``.

    ``absmax`` is each whole row's largest |w|: a rank holding only some of a row's columns
    (a row-parallel layer) must pass the maximum over every rank, so the quantized weights are
    the same at every TP degree and reshard cleanly."""
    amax = row_absmax(weight) if absmax is None else absmax.float()
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(weight.detach().float() / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX)
    q = q.to(torch.int8, memory_format=torch.contiguous_format)  # the kernel reads rows
    return q, scale
