"""Column-, row- and vocabulary-parallel layers.

Naming follows Megatron and vLLM: a *column*-parallel linear splits its output dimension, a
*row*-parallel linear splits its input dimension, all-reduces, and adds its bias once.
Every parameter carries a ``weight_loader(param, full)`` that copies this rank's slice out of
the full tensor, so loaders never need to know how a layer is split. ``full`` may be a tensor or
a lazy safetensors slice: only this rank's rows or columns are read from it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import comm, matvec
from .partition import partition_range, partition_sizes
from .regions import (
    copy_to_tp_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    scatter_to_tp_region,
    sum_shared_rows,
)


def _shape_of(full) -> tuple[int, ...]:
    return tuple(full.get_shape()) if hasattr(full, "get_shape") else tuple(full.shape)


def load_shard(param: torch.Tensor, full, dim: int | None, start: int = 0, end: int = 0, name: str = "parameter",
               full_size: int | None = None) -> None:
    """Copy ``full[start:end]`` along ``dim`` (or all of ``full`` when ``dim`` is None) into ``param``.

    ``full`` must have the whole layer's shape: ``param``'s shape with ``full_size`` along ``dim``.
    Only the slice is read: a lazy checkpoint tensor reads just those bytes.
    """
    shape = _shape_of(full)
    want = list(param.shape)
    if dim is not None:
        want[dim] = full_size if full_size is not None else max(end, shape[dim] if len(shape) > dim else end)
    if list(shape) != want:
        raise ValueError(f"{name}: checkpoint tensor has shape {list(shape)}, the model expects {want} "
                         f"(does config.json match the weights?)")
    if hasattr(full, "read_into"):  # a lazy checkpoint tensor: ranged read straight into param
        full.read_into(param.data, dim, start, end)
        return
    if dim is None:
        piece = full[...] if hasattr(full, "get_shape") else full
    else:
        index = [slice(None)] * len(shape)
        index[dim] = slice(start, end)
        piece = full[tuple(index)]
    with torch.no_grad():
        param.copy_(piece)


REDUCE_ROWS = 4  # up to this many rows a compiled reduction beat MKL's sgemm (measured at 1, 2, 4, 8)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           scale: torch.Tensor | None = None, float_out: bool = False, minv: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, by the fastest path for the weight's dtype and the number of rows.

    - A 4-bit weight (uint8, two values a byte; ``scale`` and ``minv`` per row and group of 32,
      ``matvec.q4_linear``), an int8 weight (``scale``: one per output row, or per row and group
      of 32 for GGUF's Q8_0, ``matvec.q8_linear``) and, on CPUs with AVX-512, a bf16 weight
      (``matvec.bf16_linear``: a few rows, or up to 64 without AVX512-BF16) go through
      ``matvec``'s kernels, which stream the weight at memory speed where torch's products
      reach about half of it.
    - Otherwise, inside ``torch.compile`` on CPU with at most ``REDUCE_ROWS`` rows is written as
      multiply-and-sum, which inductor turns into one reduction kernel that streams the weight
      at memory speed: 22-27 GB/s against 11-16 GB/s for MKL's matrix-vector product on AMD
      CPUs (``benchmarks/generate.py`` shows the effect).
    - Everything else (prefill, CUDA) keeps the BLAS matmul, the right tool for many rows.

    ``float_out``: the kernels give float32 results, unrounded: for a partial sum that an
    all-reduce adds up (rounded once after it, as TP = 1 rounds once), and for logits (bf16's
    coarse grid, 1/16 at 10, makes ties that float32 logits do not have).
    """
    kind = matvec.weight_kind(weight, scale)
    if kind == "q4":
        return matvec.q4_linear(x, weight, scale, minv, bias, float_out)
    if kind == "q8":  # int8 with a scale per row and group of 32
        return matvec.q8_linear(x, weight, scale, bias, float_out)
    if kind == "int8":
        return matvec.int8_linear(x, weight, scale, bias, float_out)
    if kind == "bf16":
        y = matvec.bf16_linear(x, weight, bias, float_out)
        if y is not None:
            return y
    if torch.compiler.is_compiling() and x.device.type == "cpu" and math.prod(x.shape[:-1]) <= REDUCE_ROWS:
        y = (x.unsqueeze(-2) * weight).sum(-1)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def _init_linear(weight: torch.Tensor, bias: torch.Tensor | None, fan_in: int) -> None:
    """nn.Linear's default init, with the fan-in of the whole (unsplit) layer.

    It draws from the global RNG, and shards differ in size, so ranks' RNG streams part ways
    after it: pass ``init=False`` when weights will be loaded anyway (``from_dense`` does).
    """
    if weight.is_meta:
        return
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        weight.uniform_(-bound, bound)
        if bias is not None:
            bias.uniform_(-bound, bound)


class _TPModule(nn.Module):
    def __init__(self, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.group = comm.get_group(group)
        self.tp_rank = comm.group_rank(self.group)
        self.tp_size = comm.group_size(self.group)

    def __deepcopy__(self, memo: dict) -> "_TPModule":
        """A copy with its own tensors over the same process group (a group cannot be copied)."""
        memo.setdefault(id(self.group), self.group)
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def shard_of(self, param: torch.Tensor) -> tuple[int | None, int, int, int]:
        """``(dim, start, end, full_size)``: which slice of the full tensor ``param`` holds
        (``dim`` None: all of it). The one place each layer states how it is cut; loading,
        saving and resharding all ask it."""
        raise NotImplementedError

    @classmethod
    def from_dense(cls, module: nn.Module, **kwargs):
        """This rank's shard of a full ``nn.Linear`` / ``nn.Embedding`` that every rank holds."""
        kwargs.setdefault("device", module.weight.device)
        kwargs.setdefault("dtype", module.weight.dtype)
        kwargs.setdefault("init", False)
        layer = cls(*cls._dense_args(module), **kwargs)
        for name in ("weight", "bias"):
            full = getattr(module, name, None)
            if full is not None:
                layer.weight_loader(getattr(layer, name), full.detach())
        return layer

    def weight_loader(self, param: nn.Parameter, full) -> None:
        dim, start, end, full_size = self.shard_of(param)
        kind = "bias" if param is getattr(self, "bias", None) else "weight"
        load_shard(param, full, dim, start, end, f"{type(self).__name__} {kind}", full_size)


class ColumnParallelLinear(_TPModule):
    """``y = x W^T + b`` with W's rows (output features) split over the TP group.

    ``unit`` keeps whole attention heads together; ``out_range`` overrides this rank's rows
    (used for KV heads that several ranks share), in which case the output cannot be gathered.
    ``rows_shared``: some ranks' ``out_range`` overlap (the caller knows every rank's, and says
    so on all of them), so in training each row's gradient is summed over the ranks holding it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False, *,
                 unit: int = 1, out_range: tuple[int, int] | None = None, group: dist.ProcessGroup | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, init: bool = True,
                 rows_shared: bool = False) -> None:
        super().__init__(group)
        self.rows_shared = rows_shared
        self.in_features, self.out_features, self.gather_output = in_features, out_features, gather_output
        what = f"out_features of ColumnParallelLinear({in_features}, {out_features})"
        self.out_sizes = partition_sizes(out_features, self.tp_size, unit, what)
        if out_range is None:
            out_range = partition_range(out_features, self.tp_size, self.tp_rank, unit, what)
        elif gather_output:
            raise ValueError("ColumnParallelLinear: gather_output=True needs the standard partition, not an explicit out_range")
        elif not 0 <= out_range[0] < out_range[1] <= out_features:
            raise ValueError(f"ColumnParallelLinear: out_range {out_range} is outside 0..{out_features}")
        self.out_start, self.out_end = out_range
        local = self.out_end - self.out_start
        self.weight = nn.Parameter(torch.empty(local, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(local, device=device, dtype=dtype)) if bias else None
        self.register_buffer("weight_scale", None)  # quantized weights' scales (parallel.quantize)
        self.register_buffer("weight_min", None)  # and 4-bit weights' group minimums
        for p in self.parameters():
            p.weight_loader = self.weight_loader
        if init:
            _init_linear(self.weight, self.bias, in_features)

    def shard_of(self, param: torch.Tensor) -> tuple[int | None, int, int, int]:
        return 0, self.out_start, self.out_end, self.out_features  # weight, bias, scales and mins: by row

    def forward(self, x: torch.Tensor, gather_output: bool | None = None) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if self.rows_shared and torch.is_grad_enabled() and weight.requires_grad:  # training only
            weight = sum_shared_rows(weight, self.out_start, self.out_features, self.group)
            bias = None if bias is None else sum_shared_rows(bias, self.out_start, self.out_features, self.group)
        y = linear(copy_to_tp_region(x, self.group), weight, bias, self.weight_scale, minv=self.weight_min)
        if self.gather_output if gather_output is None else gather_output:
            y = gather_from_tp_region(y, self.out_sizes, -1, self.group)
        return y

    @staticmethod
    def _dense_args(module: nn.Linear) -> tuple:
        return module.in_features, module.out_features, module.bias is not None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(rank {self.tp_rank}: rows {self.out_start}:{self.out_end}), gather_output={self.gather_output}")


def fuse_columns(mods: list[ColumnParallelLinear]) -> tuple | None:
    """One product for several column-parallel layers of the same input (q/k/v, gate/up), for
    inference, as nano-vllm's merged layers give: ``(weight, bias, scale, min, sizes)`` for
    :func:`fused_forward`, or None where they cannot share one (dtypes or layouts differ). Each
    layer's parameters become row views of the fused tensors, so loading, saving and ``shard_of``
    see what they saw before, and a load into the layers writes the fused tensors too."""
    names = ("weight", "bias", "weight_scale", "weight_min")
    first = mods[0]
    for m in mods:
        for name in names:
            a, b = getattr(m, name), getattr(first, name)
            if (a is None) != (b is None) or (a is not None and (a.dtype != b.dtype or a.shape[1:] != b.shape[1:]
                                                                  or not a.is_contiguous() or a.requires_grad)):
                return None
        if m.gather_output or m.weight.is_meta:
            return None
    fused = []
    for name in names:
        parts = [getattr(m, name) for m in mods]
        if parts[0] is None:
            fused.append(None)
            continue
        whole = torch.cat([p.detach() for p in parts], dim=0)
        start = 0
        for m, p in zip(mods, parts):
            view = nn.Parameter(whole[start:start + p.shape[0]], requires_grad=False)
            view.weight_loader = m.weight_loader
            setattr(m, name, view)
            start += p.shape[0]
        fused.append(whole)
    return (*fused, [m.weight.shape[0] for m in mods])


def fused_forward(x: torch.Tensor, fused: tuple) -> torch.Tensor:
    """The outputs of the layers :func:`fuse_columns` merged, from one product, side by side
    along the last dimension (``fused[-1]`` gives their widths)."""
    weight, bias, scale, minv, _ = fused
    return linear(x, weight, bias, scale, minv=minv)


def finish_rows(y: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None, group: dist.ProcessGroup,
                reduce: bool, total: Callable[[torch.Tensor], torch.Tensor] | None = None,
                rounded: bool = True) -> torch.Tensor:
    """A row-parallel product ``y`` made the layer's output, for inference: with ``reduce``, its
    float32 partial sums are summed over ``group`` in place (no copy; by ``total``, the group's
    ``comm.summer``, where the caller has one) and rounded once to ``dtype``, as TP = 1 rounds
    once; then the bias, held whole on every rank, is added once. ``rounded=False`` leaves a sum
    without bias in float32, for a consumer that rounds it itself (``fused.add_rms_norm``)."""
    if reduce:
        if total is None:
            comm.all_reduce_sum(y, group)
        else:
            total(y)
        if bias is None and not rounded:
            return y
        y = y.to(dtype)
    return y + bias if bias is not None else y


class RowParallelLinear(_TPModule):
    """``y = x W^T + b`` with W's columns (input features) split; partial sums are all-reduced
    and the bias, held whole on every rank, is added once after the reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = True, *,
                 unit: int = 1, group: dist.ProcessGroup | None = None, reduce_output: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, init: bool = True) -> None:
        super().__init__(group)
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.reduce_output = input_is_parallel, reduce_output
        what = f"in_features of RowParallelLinear({in_features}, {out_features})"
        self.in_sizes = partition_sizes(in_features, self.tp_size, unit, what)
        self.in_start, self.in_end = partition_range(in_features, self.tp_size, self.tp_rank, unit, what)
        self.weight = nn.Parameter(torch.empty(out_features, self.in_end - self.in_start, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer("weight_scale", None)  # quantized weights' scales (parallel.quantize)
        self.register_buffer("weight_min", None)  # and 4-bit weights' group minimums
        for p in self.parameters():
            p.weight_loader = self.weight_loader
        if init:
            _init_linear(self.weight, self.bias, in_features)

    def shard_of(self, param: torch.Tensor) -> tuple[int | None, int, int, int]:
        packed = self.weight.dtype is torch.uint8  # 4-bit: two inputs a byte, a scale and min per 32 inputs
        if param is self.bias or (param is self.weight_scale and not packed):  # whole (an int8 scale covers a row)
            return None, 0, self.out_features, self.out_features
        if not packed:
            return 1, self.in_start, self.in_end, self.in_features
        if self.in_start % matvec.Q4_GROUP or self.in_end % matvec.Q4_GROUP:
            raise ValueError(f"RowParallelLinear({self.in_features}, {self.out_features}) with 4-bit weights: "
                             f"rank {self.tp_rank} holds inputs {self.in_start}:{self.in_end}, which do not start and "
                             f"end on {matvec.Q4_GROUP}-input group boundaries; choose another TP degree or a dense "
                             f"dtype (--dtype float32 / bfloat16)")
        per = 2 if param is self.weight else matvec.Q4_GROUP  # columns of the full layer per stored column
        return 1, self.in_start // per, self.in_end // per, self.in_features // per

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.in_sizes, -1, self.group)
        elif x.shape[-1] != self.in_end - self.in_start:
            raise ValueError(
                f"RowParallelLinear on rank {self.tp_rank} expects this rank's {self.in_end - self.in_start} input features, "
                f"got {x.shape[-1]}; pass input_is_parallel=False to give it the full input"
            )
        reduce = self.reduce_output and self.tp_size > 1
        y = linear(x, self.weight, None, self.weight_scale, float_out=reduce, minv=self.weight_min)
        if reduce and torch.is_grad_enabled() and (y.requires_grad or x.requires_grad):
            y = reduce_from_tp_region(y, self.group).to(x.dtype)
            return y + self.bias if self.bias is not None else y
        return finish_rows(y, x.dtype, self.bias, self.group, reduce)

    _dense_args = ColumnParallelLinear._dense_args

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (rank {self.tp_rank}: cols {self.in_start}:{self.in_end}), "
                f"out_features={self.out_features}, input_is_parallel={self.input_is_parallel}")


class VocabParallelEmbedding(_TPModule):
    """Embedding table split by vocabulary rows; ids outside this rank's range give zeros,
    and the all-reduce fills each position from the rank that owns its id."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, group: dist.ProcessGroup | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, init: bool = True) -> None:
        super().__init__(group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        what = f"vocabulary of VocabParallelEmbedding({num_embeddings}, {embedding_dim})"
        self.vocab_sizes = partition_sizes(num_embeddings, self.tp_size, 1, what)
        self.vocab_start, self.vocab_end = partition_range(num_embeddings, self.tp_size, self.tp_rank, 1, what)
        self.weight = nn.Parameter(torch.empty(self.vocab_end - self.vocab_start, embedding_dim, device=device, dtype=dtype))
        self.weight.weight_loader = self.weight_loader
        # int8 rows with a float16 scale per group of 32 (GGUF's Q8_0, parallel.quantize), which
        # lookups dequantize to ``out_dtype``
        self.register_buffer("weight_scale", None)
        self.out_dtype = dtype or torch.get_default_dtype()
        if init and not self.weight.is_meta:
            nn.init.normal_(self.weight)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of this rank's table (dequantized when it holds int8 groups)."""
        if self.weight_scale is None:
            return F.embedding(ids, self.weight)
        return matvec.dequantize_q8(F.embedding(ids, self.weight), F.embedding(ids, self.weight_scale), self.out_dtype)

    def shard_of(self, param: torch.Tensor) -> tuple[int | None, int, int, int]:
        return 0, self.vocab_start, self.vocab_end, self.num_embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(
                f"token id out of range: ids span {int(ids.min())}..{int(ids.max())} but the vocabulary has "
                f"{self.num_embeddings} entries"
            )
        if self.tp_size == 1:
            return self.lookup(ids)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = self.lookup(local).masked_fill(outside.unsqueeze(-1), 0.0)
        if torch.is_grad_enabled() and out.requires_grad:
            return reduce_from_tp_region(out, self.group)
        return comm.all_reduce_sum(out, self.group)

    @staticmethod
    def _dense_args(module: nn.Embedding) -> tuple:
        return module.num_embeddings, module.embedding_dim

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim} "
                f"(rank {self.tp_rank}: ids {self.vocab_start}:{self.vocab_end})")


def vocab_argmax(logits: torch.Tensor, start: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``argmax`` over the whole vocabulary of logits split by vocabulary (this rank's slice
    begins at id ``start``), on every rank: each rank's best value and id meet in one tiny
    gather instead of every logit. Ties go to the lowest id, as ``torch.argmax``'s do."""
    best, idx = matvec.row_max(logits.detach().float())  # the first of equal maxima
    mine = torch.stack([best.double(), (idx + start).double()], dim=-1)[None]  # ids are exact in float64
    world = comm.group_size(group)
    every = comm.all_gather(mine, dim=0, group=group, sizes=[1] * world)  # [world, ..., 2]
    rank = every[..., 0].argmax(0, keepdim=True)  # the first rank with the maximum holds the lowest id
    return every[..., 1].gather(0, rank)[0].long()


def vocab_logprobs(logits: torch.Tensor, targets: torch.Tensor, k: int, start: int,
                   group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, ...] | None:
    """Log-probabilities of ``targets`` [rows] under logits split by vocabulary (this rank's slice
    [rows, local vocab] begins at id ``start``), their ranks (1: the most likely), and the ``k``
    most likely ids with theirs, on group-rank 0 (others None). Each rank sends only its maximum,
    its sum of exponentials, its count above the target and its own top k, never its logits."""
    x = logits.detach().float()
    rows, width = x.shape
    local = targets.to(x.device) - start
    inside = (local >= 0) & (local < width)
    picked = x.gather(1, local.clamp(0, width - 1)[:, None])[:, 0]
    picked = torch.where(inside, picked, torch.full_like(picked, float("-inf")))
    world = comm.group_size(group)
    if world > 1:  # every rank needs the target's logit to count the logits above it
        picked = comm.all_gather(picked[None], dim=0, group=group, sizes=[1] * world).max(0).values
    top = x.topk(min(k, width), dim=-1) if k else None
    biggest = x.max(-1).values
    pieces = [biggest[:, None].double(), (x - biggest[:, None]).exp().sum(-1, keepdim=True).double(),
              (x > picked[:, None]).sum(-1, keepdim=True).double()]
    if top is not None:
        pieces += [top.values.double(), (top.indices + start).double()]
    mine = torch.cat(pieces, dim=-1)[None]  # [1, rows, 3 + 2k]; ids are exact in float64
    every = comm.all_gather(mine, dim=0, group=group, sizes=[1] * world) if world > 1 else mine
    if comm.group_rank(group) != 0:
        return None
    m, sums, above = every[..., 0], every[..., 1], every[..., 2]
    most = m.max(0).values
    lse = most + (sums * (m - most).exp()).sum(0).log()
    logprob = (picked.double() - lse).float()
    rank = above.sum(0).long() + 1
    if top is None:
        return logprob, rank, torch.zeros(rows, 0, dtype=torch.long), torch.zeros(rows, 0)
    kk = top.values.shape[-1]
    vals = every[..., 3:3 + kk].permute(1, 0, 2).reshape(rows, -1)
    ids = every[..., 3 + kk:].permute(1, 0, 2).reshape(rows, -1)
    best = vals.topk(min(k, vals.shape[-1]), dim=-1)
    return logprob, rank, ids.gather(1, best.indices).long(), (best.values - lse[:, None]).float()


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection split by vocabulary, the same way as :class:`VocabParallelEmbedding`,
    so a tied head can share the embedding's shard.

    ``forward`` returns this rank's logits slice unless ``gather_output`` asks for the full
    vocabulary; ``gather_output="rank0"`` gathers them on group-rank 0 only (others get None),
    which is all that sampling on rank 0 needs; ``"argmax"`` gives every rank the index of the
    largest logit (:func:`vocab_argmax`), which is all that greedy decoding needs.
    """

    def __init__(self, embedding_dim: int, num_embeddings: int, bias: bool = False, gather_output: bool | str = True, *,
                 group: dist.ProcessGroup | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, init: bool = True) -> None:
        super().__init__(num_embeddings, embedding_dim, group=group, device=device, dtype=dtype, init=init)
        self.gather_output = gather_output
        # an int8 copy of the weight for decode (quantize.quantize_head_int8); never saved
        self.register_buffer("int8_weight", None, persistent=False)
        self.register_buffer("int8_scale", None, persistent=False)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.vocab_end - self.vocab_start, device=device, dtype=dtype))
            self.bias.weight_loader = self.weight_loader

    def tie_weights(self, embedding: VocabParallelEmbedding) -> None:
        """Share ``embedding``'s vocabulary shard (tied input and output embeddings)."""
        if (embedding.vocab_start, embedding.vocab_end, embedding.embedding_dim) != (self.vocab_start, self.vocab_end, self.embedding_dim):
            raise ValueError("cannot tie: the embedding and the LM head are split differently")
        self.weight = embedding.weight
        if embedding.weight_scale is not None:  # int8 groups (loading gives the head a per-row int8 copy to multiply with)
            self.weight_scale = embedding.weight_scale

    def forward(self, x: torch.Tensor, gather_output: bool | str | None = None) -> torch.Tensor | None:
        x = copy_to_tp_region(x, self.group)
        # a Q8_0 head keeps its own kernel past the int8 kernel's rows (the int8 copy would be
        # dequantized every step there)
        if self.int8_weight is not None and (self.weight_scale is None or matvec.int8_kernel_takes(x)):
            logits = linear(x, self.int8_weight, self.bias, self.int8_scale, float_out=True).float()
        else:
            logits = linear(x, self.weight, self.bias, self.weight_scale, float_out=True).float()
        return self.gather(logits, self.gather_output if gather_output is None else gather_output)

    def gather(self, logits: torch.Tensor, mode: bool | str) -> torch.Tensor | None:
        """This rank's logits slice turned into what ``mode`` asks for (see the class)."""
        if mode == "argmax":
            return vocab_argmax(logits, self.vocab_start, self.group)
        if not mode or self.tp_size == 1:
            return logits
        if mode == "rank0":
            return comm.gather_to_rank0(logits, self.vocab_sizes, self.group)
        return gather_from_tp_region(logits, self.vocab_sizes, -1, self.group)

    @staticmethod
    def _dense_args(module: nn.Linear | nn.Embedding) -> tuple:
        """From an ``nn.Linear(dim, vocab)`` head, or the ``nn.Embedding`` it is tied to."""
        vocab, dim = module.weight.shape
        return dim, vocab, getattr(module, "bias", None) is not None
