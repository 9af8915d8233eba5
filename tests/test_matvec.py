"""The bf16 and int8 products of ``tpserve.parallel.matvec`` against dense float math, through
the kernel, through each stock fallback, and inside ``torch.compile``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tpserve.parallel import layers, matvec

SHAPES = [(37, 70), (64, 33), (256, 576), (5, 1030)]  # odd widths: the kernels' tails


@pytest.fixture
def no_kernel(monkeypatch):
    """The stock paths, as on a machine without a compiler."""
    monkeypatch.setattr(matvec, "_found", {"kernel": False, "bf16": False})


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 17])
@pytest.mark.parametrize("n,k", SHAPES)
def test_bf16_linear_equals_float_math(rows, n, k):
    torch.manual_seed(rows * 1000 + n + k)
    x, w, b = torch.randn(rows, k).bfloat16(), torch.randn(n, k).bfloat16(), torch.randn(n).bfloat16()
    ref = F.linear(x.float(), w.float(), b.float())
    with torch.inference_mode():
        got = layers.linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    # fp32 accumulation, then one bf16 rounding of the result: within bf16's half-ulp, and a bit
    torch.testing.assert_close(got.float(), ref, rtol=8e-3, atol=8e-3 * ref.abs().max().item())


def test_bf16_kernel_is_used_where_it_applies():
    if not matvec.native_bf16():
        pytest.skip("this CPU has no AVX512-BF16 (or no compiler): bf16 runs through F.linear")
    x, w = torch.randn(3, 64).bfloat16(), torch.randn(16, 64).bfloat16()
    with torch.inference_mode():
        assert matvec.bf16_linear(x, w) is not None
        assert matvec.bf16_linear(torch.randn(matvec.BF16_KERNEL_ROWS + 1, 64).bfloat16(), w) is None  # prefill
        assert matvec.bf16_linear(x, w.t().contiguous().t()) is None  # a transposed layout
    wg = w.clone().requires_grad_()
    assert matvec.bf16_linear(x, wg) is None  # autograd needs the stock op
    y = layers.linear(x, wg)
    y.float().sum().backward()
    assert wg.grad is not None


def test_bf16_batched_shape_and_fallback(no_kernel):
    x, w = torch.randn(2, 3, 40).bfloat16(), torch.randn(24, 40).bfloat16()
    assert matvec.bf16_linear(x, w) is None
    torch.testing.assert_close(layers.linear(x, w), F.linear(x, w))


def test_quantize_rows_is_symmetric_per_row_and_reconstructs():
    torch.manual_seed(0)
    w = torch.randn(33, 70) * torch.linspace(0.01, 3, 33)[:, None]
    w[5] = 0  # an all-zero row gets scale 1, not a division by zero
    q, scale = matvec.quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (33,) and int(q.abs().max()) == matvec.INT8_MAX
    assert torch.all(q[5] == 0) and scale[5] == 1
    assert torch.all((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6)
    # a row split in two halves quantizes to the same ints when each half gets the whole row's maximum
    left, right = w[:, :35], w[:, 35:]
    whole = torch.maximum(matvec.row_absmax(left), matvec.row_absmax(right))
    ql, sl = matvec.quantize_rows(left, whole)
    qr, sr = matvec.quantize_rows(right, whole)
    assert torch.equal(torch.cat([ql, qr], 1), q) and torch.equal(sl, scale) and torch.equal(sr, scale)


def _int8_case(rows, n, k, dtype, bias=True):
    torch.manual_seed(rows + n * 7 + k)
    q, scale = matvec.quantize_rows(torch.randn(n, k))
    x = torch.randn(rows, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    ref = F.linear(x.float(), q.float() * scale[:, None], None if b is None else b.float())
    return x, q, scale, b, ref


@pytest.mark.parametrize("rows", [1, 3, 4, 16, 17, 40])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_equals_dequantized_math(rows, n, k, dtype):
    x, q, scale, b, ref = _int8_case(rows, n, k, dtype)
    with torch.inference_mode():
        got = layers.linear(x, q, b, scale)
    assert got.dtype == dtype and got.shape == (rows, n)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_int8_stock_fallbacks(no_kernel, rows):
    for dtype in (torch.float32, torch.bfloat16):
        x, q, scale, b, ref = _int8_case(rows, 40, 64, dtype)
        got = matvec.int8_linear(x, q, scale, b)
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_kernels_inside_torch_compile():
    """The custom ops trace (fake shapes) and give eager's numbers inside a compiled graph."""
    torch._dynamo.reset()
    w = torch.randn(48, 64).bfloat16()
    q, scale = matvec.quantize_rows(torch.randn(48, 64))

    def f(x):
        return layers.linear(x, w).float() + layers.linear(x, q, None, scale).float()

    x = torch.randn(2, 64).bfloat16()
    with torch.inference_mode():
        eager = f(x)
        compiled = torch.compile(f, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-2, atol=1e-2)


def test_partial_sums_come_back_in_float32():
    """A row-parallel rank's partial product stays float32 until the all-reduce has summed it."""
    x, w = torch.randn(2, 64).bfloat16(), torch.randn(16, 64).bfloat16()
    q, scale = matvec.quantize_rows(torch.randn(16, 64))
    with torch.inference_mode():
        full = layers.linear(x, w, float_out=True)
        int8 = layers.linear(x, q, None, scale, float_out=True)
    if matvec.native_bf16():
        assert full.dtype == torch.float32
        torch.testing.assert_close(full, F.linear(x.float(), w.float()), rtol=1e-5, atol=1e-4)
    if matvec.available():
        assert int8.dtype == torch.float32
    torch.testing.assert_close(int8.float(), F.linear(x.float(), q.float() * scale[:, None]), rtol=1e-2, atol=1e-2)
