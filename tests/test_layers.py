"""Each parallel layer against its dense twin, forward and backward, at TP = 1..4."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tpserve.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)

TP = [1, 2, 3, 4]


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Max abs error <= 1e-5 of the reference's scale."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.abs().max().item() or 1.0
    err = (got - want).abs().max().item()
    assert err <= 1e-5 * scale, f"{what}: max abs error {err:.3g} > 1e-5 x scale {scale:.3g} on rank {dist.get_rank()}"


def _dense_ref(dense: nn.Module, x: torch.Tensor):
    x = x.clone().requires_grad_(x.is_floating_point())
    y = dense(x)
    g = torch.randn_like(y)
    y.backward(g)
    return x, y.detach(), g


def check_column(in_f: int, out_f: int, bias: bool, gather: bool) -> int:
    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f, bias=bias)
    x_ref, y_ref, g = _dense_ref(dense, torch.randn(2, 3, in_f))
    layer = ColumnParallelLinear.from_dense(dense, gather_output=gather)
    s, e = layer.out_start, layer.out_end
    x = x_ref.detach().clone().requires_grad_()
    y = layer(x)
    if gather:
        assert_close(y, y_ref, "column forward (gathered)")
        y.backward(g)
    else:
        assert_close(y, y_ref[..., s:e], "column forward (local)")
        y.backward(g[..., s:e])
    assert_close(x.grad, x_ref.grad, "column input grad")
    assert_close(layer.weight.grad, dense.weight.grad[s:e], "column weight grad")
    if bias:
        assert_close(layer.bias.grad, dense.bias.grad[s:e], "column bias grad")
    return e - s


def check_row(in_f: int, out_f: int, bias: bool, input_is_parallel: bool) -> int:
    torch.manual_seed(1)
    dense = nn.Linear(in_f, out_f, bias=bias)
    x_ref, y_ref, g = _dense_ref(dense, torch.randn(2, 3, in_f))
    layer = RowParallelLinear.from_dense(dense, input_is_parallel=input_is_parallel)
    s, e = layer.in_start, layer.in_end
    full = x_ref.detach().clone()
    x = (full[..., s:e] if input_is_parallel else full).clone().requires_grad_()
    y = layer(x)
    assert_close(y, y_ref, "row forward")
    y.backward(g)
    assert_close(x.grad, x_ref.grad[..., s:e] if input_is_parallel else x_ref.grad, "row input grad")
    assert_close(layer.weight.grad, dense.weight.grad[:, s:e], "row weight grad")
    if bias:  # added once after the reduce, so its grad is the dense one, whole
        assert_close(layer.bias.grad, dense.bias.grad, "row bias grad")
    return e - s


def check_embedding(vocab: int, dim: int) -> int:
    torch.manual_seed(2)
    dense = nn.Embedding(vocab, dim)
    ids = torch.arange(vocab).repeat(2).reshape(2, vocab)[:, torch.randperm(vocab)]
    y_ref = dense(ids)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    layer = VocabParallelEmbedding.from_dense(dense)
    y = layer(ids)
    assert_close(y, y_ref.detach(), "embedding forward")
    y.backward(g)
    s, e = layer.vocab_start, layer.vocab_end
    assert_close(layer.weight.grad, dense.weight.grad[s:e], "embedding weight grad")
    with pytest.raises(IndexError, match="out of range"):
        layer(torch.tensor([[vocab]]))
    return e - s


def check_lm_head(dim: int, vocab: int, mode) -> object:
    torch.manual_seed(3)
    dense = nn.Linear(dim, vocab, bias=False)
    x_ref, y_ref, g = _dense_ref(dense, torch.randn(2, 3, dim))
    layer = ParallelLMHead.from_dense(dense, gather_output=mode)
    s, e = layer.vocab_start, layer.vocab_end
    x = x_ref.detach().clone().requires_grad_()
    y = layer(x)
    if mode == "argmax":  # every rank: the full argmax, ties to the lowest id
        assert torch.equal(y, y_ref.argmax(-1)), (y, y_ref.argmax(-1))
        tied = torch.zeros(2, vocab)
        tied[0, [s for s in (0, vocab // 2, vocab - 1)]] = 1.0  # equal maxima in several shards
        tied[1, vocab - 1] = 2.0
        from tpserve.parallel.layers import vocab_argmax

        got = vocab_argmax(tied[:, layer.vocab_start:layer.vocab_end], layer.vocab_start)
        assert got.tolist() == [0, vocab - 1], got
        return "ok"
    if mode == "rank0":
        if dist.get_rank() == 0:
            assert_close(y, y_ref, "lm head logits on rank 0")
        else:
            assert y is None
        return "ok"
    if mode:
        assert_close(y, y_ref, "lm head gathered logits")
        y.backward(g)
    else:
        assert_close(y, y_ref[..., s:e], "lm head local logits")
        y.backward(g[..., s:e])
    assert_close(x.grad, x_ref.grad, "lm head input grad")
    assert_close(layer.weight.grad, dense.weight.grad[s:e], "lm head weight grad")
    return e - s


def check_column_row_pair() -> None:
    """The Megatron MLP: colwise then rowwise, no communication in between."""
    torch.manual_seed(4)
    fc1, fc2 = nn.Linear(12, 10), nn.Linear(10, 12)
    x_ref = torch.randn(5, 12, requires_grad=True)
    y_ref = fc2(torch.relu(fc1(x_ref)))
    y_ref.sum().backward()
    p1, p2 = ColumnParallelLinear.from_dense(fc1), RowParallelLinear.from_dense(fc2)
    x = x_ref.detach().clone().requires_grad_()
    y = p2(torch.relu(p1(x)))
    assert_close(y, y_ref.detach(), "mlp forward")
    y.sum().backward()
    assert_close(x.grad, x_ref.grad, "mlp input grad")
    assert_close(p1.weight.grad, fc1.weight.grad[p1.out_start:p1.out_end], "fc1 weight grad")
    assert_close(p2.weight.grad, fc2.weight.grad[:, p2.in_start:p2.in_end], "fc2 weight grad")


@pytest.mark.parametrize("tp", TP)
@pytest.mark.parametrize("bias,gather", [(True, False), (False, True), (True, True)])
def test_column_parallel_linear(tp_run, tp, bias, gather):
    sizes = tp_run(tp, check_column, 16, 24, bias, gather)
    assert sum(sizes) == 24


@pytest.mark.parametrize("tp", TP)
@pytest.mark.parametrize("bias,input_is_parallel", [(True, True), (False, True), (True, False)])
def test_row_parallel_linear(tp_run, tp, bias, input_is_parallel):
    sizes = tp_run(tp, check_row, 24, 16, bias, input_is_parallel)
    assert sum(sizes) == 24


@pytest.mark.parametrize("tp", TP)
def test_vocab_parallel_embedding(tp_run, tp):
    assert sum(tp_run(tp, check_embedding, 37, 8)) == 37


@pytest.mark.parametrize("tp", TP)
@pytest.mark.parametrize("mode", [True, False, "rank0", "argmax"])
def test_parallel_lm_head(tp_run, tp, mode):
    tp_run(tp, check_lm_head, 8, 37, mode)


@pytest.mark.parametrize("tp", [3, 4])
def test_uneven_splits(tp_run, tp):
    """out_features=10 at TP=4 is 3,3,2,2; at TP=3 it is 4,3,3."""
    assert tp_run(tp, check_column, 6, 10, True, True) == ([3, 3, 2, 2] if tp == 4 else [4, 3, 3])
    assert tp_run(tp, check_column, 6, 10, True, False) == ([3, 3, 2, 2] if tp == 4 else [4, 3, 3])
    assert tp_run(tp, check_row, 10, 6, True, True) == ([3, 3, 2, 2] if tp == 4 else [4, 3, 3])
    assert tp_run(tp, check_row, 10, 6, True, False) == ([3, 3, 2, 2] if tp == 4 else [4, 3, 3])
    assert tp_run(tp, check_embedding, 10, 4) == ([3, 3, 2, 2] if tp == 4 else [4, 3, 3])
    assert tp_run(tp, check_lm_head, 4, 10, True) == ([3, 3, 2, 2] if tp == 4 else [4, 3, 3])


@pytest.mark.parametrize("tp", TP)
def test_column_then_row(tp_run, tp):
    tp_run(tp, check_column_row_pair)


@pytest.mark.parametrize("rows", [1, 3, 6])
def test_linear_under_compile_matches_f_linear(rows):
    """Compiled decode writes few-row products as multiply-and-sum (``layers.linear``)."""
    import torch.nn.functional as F

    from tpserve.parallel.layers import linear

    torch.manual_seed(0)
    x, w, b = torch.randn(rows, 1, 48), torch.randn(80, 48), torch.randn(80)
    graphs = []

    def inspect(gm, example_inputs):  # a torch.compile backend that records what dynamo traced
        graphs.append(gm.code)
        return gm.forward

    torch.testing.assert_close(torch.compile(linear, dynamic=False)(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.compile(linear, dynamic=False)(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    torch.compile(linear, backend=inspect, dynamic=False)(x, w, b)
    assert ("linear" not in graphs[-1]) == (rows <= 4), graphs[-1]
