"""``tpserve selfcheck``: every parallel layer against its dense twin on a live group."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got - want).abs().max().item() / (want.abs().max().item() or 1.0)


def _rank_main(seed: int) -> None:
    torch.manual_seed(seed)
    d, h, vocab = 24, 38, 53  # awkward sizes: uneven at TP=3 and 4
    rows = []

    dense = nn.Linear(d, h)
    x = torch.randn(4, d, requires_grad=True)
    y = dense(x)
    y.sum().backward()
    layer = ColumnParallelLinear.from_dense(dense, gather_output=True)
    x2 = x.detach().clone().requires_grad_()
    y2 = layer(x2)
    y2.sum().backward()
    rows.append(("ColumnParallelLinear", _err(y2, y), _err(x2.grad, x.grad)))

    dense = nn.Linear(h, d)
    x = torch.randn(4, h, requires_grad=True)
    y = dense(x)
    y.sum().backward()
    layer = RowParallelLinear.from_dense(dense, input_is_parallel=False)
    x2 = x.detach().clone().requires_grad_()
    y2 = layer(x2)
    y2.sum().backward()
    rows.append(("RowParallelLinear", _err(y2, y), _err(x2.grad, x.grad)))

    dense = nn.Embedding(vocab, d)
    ids = torch.randint(0, vocab, (3, 11))
    y = dense(ids)
    y.pow(2).sum().backward()
    layer = VocabParallelEmbedding.from_dense(dense)
    y2 = layer(ids)
    y2.pow(2).sum().backward()
    s, e = layer.vocab_start, layer.vocab_end
    rows.append(("VocabParallelEmbedding", _err(y2, y), _err(layer.weight.grad, dense.weight.grad[s:e])))

    dense = nn.Linear(d, vocab, bias=False)
    x = torch.randn(4, d, requires_grad=True)
    y = dense(x)
    F.log_softmax(y, -1).sum().backward()
    layer = ParallelLMHead.from_dense(dense)
    x2 = x.detach().clone().requires_grad_()
    y2 = layer(x2)
    F.log_softmax(y2, -1).sum().backward()
    rows.append(("ParallelLMHead", _err(y2, y), _err(x2.grad, x.grad)))

    worst = torch.tensor([max(r[1], r[2]) for r in rows])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        tp = dist.get_world_size()
        print(f"tensor-parallel self-check, TP={tp} ({dist.get_backend()}), errors relative to the dense layer:")
        print(f"  {'layer':<24}{'forward':>12}{'input/weight grad':>20}  ok")
        for (name, f, g), w in zip(rows, worst.tolist()):
            print(f"  {name:<24}{f:>12.2e}{g:>20.2e}  {'yes' if w <= 1e-5 else 'NO'}")
        print("all layers match their dense twins (max relative error <= 1e-5)" if worst.max().item() <= 1e-5
              else "self-check FAILED: a parallel layer disagrees with its dense twin")
    if worst.max().item() > 1e-5:
        raise SystemExit(1)


def run(tp: int, seed: int = 0) -> None:
    from .launch import launch_local

    launch_local(_rank_main, tp, seed)
