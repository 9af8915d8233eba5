"""The one-pass RMSNorm and rope against transformers' math written as torch ops."""

from __future__ import annotations

import pytest
import torch

from tpserve.models import norm_rope


def _torch_norm(x, w, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


@pytest.fixture(autouse=True)
def built():
    if norm_rope.extension() is None:
        pytest.skip("no C++ compiler: the torch ops are the only path")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 576), (7, 1024), (3, 5, 64), (130, 40)])
def test_rms_norm(dtype, shape):
    torch.manual_seed(shape[-1])
    x, w = torch.randn(shape).to(dtype) * 3, torch.randn(shape[-1]).to(dtype)
    with torch.inference_mode():
        got = norm_rope.rms_norm(x, w, 1e-5)
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
        got = norm_rope.rope(x, cos, sin)
    want = x.float() * cos.float() + x.float().roll(dim // 2, dims=-1) * sin.float()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(got.float(), want, **tol)


def test_autograd_and_strided_inputs_take_the_torch_ops():
    x = torch.randn(4, 32, requires_grad=True)
    w = torch.ones(32)
    y = norm_rope.rms_norm(x, w, 1e-6)
    y.sum().backward()
    assert x.grad is not None
    strided = torch.randn(32, 4).t()
    torch.testing.assert_close(norm_rope.rms_norm(strided, w, 1e-6), _torch_norm(strided, w, 1e-6))
