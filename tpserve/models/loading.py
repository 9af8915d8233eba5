"""Build a model on the meta device and fill this rank's shards from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from tpserve.checkpoint.safetensors_io import CheckpointError, open_checkpoint
from tpserve.parallel import get_group, group_rank, matvec
from tpserve.parallel.agree import describe, gather_agreed
from tpserve.parallel.layers import load_shard
from tpserve.parallel.quantize import (
    check_quantization,
    checkpoint_quantization,
    prepare,
    q8_embedding,
    quantize_head_int8,
    quantize_int8,
    quantize_q4,
)
from tpserve.utils.dtypes import MODEL_DTYPE_NAMES
from tpserve.utils.hugepages import pack_on_huge_pages
from tpserve.utils.threads import run_in_threads

from . import fused
from .registry import load_config, model_class


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA device; use device='cpu'")
    return device


def checkpoint_dtype(config) -> torch.dtype | None:
    """The dtype config.json says the weights are stored in (``dtype`` or ``torch_dtype``), if any."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    return MODEL_DTYPE_NAMES.get(str(value).removeprefix("torch.")) if value else None


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, config=None) -> torch.dtype:
    """"auto" (or None): bfloat16 on CUDA; on CPU the checkpoint's own dtype (``config``) where
    this CPU computes it at full speed, which for bfloat16 means AVX512-BF16 and tpserve's decode
    kernel (``parallel.matvec``), else float32. So a bf16 checkpoint is not doubled in memory
    where bf16 is fast, and is never made slower than fp32 where it is not."""
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16
        stored = checkpoint_dtype(config) if config is not None else None
        return torch.bfloat16 if stored == torch.bfloat16 and matvec.native_bf16() else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in MODEL_DTYPE_NAMES:
        raise ValueError(f"dtype={dtype!r} is not supported; use auto, float32, bfloat16 or float16")
    return MODEL_DTYPE_NAMES[dtype]


def _loader_of(model: nn.Module, name: str):
    """The owning module's weight_loader (parameters lose their attribute when they leave meta)."""
    owner = model.get_submodule(name.rpartition(".")[0])
    return getattr(owner, "weight_loader", None)


def load_weights(model: nn.Module, path: str | Path, group: dist.ProcessGroup | None = None,
                 threads: int = 8, progress: bool = True) -> int:
    """Fill every parameter of ``model`` with this rank's slice from the checkpoint at ``path``.

    All ranks agree on failure: if any rank hits an error, every rank raises it, so none is
    left waiting in a collective. Returns the bytes this rank read.
    """
    from tpserve.checkpoint.load import load_sharded_weights
    from tpserve.checkpoint.sharded import is_checkpoint

    if is_checkpoint(path):  # a tpserve sharded checkpoint: the rank's own file, or a reshard
        return load_sharded_weights(model, path, group, threads, progress)
    group = get_group(group)
    rank = group_rank(group)
    failure, nbytes = None, 0
    try:
        nbytes = _load_local(model, path, threads, progress and rank == 0)
    except Exception as exc:  # any failure must reach the other ranks, or they wait in the collective below
        failure = describe(exc)
    gather_agreed(None, failure, group, CheckpointError)
    return nbytes


def _load_local(model: nn.Module, path: str | Path, threads: int, progress: bool) -> int:
    refs = open_checkpoint(path)
    tasks = []
    for name, param in model.named_parameters():  # tied weights appear once, under the first name
        ref = refs.get(name)
        if ref is None:
            where = sorted({str(r.path.name) for r in refs.values()})
            raise CheckpointError(f"{path}: tensor {name} is missing from the checkpoint (files: {', '.join(where)})")
        tasks.append((name, param, ref, _loader_of(model, name)))
    total = sum(p.numel() * ref.dtype.itemsize for _, p, ref, _ in tasks)

    def run(task, advance) -> int:
        name, param, ref, loader = task
        try:
            if loader is not None:
                loader(param, ref)
            else:
                load_shard(param, ref, None, name=name)
        except CheckpointError:
            raise
        except (ValueError, OSError) as exc:
            raise CheckpointError(f"{ref.path}: tensor {name}: {exc}") from None
        n = param.numel() * ref.dtype.itemsize
        advance(n)
        return n

    return sum(run_in_threads(run, tasks, threads, total=total, desc="loading shards", progress=progress))


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Give every meta parameter real, uninitialised memory on ``device`` (tied ones stay tied).

    Not ``Module.to_empty``: on meta tensors that goes through torch's reference ops and imports
    sympy, about a second per rank, longer than reading a small model's shard.
    """
    done: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in done:
                    done[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                               requires_grad=p.requires_grad)
                mod._parameters[name] = done[id(p)]
    model.tie_weights()


def use_decode_layout(model: nn.Module) -> None:
    """Store every linear weight transposed ([in, out] in memory, still [out, in] to PyTorch).

    Batch-1 decode on CPU is a matrix-vector product per weight. For wide outputs (more rows than
    columns: the MLP's gate/up and the LM head) this storage streams the weight in the order the
    vector kernel reads it, measured ~1.9x faster on these machines (12 -> 23 GB/s for the 113 MB
    LM head, 11 -> 18 GB/s for gate/up); for square and narrow weights it was no faster or
    slower, so those keep the usual layout. Prefill-sized matmuls are unaffected.
    Call before loading: the loaders write into whatever layout the parameters have.
    """
    from tpserve.parallel import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding

    # a tied LM head is the embedding's weight: transpose that one (lookups barely notice)
    kinds = (ColumnParallelLinear, RowParallelLinear,
             VocabParallelEmbedding if model.spec.tie_word_embeddings else ParallelLMHead)
    for mod in model.modules():
        if isinstance(mod, kinds) and mod.weight.shape[0] > mod.weight.shape[1]:
            w = mod.weight
            mod.weight = nn.Parameter(torch.empty(w.shape[::-1], dtype=w.dtype, device=w.device).t(),
                                      requires_grad=w.requires_grad)
    model.tie_weights()


def load_model(path: str | Path, dtype: str | torch.dtype | None = "auto", device: str | torch.device | None = None,
               group: dist.ProcessGroup | None = None, progress: bool = True, decode_layout: bool = False,
               compile: bool = False, quantization: str | None = None) -> nn.Module:
    """This rank's shard of the model at ``path``, ready for inference.

    Call inside an initialised process group (torchrun + ``tpserve.parallel.init_distributed()``);
    every rank of the group must call it. The model is built on the meta device, so no rank ever
    allocates more than its own shard. ``decode_layout`` stores weights for fast CPU decode
    (see :func:`use_decode_layout`); the engine turns it on for CPU. ``compile`` readies the
    compiled decode step (``compile_decode``) instead, whose reductions want the usual layout,
    so it overrides ``decode_layout``. ``quantization="int8"``: every linear layer is stored as int8
    with one scale per output row (``parallel.quantize``), after loading; the LM head keeps its
    float weight (what is saved) and multiplies with an int8 copy;
    ``"q4"``: as 4-bit groups of 32. A checkpoint saved quantized (its config.json's
    ``quantization_config``, a GGUF file's 4-bit layers among them) loads its quantized weights
    as they are, at any TP degree that keeps whole groups.
    """
    group = get_group(group)
    path = Path(path)
    config = load_config(path)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device, config)
    quantization = check_quantization(quantization)
    stored = checkpoint_quantization(config)  # a quantized checkpoint loads as it was saved
    if device.type == "cpu":
        fused.extension()  # built (or loaded) now, not inside a step
    cls = model_class(config)
    with torch.device("meta"):
        model = cls(config, group=group, dtype=dtype)
    _materialize(model, device)
    if decode_layout and not compile and not (dtype == torch.bfloat16 and matvec.bf16_kernel()):
        use_decode_layout(model)  # (bf16's own kernel reads the usual layout)
    if stored:
        prepare(model, stored, q8_embedding(config))
        model.tie_weights()
    model.init_buffers(device)
    load_weights(model, path, group, progress=progress)
    if quantization and not stored:
        (quantize_int8 if quantization == "int8" else quantize_q4)(model)
    quantize_head_int8(model, float_heads=(stored or quantization) == "int8")
    model.eval().requires_grad_(False)
    if hasattr(model, "fuse_projections"):
        model.fuse_projections()
    if device.type == "cpu":
        pack_on_huge_pages(model)  # after every step above that makes new tensors
    model.source_path = path
    model.quantization = stored or quantization
    if compile:
        model.compile_decode()
    return model
