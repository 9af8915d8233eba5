"""Autograd-correct entries and exits of a tensor-parallel region (Megatron's four mappings).

Each forward collective is paired with its adjoint in backward, so gradients through the
parallel layers equal the dense model's:

=====================  ===========================  ===========================
function               forward                      backward
=====================  ===========================  ===========================
copy_to_tp_region      identity                     all-reduce (sum)
reduce_from_tp_region  all-reduce (sum)             identity
gather_from_tp_region  all-gather along ``dim``     keep this rank's slice
scatter_to_tp_region   keep this rank's slice       all-gather along ``dim``
=====================  ===========================  ===========================
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import comm


def _my_slice(x: torch.Tensor, dim: int, sizes: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    rank = comm.group_rank(group)
    if sum(sizes) != x.shape[dim]:
        raise ValueError(
            f"cannot split a tensor of size {x.shape[dim]} along dim {dim} into pieces {sizes}: "
            f"the input's last dimension does not match the layer's in_features"
        )
    return x.narrow(dim, sum(sizes[:rank]), sizes[rank]).contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return comm.all_reduce_sum(grad.contiguous().clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return comm.all_reduce_sum(x.contiguous().clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, sizes, group):
        ctx.dim, ctx.sizes, ctx.group = dim, sizes, group
        return comm.all_gather(x, dim, group, sizes)

    @staticmethod
    def backward(ctx, grad):
        return _my_slice(grad, ctx.dim, ctx.sizes, ctx.group), None, None, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, sizes, group):
        ctx.dim, ctx.sizes, ctx.group = dim, sizes, group
        return _my_slice(x, dim, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather(grad, ctx.dim, ctx.group, ctx.sizes), None, None, None


class _SumSharedRows(torch.autograd.Function):
    """Identity on a parameter whose rows ``start .. start+len`` other ranks hold too (KV heads
    shared when TP exceeds their count); backward sums each row's gradient over every rank that
    holds it, so each copy gets the dense model's gradient, not its own heads' part of it."""

    @staticmethod
    def forward(ctx, w, start, full_rows, group):
        ctx.start, ctx.full_rows, ctx.group = start, full_rows, group
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        full = grad.new_zeros((ctx.full_rows, *grad.shape[1:]))
        full[ctx.start:ctx.start + grad.shape[0]] = grad
        comm.all_reduce_sum(full, ctx.group)
        return full[ctx.start:ctx.start + grad.shape[0]], None, None, None


def sum_shared_rows(w: torch.Tensor, start: int, full_rows: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``w`` as it is, its gradient summed over the ranks holding the same rows (see ``_SumSharedRows``)."""
    group = comm.get_group(group)
    return _SumSharedRows.apply(w, start, full_rows, group) if comm.group_size(group) > 1 and _tracked(w) else w


def _tracked(x: torch.Tensor) -> bool:
    """Whether autograd must see this step: without a gradient to carry, each mapping is just
    its forward collective (the Function machinery costs ~30 us a call, 150 calls a decode step)."""
    return torch.is_grad_enabled() and x.requires_grad


def copy_to_tp_region(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    group = comm.get_group(group)
    return _CopyToTP.apply(x, group) if comm.group_size(group) > 1 and _tracked(x) else x


def reduce_from_tp_region(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    group = comm.get_group(group)
    if comm.group_size(group) == 1:
        return x
    return _ReduceFromTP.apply(x, group) if _tracked(x) else comm.all_reduce_sum(x.contiguous().clone(), group)


def gather_from_tp_region(x: torch.Tensor, sizes: list[int], dim: int = -1, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    group = comm.get_group(group)
    if comm.group_size(group) == 1:
        return x
    if not _tracked(x):
        return comm.all_gather(x, dim % x.dim(), group, list(sizes))
    return _GatherFromTP.apply(x, dim % x.dim(), list(sizes), group)


def scatter_to_tp_region(x: torch.Tensor, sizes: list[int], dim: int = -1, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    group = comm.get_group(group)
    if comm.group_size(group) == 1:
        return x
    if not _tracked(x):
        return _my_slice(x, dim % x.dim(), list(sizes), group)
    return _ScatterToTP.apply(x, dim % x.dim(), list(sizes), group)
