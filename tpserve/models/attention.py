"""Attention over a flattened batch that mixes decode rows and prefill chunks, with a paged KV cache.

A forward call takes N tokens flattened to [N, hidden] (as nano-vllm does), so one call can
carry decode rows (one token each, first) and prompt chunks (after them) of different
lengths. Each layer's cache is a pair of [blocks, block_size, kv_heads, head_dim] tensors; a
token's K/V go to its slot (block * block_size + offset), and a sequence's keys are the blocks
its block table lists, in order. Decode rows read their blocks in place through
``csrc/paged_attention.cpp`` (rows that share a prompt's blocks share its memory); without a
compiler, or on CUDA, they gather them first. Prefill chunks run SDPA over their gathered
blocks, which prefill's compute dwarfs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tpserve.utils.native import NATIVE_FLAGS, optional_extension

_ext = None


def kernel_enabled() -> bool:
    return os.environ.get("TPSERVE_PAGED_KERNEL", "1") != "0"


def extension():
    """The decode kernel's module, built once per machine; None (one warning) when it cannot be built."""
    global _ext
    if _ext is None and kernel_enabled():
        _ext = optional_extension(Path(__file__).with_name("csrc") / "paged_attention.cpp", "tpserve_paged",
                                  # reassociated sums: a dot's lanes add up as a tree, not one by one
                                  ("-O3", "-fopenmp", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
                                   "-fno-trapping-math", *NATIVE_FLAGS), "the paged decode kernel",
                                  "decode attention gathers each row's blocks instead")
    return _ext if kernel_enabled() else None


@torch.library.custom_op("tpserve::paged_decode", mutates_args=())
def _paged_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                     lens: torch.Tensor, kv_of_q: torch.Tensor, scale: float, window: int) -> torch.Tensor:
    return _ext.paged_decode(q, k_cache, v_cache, tables, lens, kv_of_q, scale, window)


@_paged_decode_op.register_fake
def _(q, k_cache, v_cache, tables, lens, kv_of_q, scale, window):
    return torch.empty_like(q)


@dataclass
class Chunk:
    """A run of one sequence's prompt tokens: queries ``start .. start+length`` of the flattened
    batch, the last ``length`` of the sequence's first ``keys`` positions."""

    start: int
    length: int
    keys: int
    mask: torch.Tensor  # additive [length, keys]
    blocks: torch.Tensor | None  # cache blocks holding positions 0..keys-1; None: the chunk is all its keys


@dataclass
class Step:
    """What one forward call attends over; built once, shared by every layer.

    cos, sin:   rope tables [N, 1, head_dim] for the tokens' positions (``sin`` carries
                rotate_half's sign in its first half).
    slots:      [N] cache slot of each token, or None without a cache.
    num_decode: the first ``num_decode`` tokens are decode rows; ``tables`` [rows, max_blocks]
                and ``lens`` [rows] (keys each sees, its own included) say where their keys are.
    chunks:     the prompt chunks after them.
    logit_rows: which tokens' hidden states reach the LM head (None: all).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    slots: torch.Tensor | None
    num_decode: int = 0
    tables: torch.Tensor | None = None
    lens: torch.Tensor | None = None
    chunks: list[Chunk] = field(default_factory=list)
    logit_rows: torch.Tensor | None = None
    window: int = 0  # sliding window (0: none)
    kernel: bool = False  # decode rows attend through the paged kernel (built, enabled, CPU): asked once a step


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # finite, so a row with nothing allowed never makes NaNs
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def make_step(inv_freq: torch.Tensor, rope_scale: float, dtype: torch.dtype, positions: list[int],
              slots: list[int] | None = None, tables: list[list[int]] | None = None,
              chunks: list[tuple[int, int, list[int] | None]] = (), logit_rows: list[int] | None = None,
              window: int | None = None) -> Step:
    """Build a :class:`Step` from plain lists (what rank 0 sends). Decode rows come first, one
    token each, their position being their key count less one; ``tables`` are their block
    lists. ``chunks``: ``(length, keys, blocks)`` per prompt chunk, in token order."""
    device = inv_freq.device
    pos = torch.tensor(positions, dtype=torch.long, device=device)
    freqs = pos[:, None].float() * inv_freq
    cos = (torch.cat((freqs, freqs), dim=-1).cos() * rope_scale).to(dtype)[:, None]
    sin = (freqs.sin() * rope_scale).to(dtype)
    sin = torch.cat((-sin, sin), dim=-1)[:, None]
    window = window or 0
    step = Step(cos, sin, None if slots is None else torch.tensor(slots, dtype=torch.long, device=device), window=window,
                kernel=device.type == "cpu" and _ext is not None and kernel_enabled())
    tables, chunks = _short_chunks_as_rows(tables, chunks, step.kernel and slots is not None)
    if tables:
        width = max(2, max(len(t) for t in tables))  # at least 2: a compiled step would specialise on 1
        step.num_decode = len(tables)
        step.tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=device)
        step.lens = pos[:len(tables)] + 1
    start = step.num_decode
    for length, keys, blocks in chunks:
        qp = torch.arange(keys - length, keys, device=device)[:, None]
        kp = torch.arange(keys, device=device)[None]
        allowed = kp <= qp
        if window:
            allowed &= qp - kp < window
        step.chunks.append(Chunk(start, length, keys, _additive(allowed, dtype),
                                 None if blocks is None else torch.tensor(blocks, dtype=torch.long, device=device)))
        start += length
    if logit_rows is not None:
        step.logit_rows = torch.tensor(logit_rows, dtype=torch.long, device=device)
    return step


KERNEL_CHUNK = 32  # prompt chunks up to this long attend through the decode kernel, a row per token


def _short_chunks_as_rows(tables, chunks, kernel: bool) -> tuple[list, list]:
    """Turn short prompt chunks whose keys are in the cache into decode-kernel rows, one per token
    (its table the chunk's blocks, its key count its position + 1). A chunk's SDPA first copies
    all its keys out of the blocks; the kernel reads them in place, once for all the chunk's rows
    (rows with one table are one group). 30 layers of 9 heads of 64, 2 threads, over 1,000 cached
    keys: the kernel 1.6 / 4.1 / 7.4 / 15.2 / 29.1 / 43.0 ms at 1 / 4 / 8 / 16 / 32 / 48 tokens,
    SDPA 10.6 / 13.3 / 14.5 / 19.7 / 29.2 / 37.5 ms. So a long prompt admitted in small chunks, to
    keep running streams' steps short, stays cheap per token, and its cost grows evenly with the
    chunk (a chunk one token over the limit cost more than one at it, and the step timer misjudged it). Kernel rows come first: chunks are taken while they follow
    one another from the front."""
    if not (kernel and chunks):  # kernel: it runs here, and the keys are in the cache
        return tables, list(chunks)
    tables, chunks = list(tables or []), list(chunks)
    while chunks and chunks[0][2] is not None and chunks[0][0] <= KERNEL_CHUNK:
        length, _, blocks = chunks.pop(0)
        tables.extend([list(blocks)] * length)
    return tables, chunks


def _sdpa(q, k, v, mask, kv_index: torch.Tensor | None) -> torch.Tensor:
    """SDPA on [B, H, T, D] queries and [B, Hkv, S, D] keys; ``kv_index`` maps query heads to KV
    heads when they do not split evenly (else SDPA's own GQA)."""
    if kv_index is not None:
        return F.scaled_dot_product_attention(q, k.index_select(1, kv_index), v.index_select(1, kv_index),
                                              attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def decode_gathered(q, k_cache, v_cache, tables, lens, kv_index, uniform: bool, window: int) -> torch.Tensor:
    """The stock-torch decode: copy each row's blocks, then one masked SDPA. q [rows, H, D]."""
    k = k_cache[tables].flatten(1, 2).transpose(1, 2)  # [rows, Hkv, max_blocks*block, D]
    v = v_cache[tables].flatten(1, 2).transpose(1, 2)
    kp = torch.arange(k.shape[2], device=q.device)[None]
    allowed = kp < lens[:, None]
    if window:
        allowed &= kp >= lens[:, None] - window
    mask = _additive(allowed, q.dtype)[:, None, None]
    return _sdpa(q[:, :, None], k, v, mask, None if uniform else kv_index)[:, :, 0]


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, step: Step,
                 kv_index: torch.Tensor) -> torch.Tensor:
    """The decode rows' attention through the paged kernel (where ``step.kernel``), q [rows, H, D].
    Eager calls skip the custom op's dispatch (~15 us a layer); compiled code needs it."""
    op = _paged_decode_op if torch.compiler.is_compiling() else _ext.paged_decode
    return op(q, k_cache, v_cache, step.tables, step.lens, kv_index, q.shape[-1] ** -0.5, step.window)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step,
           cache: tuple[torch.Tensor, torch.Tensor] | None, kv_index: torch.Tensor, uniform: bool) -> torch.Tensor:
    """Attention for the flattened q [N, H, D], k/v [N, Hkv, D]; writes the new K/V to the cache
    first (k and v None: they are in the cache already, ``fused.rope_store`` put them there)."""
    if cache is not None:
        k_cache, v_cache = cache
        if k is not None:
            k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, step.slots, k)
            v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, step.slots, v)
        elif any(c.blocks is None for c in step.chunks):  # chunks without a block table read theirs back
            k = k_cache.view(-1, *k_cache.shape[2:])[step.slots]
            v = v_cache.view(-1, *v_cache.shape[2:])[step.slots]
    outs = []
    d = step.num_decode
    if d:
        qd = q[:d]
        if step.kernel:
            outs.append(paged_decode(qd, k_cache, v_cache, step, kv_index))
        else:
            outs.append(decode_gathered(qd, k_cache, v_cache, step.tables, step.lens, kv_index, uniform, step.window))
    for c in step.chunks:
        qc = q[c.start:c.start + c.length].transpose(0, 1)[None]  # [1, H, T, D]
        if c.blocks is None:
            kc, vc = k[c.start:c.start + c.length], v[c.start:c.start + c.length]
        else:
            kc = k_cache[c.blocks].flatten(0, 1)[:c.keys]
            vc = v_cache[c.blocks].flatten(0, 1)[:c.keys]
        out = _sdpa(qc, kc.transpose(0, 1)[None], vc.transpose(0, 1)[None], c.mask, None if uniform else kv_index)
        outs.append(out[0].transpose(0, 1))
    return outs[0] if len(outs) == 1 else torch.cat(outs)
