"""The generation loop every rank runs in lockstep (SPMD).

Rank 0 alone sees full logits and picks the next tokens; it broadcasts them with a "stop"
flag, so the ranks cannot diverge even when sampling is random. Greedy decoding needs no full
logits: each rank's best logit meets its peers' in one tiny gather (``gather="argmax"``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from tpserve.parallel import broadcast_tensor, group_rank

from .kv_cache import allocate_kv_cache
from .sampling import room_left

# choose(scores, step) -> (tokens [B] int64, finished [B] bool); rank 0 only. ``scores``: float32
# logits [B, vocab], or under greedy decoding the ids already chosen, [B] int64.
Chooser = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def left_pad(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] left-padded with 0, and rope positions [B, T] with -1 on padding."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    pos = torch.full((len(prompts), width), -1, dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            pos[i, width - len(p):] = torch.arange(len(p))
    return ids.to(device), pos.to(device)


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    w = model.model.layers[0].self_attn.q_proj.weight
    return w.device, w.dtype


@torch.no_grad()
def full_logits(model: nn.Module, prompts: list[list[int]]) -> list[torch.Tensor] | None:
    """Full-vocabulary logits at every position of each prompt (float32, CPU) on rank 0; None elsewhere."""
    device, dtype = _device_dtype(model)
    ids, pos = left_pad(prompts, device)
    step = model.make_step(pos.clamp(min=0), pos, 0, dtype)
    logits = model(ids, step, None, gather="rank0")
    if logits is None:
        return None
    width = ids.shape[1]
    return [logits[i, width - len(p):].float().cpu() for i, p in enumerate(prompts)]


@torch.no_grad()
def generate(model: nn.Module, prompts: list[list[int]], max_new_tokens: int | list[int], choose: Chooser | None,
             group: dist.ProcessGroup | None = None, on_step: Callable[[torch.Tensor], None] | None = None,
             greedy: bool = False) -> torch.Tensor:
    """Prefill ``prompts`` together, then decode up to ``max_new_tokens`` steps (one number, or
    one per prompt: rows are then held to their own count only by the context check).
    ``greedy``: every row takes its most likely token, so ``choose`` gets ids, not logits.

    ``choose`` runs on rank 0 only (others pass None). Returns the chosen tokens [B, steps]
    on every rank; rows that finished keep decoding (their later tokens are ignored by the
    caller) until every row is done, or after the largest count of steps.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    if len(budgets) != len(prompts) or min(budgets) < 1:
        raise ValueError(f"need one positive max_new_tokens per prompt, got {budgets} for {len(prompts)} prompts")
    context = model.spec.max_position_embeddings
    for i, (p, n) in enumerate(zip(prompts, budgets)):
        if n > room_left(len(p), context):
            raise ValueError(f"prompt {i}: {len(p)} tokens + {n} new exceed the model's context of {context}; "
                             f"shorten the prompt or lower max_tokens")
    max_new_tokens = max(budgets)
    device, dtype = _device_dtype(model)
    batch, width = len(prompts), max(len(p) for p in prompts)
    compiled = getattr(model, "decode_compiled", False)
    cache_len = width + max_new_tokens
    cache = allocate_kv_cache(model, batch, cache_len)
    ids, pos = left_pad(prompts, device)
    key_pos = torch.full((batch, cache_len), -1, dtype=torch.long, device=device)
    key_pos[:, :width] = pos
    next_pos = torch.tensor([len(p) for p in prompts], device=device)
    step = model.make_step(pos.clamp(min=0), key_pos[:, :width], 0, dtype)
    gather = "argmax" if greedy else "rank0"
    logits = model(ids, step, cache, last_only=True, gather=gather)
    is_rank0 = group_rank(model.group) == 0
    finished = torch.zeros(batch, dtype=torch.bool)
    chosen = []
    packet = torch.zeros(batch + 1, dtype=torch.long, device=device)  # tokens, then "all done"
    for i in range(max_new_tokens):
        if is_rank0:
            tokens, done = choose(logits[:, -1] if greedy else logits[:, -1].float(), i)
            finished |= done.cpu()
            packet[:batch] = tokens
            packet[batch] = int(bool(finished.all()) or i == max_new_tokens - 1)
        broadcast_tensor(packet, 0, model.group)
        tokens = packet[:batch].clone()
        chosen.append(tokens)
        if on_step is not None:
            on_step(tokens)
        if packet[batch].item():
            break
        slot = width + i
        key_pos[:, slot] = next_pos
        # a compiled step takes the column as a tensor (an int would be baked into its graph)
        col = torch.full((batch, 1), slot, dtype=torch.long, device=device) if compiled else slot
        step = model.make_step(next_pos[:, None], key_pos[:, :slot + 1], col, dtype)
        next_pos = next_pos + 1
        logits = model(tokens[:, None], step, cache, last_only=True, gather=gather, compiled=compiled)
    return torch.stack(chosen, dim=1).cpu()


class SlotCache:
    """A KV cache of ``max_batch`` rows that sequences enter and leave independently
    (continuous batching). Each rank keeps one; ``key_pos`` [rows, max_seq] holds the position
    stored in each cache column (-1: empty), which is all the attention mask needs."""

    def __init__(self, model: nn.Module, max_batch: int, max_seq: int) -> None:
        self.kv = allocate_kv_cache(model, max_batch, max_seq)
        device, _ = _device_dtype(model)
        self.key_pos = torch.full((max_batch, max_seq), -1, dtype=torch.long, device=device)
        self.max_batch, self.max_seq = max_batch, max_seq


@torch.no_grad()
def prefill_slot(model: nn.Module, slots: SlotCache, row: int, ids: list[int]) -> torch.Tensor | None:
    """Run a new sequence's prompt into cache row ``row``; rank 0 gets its next-token logits [vocab]."""
    device, dtype = _device_dtype(model)
    n = len(ids)
    if not 0 < n <= slots.max_seq:
        raise ValueError(f"prompt of {n} tokens does not fit a cache row of {slots.max_seq}")
    pos = torch.arange(n, device=device)[None]
    slots.key_pos[row] = -1
    slots.key_pos[row, :n] = pos[0]
    step = model.make_step(pos, slots.key_pos[row:row + 1, :n], 0, dtype)
    views = [(k[row:row + 1], v[row:row + 1]) for k, v in slots.kv]
    logits = model(torch.tensor([ids], device=device), step, views, last_only=True, gather="rank0")
    return None if logits is None else logits[0, -1].float().cpu()


@torch.no_grad()
def decode_slots(model: nn.Module, slots: SlotCache, tokens: list[int], positions: list[int]) -> torch.Tensor | None:
    """One decode step over cache rows 0..len(tokens)-1: row r feeds ``tokens[r]`` at position
    ``positions[r]`` (-1: the row is idle and its output is ignored). Rank 0 gets logits [rows, vocab]."""
    device, dtype = _device_dtype(model)
    rows = len(tokens)
    pos = torch.tensor(positions, device=device)
    live = pos >= 0
    if int(pos.max()) >= slots.max_seq:
        raise ValueError(f"a sequence reached the cache length {slots.max_seq}")
    pos = pos.clamp(min=0)
    live_rows = torch.nonzero(live).flatten()
    slots.key_pos[live_rows, pos[live_rows]] = pos[live_rows]
    kv_len = int(pos.max()) + 1
    step = model.make_step(pos[:, None], slots.key_pos[:rows, :kv_len], pos[:, None], dtype)
    views = [(k[:rows], v[:rows]) for k, v in slots.kv]
    logits = model(torch.tensor(tokens, device=device)[:, None], step, views, last_only=True, gather="rank0",
                   compiled=getattr(model, "decode_compiled", False))
    return None if logits is None else logits[:, -1].float().cpu()
