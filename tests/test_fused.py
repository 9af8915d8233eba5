"""The fused one-pass steps (RMSNorm, residual add + RMSNorm, rope, rope + cache write, SiLU-and-multiply)
against transformers' math written as torch ops."""

from __future__ import annotations

import pytest
import torch

from tpserve.models import fused


def _torch_norm(x, w, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


@pytest.fixture(autouse=True)
def built():
    if fused.extension() is None:
        pytest.skip("no C++ compiler: the torch ops are the only path")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 576), (7, 1024), (3, 5, 64), (130, 40)])
def test_rms_norm(dtype, shape):
    torch.manual_seed(shape[-1])
    x, w = torch.randn(shape).to(dtype) * 3, torch.randn(shape[-1]).to(dtype)
    with torch.inference_mode():
        got = fused.rms_norm(x, w, 1e-5)
    assert got.dtype == dtype
    # float32 sums in another order; bf16 may then round one ulp apart
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(got, _torch_norm(x, w, 1e-5), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,heads,dim", [(1, 9, 64), (5, 3, 128), (33, 2, 16)])
def test_rope(dtype, tokens, heads, dim):
    torch.manual_seed(dim)
    x = torch.randn(tokens, heads, dim).to(dtype)
    cos, sin = torch.randn(tokens, 1, dim).to(dtype), torch.randn(tokens, 1, dim).to(dtype)
    with torch.inference_mode():
        got = fused.rope(x, cos, sin)
    want = x.float() * cos.float() + x.float().roll(dim // 2, dims=-1) * sin.float()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(got.float(), want, **tol)


def test_autograd_and_strided_inputs_take_the_torch_ops():
    x = torch.randn(4, 32, requires_grad=True)
    w = torch.ones(32)
    y = fused.rms_norm(x, w, 1e-6)
    y.sum().backward()
    assert x.grad is not None
    strided = torch.randn(32, 4).t()
    torch.testing.assert_close(fused.rms_norm(strided, w, 1e-6), _torch_norm(strided, w, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 9])
def test_add_rms_norm(dtype, rows):
    torch.manual_seed(rows)
    x, h = (torch.randn(rows, 576).to(dtype) * 2 for _ in range(2))
    w = torch.randn(576).to(dtype)
    with torch.inference_mode():
        total, normed = fused.add_rms_norm(x, h, w, 1e-5)
    assert torch.equal(total, x + h)  # the residual sum rounds exactly as torch's add
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(normed, _torch_norm(x + h, w, 1e-5), **tol)


def test_bf16_sums_round_as_torch_does_bit_for_bit_with_ties_overflow_and_nan():
    """The kernels round float32 to bf16 by its bits (to vectorise); ties go to even, a sum
    past bf16's largest value becomes inf, and NaN stays NaN, as in torch's conversion."""
    big = torch.finfo(torch.bfloat16).max
    x = torch.tensor([1.0, 1.0, 3.0, big, -big, float("nan"), float("inf"), 1.0, 256.0, 0.0] * 8, dtype=torch.bfloat16)
    # 1 + 2^-8 and 1 + 3 * 2^-8 are ties between bf16 neighbours; 3 + 2^-7 rounds down to even
    h = torch.tensor([2**-8, 3 * 2**-8, 2**-7, big, -big, 1.0, 1.0, -1.0, 1.0, -0.0] * 8, dtype=torch.bfloat16)
    with torch.inference_mode():
        total, _ = fused.add_rms_norm(x[None], h[None], torch.ones(80, dtype=torch.bfloat16), 1e-5)
    want = x + h
    assert torch.equal(total[0].isnan(), want.isnan())  # (torch's own NaN bits differ by code path)
    keep = ~want.isnan()
    assert torch.equal(total[0][keep].view(torch.int16), want[keep].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_add_rms_norm_rounds_a_float32_sum_first(dtype):
    """A row-parallel sum arrives in float32: the kernel rounds it to x's dtype, then adds, bit
    for bit as ``x + h.to(dtype)``; ties, overflow and NaN included."""
    big = torch.finfo(dtype).max
    step = 2.0 ** -(8 if dtype == torch.bfloat16 else 11)  # half a unit in the last place at 1
    x = torch.tensor([1.0, 1.0, 3.0, 1.0, 0.5, 1.0, -2.0, 0.0] * 10, dtype=dtype)
    h = torch.tensor([step, 3 * step, 1 + step, float(big) * 2, float("nan"), float("inf"), 1e-30, -0.0] * 10)
    h = torch.cat([h[None], torch.randn(3, 80) * 4])
    x = torch.cat([x[None], torch.randn(3, 80).to(dtype)])
    w = torch.randn(80).to(dtype)
    with torch.inference_mode():
        for total, normed in (fused.add_rms_norm(x, h, w, 1e-5), fused.extension().add_rms_norm(x, h, w, 1e-5)):
            want_total, want_normed = fused.add_rms_norm(x, h.to(dtype), w, 1e-5)
            assert torch.equal(total.isnan(), want_total.isnan())
            keep = ~want_total.isnan()
            assert torch.equal(total[keep].view(torch.int16), want_total[keep].view(torch.int16))
            keep = ~want_normed.isnan()
            assert torch.equal(normed[keep].view(torch.int16), want_normed[keep].view(torch.int16))
    assert torch.equal(fused.add_rms_norm(x, h, w, 1e-5)[0][1:], x[1:] + h[1:].to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,width", [(1, 1536), (5, 40), (16, 33)])
def test_silu_mul(dtype, rows, width):
    torch.manual_seed(width)
    gate_up = (torch.randn(rows, 2 * width) * 6).to(dtype)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # saturated and zero arguments
    with torch.inference_mode():
        got = fused.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    tol = dict(rtol=2e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,heads,kv_heads,dim", [(1, 9, 3, 64), (5, 4, 2, 16), (3, 2, 2, 128)])
def test_rope_store_equals_rope_and_cache_writes(dtype, tokens, heads, kv_heads, dim):
    torch.manual_seed(tokens * dim)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).to(dtype)
    cos, sin = torch.randn(tokens, 1, dim).to(dtype), torch.randn(tokens, 1, dim).to(dtype)
    cache = [torch.zeros(6, 4, kv_heads, dim, dtype=dtype) for _ in range(2)]
    slots = torch.randperm(24)[:tokens]
    with torch.inference_mode():
        q = fused.rope_store(qkv, cos, sin, slots, cache, heads, kv_heads)
        qw, kw, vw = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        want_q = fused.rope(qw.reshape(tokens, heads, dim).contiguous(), cos, sin)
        want_k = fused.rope(kw.reshape(tokens, kv_heads, dim).contiguous(), cos, sin)
    assert torch.equal(q, want_q)
    assert torch.equal(cache[0].view(-1, kv_heads, dim)[slots], want_k)
    assert torch.equal(cache[1].view(-1, kv_heads, dim)[slots], vw.reshape(tokens, kv_heads, dim))
    untouched = torch.ones(24, dtype=torch.bool)
    untouched[slots] = False
    assert not cache[0].view(-1, kv_heads, dim)[untouched].any() and not cache[1].view(-1, kv_heads, dim)[untouched].any()


def test_rope_store_refuses_a_slot_outside_the_cache():
    qkv, cos = torch.randn(1, 3 * 8), torch.randn(1, 1, 8)
    cache = [torch.zeros(2, 4, 1, 8) for _ in range(2)]
    with torch.inference_mode(), pytest.raises(RuntimeError, match="slot 8 is outside the cache's 8"):
        fused.rope_store(qkv, cos, cos, torch.tensor([8]), cache, 1, 1)
