"""``tpserve selfcheck``: every parallel layer against its dense twin on a live group."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .layers import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got - want).abs().max().item() / (want.abs().max().item() or 1.0)


def _compare(dense: nn.Module, layer: nn.Module, x: torch.Tensor, loss, grad_of) -> tuple[float, float]:
    """Forward error, and the error of the gradient ``grad_of`` picks (input's or weight's)."""
    xd = x.clone().requires_grad_(x.is_floating_point())
    xp = x.clone().requires_grad_(x.is_floating_point())
    yd, yp = dense(xd), layer(xp)
    loss(yd).backward()
    loss(yp).backward()
    return _err(yp, yd), _err(*grad_of(xp, xd))


def _rank_main(seed: int) -> None:
    torch.manual_seed(seed)
    d, h, vocab = 24, 38, 53  # awkward sizes: uneven at TP=3 and 4
    input_grads = lambda xp, xd: (xp.grad, xd.grad)  # noqa: E731
    rows = []
    dense = nn.Linear(d, h)
    rows.append(("ColumnParallelLinear", *_compare(dense, ColumnParallelLinear.from_dense(dense, gather_output=True),
                                                   torch.randn(4, d), torch.sum, input_grads)))
    dense = nn.Linear(h, d)
    rows.append(("RowParallelLinear", *_compare(dense, RowParallelLinear.from_dense(dense, input_is_parallel=False),
                                                torch.randn(4, h), torch.sum, input_grads)))
    dense = nn.Embedding(vocab, d)
    emb = VocabParallelEmbedding.from_dense(dense)
    rows.append(("VocabParallelEmbedding", *_compare(
        dense, emb, torch.randint(0, vocab, (3, 11)), lambda y: y.pow(2).sum(),
        lambda xp, xd: (emb.weight.grad, dense.weight.grad[emb.vocab_start:emb.vocab_end]))))
    dense = nn.Linear(d, vocab, bias=False)
    rows.append(("ParallelLMHead", *_compare(dense, ParallelLMHead.from_dense(dense), torch.randn(4, d),
                                             lambda y: F.log_softmax(y, -1).sum(), input_grads)))

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
