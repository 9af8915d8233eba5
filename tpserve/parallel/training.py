"""Training helpers that must know how parameters are cut: the gradient norm and its clipping.

``torch.nn.utils.clip_grad_norm_`` on a tensor-parallel model sees only this rank's shards, so
every rank computes a different, too small norm and clips differently from the dense model.
Here each sharded parameter's squares are summed over the group, each row counted once (KV heads
that several ranks hold belong to the lowest of them), and replicated parameters (norms,
row-parallel biases, unsplit embeddings) are counted once, not once per rank.
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from . import comm
from .layers import _TPModule
from .shards import param_shards


@dataclass(frozen=True)
class _Part:
    """How one parameter's gradient enters the norm on this rank."""

    name: str
    param: nn.Parameter
    sharded: bool  # False: the same on every rank, counted once
    dim: int | None  # with ``owned``: the dimension it indexes
    owned: torch.Tensor | None  # local indices this rank counts (None: all of them)


_plans: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], list[_Part]]]" = weakref.WeakKeyDictionary()


def model_group(model: nn.Module, group: dist.ProcessGroup | None = None) -> dist.ProcessGroup:
    """``group``, else the group the model's parallel layers were cut over, else the default group."""
    if group is not None:
        return comm.get_group(group)
    own = getattr(model, "group", None)
    if own is None:
        own = next((m.group for m in model.modules() if isinstance(m, _TPModule)), None)
    return comm.get_group(own)


def _owned(rank: int, ranges: list[tuple[int | None, int, int]]) -> torch.Tensor | None:
    """Local indices of rank ``rank``'s range that no lower rank holds; None when it owns all."""
    dim, start, end = ranges[rank]
    mine = torch.ones(end - start, dtype=torch.bool)
    for d, s, e in ranges[:rank]:
        lo, hi = max(s, start), min(e, end)
        if d == dim and lo < hi:
            mine[lo - start:hi - start] = False
    return None if bool(mine.all()) else mine.nonzero()[:, 0]


def norm_plan(model: nn.Module, group: dist.ProcessGroup) -> list[_Part]:
    """Each trainable parameter's part in the norm; asks the peers for their cuts once per model."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    key = tuple(id(p) for _, p in params)
    cached = _plans.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    shards = param_shards(model)
    mine = {n: (shards[n].dim, shards[n].start, shards[n].end) for n, _ in params}
    world, rank = comm.group_size(group), comm.group_rank(group)
    every = comm.all_gather_object(mine, group) if world > 1 else [mine]
    parts = []
    for name, p in params:
        cuts = [r.get(name) for r in every]
        if any(c is None for c in cuts):
            raise RuntimeError(f"clip_grad_norm_: parameter {name} is trainable on some ranks only; every rank must "
                               f"hold the same model with the same requires_grad flags")
        sharded = cuts[0][0] is not None
        parts.append(_Part(name, p, sharded, cuts[rank][0], _owned(rank, cuts) if sharded else None))
    _plans[model] = (key, parts)
    return parts


def _part_grad(part: _Part) -> torch.Tensor:
    g = part.param.grad.detach()
    return g if part.owned is None else g.index_select(part.dim, part.owned.to(g.device))


def check_replicated_grads(model: nn.Module, group: dist.ProcessGroup | None = None, rtol: float = 1e-4) -> None:
    """Raise if a replicated parameter's gradient differs between ranks (a missing all-reduce in
    a custom layer, say): compares each one's sum, absolute sum and largest entry."""
    group = model_group(model, group)
    if comm.group_size(group) == 1:
        return
    parts = [p for p in norm_plan(model, group) if not p.sharded and p.param.grad is not None]
    if not parts:
        return
    stats = torch.stack([torch.stack([g.sum(), g.abs().sum(), g.abs().max()]) for g in
                         (p.param.grad.detach().double().cpu() for p in parts)])
    every = comm.all_gather(stats.to(comm.comm_device(group))[None], 0, group, [1] * comm.group_size(group)).cpu()
    diff = (every - every[:1]).abs().amax(0)
    bad = diff > rtol * every[:1].abs()[0].clamp_min(1e-12)
    if bool(bad.any()):
        i = int(bad.any(1).nonzero()[0, 0])
        far = int((every[:, i] - every[0, i]).abs().amax(1).argmax())
        raise RuntimeError(f"the gradient of replicated parameter {parts[i].name} differs between rank 0 and rank "
                           f"{far} (sum {every[0, i, 0].item():.6g} against {every[far, i, 0].item():.6g}): the model "
                           f"has a replicated parameter whose gradient is not all-reduced, or ranks saw different "
                           f"inputs")


def grad_norm(model: nn.Module, norm_type: float = 2.0, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The norm of all of ``model``'s gradients, as the dense model would compute it; the same,
    bit for bit, on every rank (peers' pieces are summed in rank order)."""
    group = model_group(model, group)
    norm_type = float(norm_type)
    parts = [p for p in norm_plan(model, group) if p.param.grad is not None]
    inf = math.isinf(norm_type)
    device = parts[0].param.grad.device if parts else torch.device("cpu")

    def combine(grads: list[torch.Tensor]) -> torch.Tensor:
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=device)
        norms = torch.stack([torch.linalg.vector_norm(g.double(), norm_type) for g in grads])
        return norms.max() if inf else (norms ** norm_type).sum()

    local = combine([_part_grad(p) for p in parts if p.sharded])
    replicated = combine([p.param.grad.detach() for p in parts if not p.sharded])
    world = comm.group_size(group)
    if world > 1:
        cd = comm.comm_device(group)
        every = comm.all_gather(local.reshape(1).to(cd), 0, group, [1] * world).to(device)
        local = every.max() if inf else every.sum()
    total = torch.maximum(local, replicated) if inf else (local + replicated) ** (1.0 / norm_type)
    return total.float()


def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0,
                    group: dist.ProcessGroup | None = None, error_if_nonfinite: bool = False,
                    check_replicated: bool | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a tensor-parallel model (native or ``parallelize()``d):
    scales every gradient in place by ``max_norm / (total_norm + 1e-6)`` when that is below 1 and
    returns the total norm, which equals the dense model's. Call it on every rank of the group.

    ``error_if_nonfinite``: raise instead of scaling when the norm is nan or inf (it is the same
    on every rank, so every rank raises). ``check_replicated`` (default: ``TPSERVE_CHECK_GRADS=1``)
    first checks that replicated parameters' gradients agree across ranks."""
    group = model_group(model, group)
    if check_replicated if check_replicated is not None else os.environ.get("TPSERVE_CHECK_GRADS") == "1":
        check_replicated_grads(model, group)
    total = grad_norm(model, norm_type, group)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(f"the total gradient norm (order {float(norm_type)}) is {total.item()}, so it cannot be "
                           f"clipped; lower the learning rate or check the loss, or pass error_if_nonfinite=False to "
                           f"scale the gradients by it anyway (as torch does)")
    coef = (float(max_norm) / (total.double() + 1e-6)).clamp(max=1.0)
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
    return total
