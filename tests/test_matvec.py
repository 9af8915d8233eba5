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


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 17, 129])
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
    path = matvec.bf16_kernel()
    if path is None:
        pytest.skip("this CPU has no AVX-512 (or no compiler): bf16 runs through F.linear")
    assert path == ("avx512bf16" if matvec.native_bf16() else "avx512f")
    x, w = torch.randn(3, 64).bfloat16(), torch.randn(16, 64).bfloat16()
    with torch.inference_mode():
        assert matvec.bf16_linear(x, w) is not None
        if path == "avx512bf16":  # prefill: oneDNN's AMX products
            assert matvec.bf16_linear(torch.randn(matvec.BF16_KERNEL_ROWS + 1, 64).bfloat16(), w) is None
        else:  # prefill: float32 products, faster than torch's bf16 ones without AVX512-BF16
            many = torch.randn(matvec.BF16_WIDE_ROWS + 1, 64).bfloat16()
            got = matvec.bf16_linear(many, w, float_out=True)
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, F.linear(many.float(), w.float()))
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_decode_rows_take_the_kernel_each_row_as_if_alone(dtype):
    """64 rows (serving 64 streams; a prompt chunk) still multiply through the kernel, and each
    row's result is the one it gets alone: dequantizing the weight instead cost ~100 ms a step
    at the default model's head, and a row's logits depended on how many rows came with it."""
    if not matvec.available():
        pytest.skip("no C++ compiler: the kernel is not built")
    x, q, scale, b, _ = _int8_case(64, 300, 576, dtype)
    with torch.inference_mode():
        whole = matvec.int8_linear(x, q, scale, b)
        alone = torch.cat([matvec.int8_linear(x[i:i + 1], q, scale, b) for i in range(len(x))])
    assert torch.equal(whole, alone)


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


def _int8_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' activations: int8 per group of 32 ([rows, groups, 32], as float64) and each
    group's scale dx ([rows, groups])."""
    rows, k = x.shape
    g = x.float().reshape(rows, k // 32, 32)
    amax = g.abs().amax(-1)  # rounded in float32 as the kernel rounds, so ties fall the same way
    inv = torch.where(amax > 0, torch.full_like(amax, 127) / amax, 0)  # (127 / t is 127 * (1 / t) in torch)
    return torch.round((g * inv[..., None]).clamp(-127, 127)).double(), (amax / 127).double()


def _q4_reference(x: torch.Tensor, qweight, scale, minv) -> torch.Tensor:
    """The kernel's own math in float64: activations quantized to int8 per group of 32, each
    group's dot product exact, then its scale and min applied."""
    xq, dx = _int8_groups(x)
    n, groups = scale.shape
    q = qweight.reshape(n, groups, 16)
    values = torch.cat([q & 15, q >> 4], -1).double()  # [n, groups, 32]
    dots = torch.einsum("mgj,ngj->mng", xq, values)
    sums = xq.sum(-1)  # [m, groups]
    return (dots * scale.double()[None] * dx[:, None] + minv.double()[None] * (dx * sums)[:, None]).sum(-1)


def test_4bit_and_q8_with_bf16_rows_take_the_kernel_up_to_128_rows_without_native_bf16():
    """Without native bf16, torch's bf16 product of a dequantized copy was 2-4x slower than the
    kernel at 48-128 rows: those rows stay in the kernel, each row's result the one it gets alone."""
    if not matvec.available() or matvec.native_bf16():
        pytest.skip("the kernel is not built, or this CPU multiplies bf16 natively (32 rows there)")
    torch.manual_seed(0)
    w = torch.randn(96, 576)
    x = torch.randn(128, 576).bfloat16()
    qweight, scale, minv = matvec.quantize_q4(w)
    q8weight, q8scale = matvec.quantize_q8(w)
    for product in (lambda rows: matvec.q4_linear(rows, qweight, scale, minv),
                    lambda rows: matvec.q8_linear(rows, q8weight, q8scale)):
        with torch.inference_mode():
            whole = product(x)
            alone = torch.cat([product(x[i:i + 1]) for i in range(len(x))])
        assert torch.equal(whole, alone)


@pytest.mark.parametrize("rows", [1, 2, 4, 5, 16])
@pytest.mark.parametrize("n,k", [(37, 64), (64, 96), (5, 1024), (33, 160), (256, 576)])  # 2, 3, 32, 5, 18 groups
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q4_kernel_is_its_integer_math(rows, n, k, dtype):
    if not matvec.available():
        pytest.skip("no compiler: 4-bit weights multiply by a dequantized copy")
    torch.manual_seed(rows * 100 + n + k)
    qweight, scale, minv = matvec.quantize_q4(torch.randn(n, k))
    x, b = torch.randn(rows, k).to(dtype), torch.randn(n)
    with torch.inference_mode():
        got = layers.linear(x, qweight, b, scale, minv=minv)
        partial = layers.linear(x, qweight, None, scale, float_out=True, minv=minv)
    ref = _q4_reference(x, qweight, scale, minv)
    assert got.dtype == dtype and got.shape == (rows, n) and partial.dtype == torch.float32
    torch.testing.assert_close(partial.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got.double(), ref + b.double(), rtol=tol, atol=tol * ref.abs().max().item())
    # and the int8 activations cost little against the dequantized weight's float product
    dense = F.linear(x.float(), matvec.dequantize_q4(qweight, scale, minv), b)
    assert (got.float() - dense).abs().max() <= 0.03 * dense.abs().max()


def test_q4_packing_round_trips_and_prefill_uses_the_dense_product():
    torch.manual_seed(0)
    w = torch.randn(40, 96) * torch.linspace(0.1, 2, 40)[:, None]
    qweight, scale, minv = matvec.quantize_q4(w)
    assert qweight.shape == (40, 48) and qweight.dtype == torch.uint8 and scale.shape == minv.shape == (40, 3)
    dense = matvec.dequantize_q4(qweight, scale, minv)
    assert (dense - w).abs().max() <= scale.float().max() * 0.51 + 1e-3  # within half a step (fp16 min/scale)
    values = torch.randint(0, 16, (3, 64))
    packed = matvec.pack_q4(values)
    ones = torch.ones(3, 2, dtype=torch.float16)
    assert torch.equal(matvec.dequantize_q4(packed, ones, ones * 0), values.float())
    x = torch.randn(matvec.Q4_KERNEL_ROWS + 1, 96)  # prefill: one dequantized copy, float math
    torch.testing.assert_close(matvec.q4_linear(x, qweight, scale, minv), F.linear(x, dense))
    with pytest.raises(ValueError, match="multiple of 32"):
        matvec.quantize_q4(torch.randn(4, 40))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q4_dequantize_in_one_pass_equals_the_torch_ops(no_kernel, dtype):
    torch.manual_seed(1)
    qweight, scale, minv = matvec.quantize_q4(torch.randn(67, 160) * 3)
    want = matvec.dequantize_q4(qweight, scale, minv, dtype)  # the torch ops (the kernel is off)
    matvec._found.clear()
    if not matvec.available():
        pytest.skip("no C++ compiler: the torch ops are the only path")
    got = matvec.dequantize_q4(qweight, scale, minv, dtype)
    assert got.dtype == dtype and got.shape == (67, 160)
    torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 8e-3, atol=1e-6)


def test_q4_kernel_inside_torch_compile():
    if not matvec.available():
        pytest.skip("no compiler")
    torch._dynamo.reset()
    qweight, scale, minv = matvec.quantize_q4(torch.randn(48, 64))

    def f(x):
        return layers.linear(x, qweight, None, scale, minv=minv)

    x = torch.randn(2, 64).bfloat16()
    with torch.inference_mode():
        torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


def _q8_reference(x: torch.Tensor, qweight, scale) -> torch.Tensor:
    """The Q8_0 kernel's math in float64: int8 activations per group of 32, exact group dots."""
    xq, dx = _int8_groups(x)
    dots = torch.einsum("mgj,ngj->mng", xq, qweight.reshape(qweight.shape[0], -1, 32).double())
    return (dots * scale.double()[None] * dx[:, None]).sum(-1)


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16])
@pytest.mark.parametrize("n,k", [(37, 64), (64, 96), (5, 1024), (33, 160), (100, 544)])  # 2, 3, 32, 5, 17 groups
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q8_kernel_is_its_integer_math(rows, n, k, dtype):
    if not matvec.available():
        pytest.skip("no compiler: int8 groups multiply by a dequantized copy")
    torch.manual_seed(rows * 100 + n + k)
    qweight, scale = matvec.quantize_q8(torch.randn(n, k))
    x, b = torch.randn(rows, k).to(dtype), torch.randn(n)
    with torch.inference_mode():
        got = layers.linear(x, qweight, b, scale)
        partial = layers.linear(x, qweight, None, scale, float_out=True)
    ref = _q8_reference(x, qweight, scale)
    assert got.dtype == dtype and partial.dtype == torch.float32
    torch.testing.assert_close(partial.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    dense = F.linear(x.float(), matvec.dequantize_q8(qweight, scale), b)
    assert (got.float() - dense).abs().max() <= 0.03 * dense.abs().max()


def test_q8_round_trip_prefill_and_an_int8_group_embedding():
    """Q8_0's groups reconstruct within half a step; many rows take the dequantized product; an
    embedding and its tied head holding them look up and multiply with the same numbers."""
    torch.manual_seed(0)
    w = torch.randn(50, 64)
    qweight, scale = matvec.quantize_q8(w)
    dense = matvec.dequantize_q8(qweight, scale)
    assert (dense - w).abs().max() <= scale.float().max() * 0.51 + 1e-3
    x = torch.randn(matvec.Q4_KERNEL_ROWS + 1, 64)
    torch.testing.assert_close(matvec.q8_linear(x, qweight, scale), F.linear(x, dense))
    from torch._C._distributed_c10d import FakeProcessGroup
    from torch.nn import Parameter

    one = FakeProcessGroup._create_internal(0, 1)  # TP=1: the layers never communicate
    emb = layers.VocabParallelEmbedding(50, 64, group=one, dtype=torch.bfloat16, init=False)
    emb.weight, emb.weight_scale = Parameter(qweight, requires_grad=False), Parameter(scale, requires_grad=False)
    head = layers.ParallelLMHead(64, 50, group=one, dtype=torch.bfloat16, init=False)
    head.tie_weights(emb)
    ids = torch.tensor([3, 0, 49, 3])
    with torch.inference_mode():
        assert torch.equal(emb(ids), dense[ids].bfloat16())
        h = torch.randn(2, 64).bfloat16()
        torch.testing.assert_close(head(h), matvec.q8_linear(h, qweight, scale, float_out=True).float())


@pytest.mark.parametrize("rows,vocab", [(1, 49152), (8, 1000), (3, 1), (2, 70)])
def test_row_max_is_torch_max_with_its_ties_nans_and_infinities(rows, vocab):
    """Greedy decoding's argmax: the first of equal maxima, a NaN as the maximum, all -inf at 0."""
    x = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows))
    if vocab > 64:
        x[0, 5] = x[0, 67] = x[0].max() + 1  # a tie across the kernel's 64-value blocks: the first
        x[-1, :] = float("-inf")
        if rows > 2:
            x[2, vocab - 1] = x[2, 66] = float("nan")  # NaNs win, the first of them
            x[2, 3] = float("inf")
    want = x.max(-1)
    # the kernel itself where it is built (row_max falls back to torch's max elsewhere)
    for got in [matvec.row_max(x)] + ([matvec.extension().row_max(x)] if matvec.available() else []):
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[0], want[0], equal_nan=True)
        if vocab > 64:
            assert got[1][0] == (0 if rows == 1 else 5) and got[1][-1] == 0
    strided = x.t().contiguous().t()  # columns contiguous: torch's max
    assert torch.equal(matvec.row_max(strided)[1], want[1])
