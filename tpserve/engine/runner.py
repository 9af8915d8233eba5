"""What every rank runs for the engine's commands, in lockstep (SPMD): the paged KV cache, and one
forward over a step's flattened tokens.

Rank 0 alone decides what a step holds (the scheduler) and sends it as plain lists; rank 0 alone
gets the logits (or, for greedy rows, each row's best token id, found from every rank's best
logit in one tiny gather), and the next step's command carries the chosen tokens, so the ranks
cannot diverge even when sampling is random.
"""

from __future__ import annotations

import math
import mmap
import os

import torch
from torch import nn

from tpserve.models import attention
from tpserve.parallel import all_gather_object, group_rank, matvec
from tpserve.parallel.layers import vocab_logprobs

BLOCK_SIZE = 16
DEFAULT_KV_FRACTION = 0.25  # of the memory free when the cache is made, split between the ranks on a host
DEFAULT_KV_CAP = 4 << 30  # per rank


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    w = model.model.norm.weight  # the compute dtype (linear weights and the embedding may be quantized)
    return w.device, w.dtype


def block_bytes(model: nn.Module, block_size: int) -> int:
    """This rank's bytes for one block of K and V over every layer."""
    _, dtype = _device_dtype(model)
    per_token = sum(2 * layer.self_attn.num_local_kv * layer.self_attn.head_dim for layer in model.model.layers)
    return per_token * block_size * dtype.itemsize


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info.get("MemAvailable", info.get("MemFree", 0))


def max_blocks(max_num_seqs: int, context: int, block_size: int) -> int:
    """More blocks than this cannot be used: every sequence at full context, twice over (the
    second half keeps finished prefixes for reuse)."""
    return 2 * max_num_seqs * -(-context // block_size)


def init_cache(model: nn.Module, memory: int | None, block_size: int, ranks_here: int, reserved: int = 0,
               most: int | None = None) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """Allocate this rank's blocks and agree with the other ranks on their number (the smallest
    any rank can hold). ``memory``: bytes per rank (None: a share of free memory, less what
    other engines in this process ``reserved`` already, and at most ``most`` blocks). Returns
    the cache and the block count."""
    device, dtype = _device_dtype(model)
    per_block = block_bytes(model, block_size)
    if memory is None:
        spare = max(0, free_memory(device) - reserved)
        memory = min(DEFAULT_KV_CAP, int(spare * DEFAULT_KV_FRACTION) // max(1, ranks_here))
        if most is not None:
            memory = min(memory, most * per_block)
    blocks = min(all_gather_object(memory // per_block, group=model.group))
    if blocks < 1:
        raise ValueError(f"kv_cache_memory={memory} bytes holds no {block_size}-token block ({per_block} bytes per "
                         f"block on this rank); give more memory (--kv-cache-memory)")
    if device.type == "cpu":
        attention.extension()  # built (or loaded) now, not inside a step
        matvec.native_bf16(), matvec.bf16_kernel()  # asked now, so a compiled step reads the answers as constants
    cache = []
    for layer in model.model.layers:
        attn = layer.self_attn
        shape = (blocks, block_size, attn.num_local_kv, attn.head_dim)
        cache.append((_zeros(shape, dtype, device), _zeros(shape, dtype, device)))
    return cache, blocks


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros that take memory only where written, on CPU (an anonymous mapping's pages are zero
    until touched), so a cache sized for the worst case costs what it holds."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    pages = mmap.mmap(-1, max(1, math.prod(shape) * dtype.itemsize))
    return torch.frombuffer(pages, dtype=dtype, count=math.prod(shape)).view(shape)


@torch.no_grad()
def run_step(model: nn.Module, cache: list, batch: dict) -> tuple | None:
    """One forward over a step (see ``llm_engine.pack``). Rank 0 gets ``(scores, prompt)``:
    float32 logits [rows, vocab] for the rows to sample (their argmax ids [rows] when
    ``batch["greedy"]``), and for the prompt positions that want log-probabilities
    (``batch["prompt_rows"]``, with their targets) what :func:`vocab_logprobs` finds, or None.
    Other ranks get None. No rank ever holds more than its own vocabulary slice of a prompt's
    logits."""
    device, _ = _device_dtype(model)
    sample_rows, prompt_rows = batch["logit_rows"], batch["prompt_rows"]
    step = model.make_step(batch["positions"], slots=batch["slots"], tables=batch["tables"], chunks=batch["chunks"],
                           logit_rows=sample_rows + [r for r, _ in prompt_rows])
    ids = torch.tensor(batch["ids"], dtype=torch.long, device=device)
    compiled = model.decode_compiled and not batch["chunks"]
    local = model(ids, step, cache, gather=False, compiled=compiled)  # this rank's vocabulary slice
    head, group = model.lm_head, model.group
    rank0 = group_rank(group) == 0
    if not sample_rows:  # every rank knows: the step only carried prompt chunks
        scores = torch.zeros(0, dtype=torch.long if batch["greedy"] else torch.float32)
    else:
        scores = head.gather(local[:len(sample_rows)], "argmax" if batch["greedy"] else "rank0")
    prompt = None
    if prompt_rows:
        targets = torch.tensor([t for _, t in prompt_rows], dtype=torch.long, device=device)
        prompt = vocab_logprobs(local[len(sample_rows):], targets, batch["prompt_top"], head.vocab_start, group)
        if prompt is not None:
            prompt = tuple(t.cpu() for t in prompt)
    if not rank0:
        return None
    return (scores.cpu() if batch["greedy"] else scores.float().cpu()), prompt


@torch.no_grad()
def full_logits(model: nn.Module, prompts: list[list[int]]) -> list[torch.Tensor] | None:
    """Full-vocabulary logits at every position of each prompt (float32, CPU) on rank 0; None elsewhere."""
    device, _ = _device_dtype(model)
    positions = [p for ids in prompts for p in range(len(ids))]
    step = model.make_step(positions, chunks=[(len(ids), len(ids), None) for ids in prompts])
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
    logits = model(ids, step, None, gather="rank0")
    if logits is None:
        return None
    return list(logits.float().cpu().split([len(p) for p in prompts]))


def ranks_on_this_host(world: int) -> int:
    """How many ranks share this host's memory (torchrun says; a local engine's all do)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world))
