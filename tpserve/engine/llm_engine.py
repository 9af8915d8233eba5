"""The engine loop behind ``LLM.generate``, ``LLM.chat`` and the server, in nano-vllm's shape:
each :meth:`LLMEngine.step` schedules, runs the model once over the mix, samples, and returns
what changed. It lives on rank 0; ``run`` sends a command to every rank and returns rank 0's
result.

Prefill chunks are sized by time, not by a GPU-sized token budget: while sequences are decoding,
a step may carry only as many prompt tokens as keep it within ``ITL_SLACK`` decode steps, from
the measured cost of a decode step and of a prompt token (on a 2-core CPU a prompt token costs
about as much as a tenth of a decode step).
"""

from __future__ import annotations

import itertools
import time
from typing import Callable

from .block_manager import BlockManager
from .sampling import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence

ITL_SLACK = 0.5  # a step with prompt chunks may take this many decode steps' time more
FIRST_CHUNK = 64  # prompt tokens per step while decoding, until the costs are measured
MAX_PREFILL = 2048  # prompt tokens per step when nothing is decoding
LONG_PROMPT = 256  # a prompt with this many tokens to compute (not cached) may be chunked below a block while others decode
# ... but not below this. Each prompt row costs about as much as a decode row in the products
# (default model, 4-bit: 8 rows 16.5 ms, 10 rows 20.8, 12 rows 23.8 a step) plus its attention over
# the prompt so far; 4 rows at ~700 keys made a step ~2.2x a decode step of 8 streams, 2 rows ~1.9x
MIN_CHUNK = 2


class StepTimer:
    """Running estimates of a decode step's time and a prompt token's, to size prompt chunks."""

    def __init__(self, block_size: int) -> None:
        self.decode_s: float | None = None
        self.token_s: float | None = None
        self.block_size = block_size

    def budget(self, decoding: bool, long: bool = False) -> int:
        """Prompt tokens the next step may carry. At least a block, so that short prompts arriving
        together start together; down to ``MIN_CHUNK`` tokens while a ``long`` prompt (one with
        ``LONG_PROMPT`` tokens or more to compute) prefills or is next to start, whose late tokens
        attend to all before them (a block of them made a step 3-6x a decode step). A prompt that
        the cache mostly holds (a shared system prompt) takes a block a step."""
        if not decoding:
            return MAX_PREFILL
        if self.decode_s is None or self.token_s is None:
            return FIRST_CHUNK
        floor = MIN_CHUNK if long else self.block_size
        return max(floor, min(MAX_PREFILL, int(ITL_SLACK * self.decode_s / self.token_s)))

    def record(self, decode_rows: int, prompt_tokens: int, seconds: float) -> None:
        def ema(old: float | None, new: float) -> float:
            # one slow step (a compile, a busy machine) moves the estimate by at most a factor of 2
            return new if old is None else 0.8 * old + 0.2 * min(new, 6 * old)

        if prompt_tokens == 0:
            self.decode_s = ema(self.decode_s, seconds)
        elif decode_rows == 0 or self.decode_s is not None:
            base = self.decode_s if decode_rows else 0.0
            cost = max(seconds - base, 1e-6) / prompt_tokens
            # a dearer token (a longer prefix to attend to) counts at once, a cheaper one slowly:
            # the next chunk's tokens see more keys than this one's did
            self.token_s = cost if self.token_s is None or cost > self.token_s else ema(self.token_s, cost)


def pack(scheduled: list[tuple[Sequence, int]], block_size: int) -> tuple[dict, list[Sequence], list]:
    """The command for one step, which sequences get a token from it (in logit-row order), and
    which prompt positions of which sequences get log-probabilities. Decode rows come first (the
    scheduler puts them there); then one chunk per prompt."""
    ids, positions, slots, tables, chunks, logit_rows, sampled = [], [], [], [], [], [], []
    prompt_rows, prompt_of, top = [], [], 0
    for seq, n in scheduled:
        start = seq.num_computed
        for p in range(start, start + n):
            slots.append(seq.block_table[p // block_size] * block_size + p % block_size)
        ids.extend(seq.tokens(start, start + n))
        positions.extend(range(start, start + n))
        decode = n == 1 and start + 1 == seq.num_tokens and not chunks
        if decode:
            tables.append(seq.block_table[:-(-(start + 1) // block_size)])
        else:
            chunks.append((n, start + n, seq.block_table[:-(-(start + n) // block_size)]))
        if seq.prompt_logprobs is not None:  # position p scores prompt token p + 1
            first = len(ids) - n
            for p in range(max(start, len(seq.prompt_logprobs) - 1), min(start + n, len(seq.prompt_ids) - 1)):
                prompt_rows.append((first + p - start, seq.prompt_ids[p + 1]))
                prompt_of.append((seq, p))
            top = max(top, seq.params.prompt_logprobs)
        if start + n == seq.num_tokens:  # its prompt (or its last token) is all in: it gets a new token
            logit_rows.append(len(ids) - 1)
            sampled.append(seq)
    batch = dict(ids=ids, positions=positions, slots=slots, tables=tables, chunks=chunks, logit_rows=logit_rows,
                 prompt_rows=prompt_rows, prompt_top=top, greedy=all(s.params.plain_greedy for s in sampled))
    return batch, sampled, prompt_of


class LLMEngine:
    """Sequences in, tokens out, one :meth:`step` at a time."""

    def __init__(self, run: Callable[[tuple], object], num_blocks: int, block_size: int, max_num_seqs: int,
                 prefix_caching: bool = True, tokenizer=None, eos_ids: set[int] = frozenset()) -> None:
        self.run, self.block_size = run, block_size
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs)
        self.timer = StepTimer(block_size)
        self._ids = itertools.count()

    @property
    def num_tokens_capacity(self) -> int:
        return len(self.blocks.blocks) * self.block_size

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """ValueError when a request could never be held in the cache, even alone."""
        need = prompt_tokens + max_tokens
        if need > self.num_tokens_capacity:
            raise ValueError(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) needs {need} tokens "
                             f"of KV cache, more than the {self.num_tokens_capacity} it holds; lower max_tokens, "
                             f"shorten the prompt, or give the cache more memory (kv_cache_memory / --kv-cache-memory)")

    def add(self, prompt_ids: list[int], params: SamplingParams, budget: int | None = None) -> Sequence:
        budget = params.max_tokens if budget is None else budget
        self.check_fits(len(prompt_ids), budget)
        seq = Sequence(next(self._ids), list(prompt_ids), params, budget, self.tokenizer, self.eos_ids)
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)

    def has_unfinished(self) -> bool:
        return len(self.scheduler) > 0

    def step(self) -> list[tuple[Sequence, list[int]]]:
        """Run one step; each sequence that got a token, with its new token ids (empty when it
        ended on EOS). A finished sequence has left the engine by the time this returns."""
        running = self.scheduler.running
        decoding = any(s.num_tokens - s.num_computed == 1 for s in running)
        long = self.scheduler.long_prefill(LONG_PROMPT)
        scheduled = self.scheduler.schedule(self.timer.budget(decoding, long))
        if not scheduled:
            if self.scheduler.waiting and not self.scheduler.running:  # cannot happen: add() checks the size
                raise RuntimeError("the scheduler could not place a waiting request in an empty cache")
            return []
        batch, sampled, prompt_of = pack(scheduled, self.block_size)
        t0 = time.perf_counter()
        scores, prompt = self.run(("step", batch))
        decode_rows = len(batch["tables"])
        self.timer.record(decode_rows, len(batch["ids"]) - decode_rows, time.perf_counter() - t0)
        self.scheduler.computed(scheduled)
        if prompt is not None:
            logprob, rank, top_ids, top_lps = (t.tolist() for t in prompt)
            for i, (seq, p) in enumerate(prompt_of):
                seq.add_prompt_logprob(p, logprob[i], rank[i], top_ids[i], top_lps[i])
        out = []
        for row, seq in enumerate(sampled):
            before = len(seq.token_ids)
            if batch["greedy"]:
                seq.accept(int(scores[row]))
            else:
                seq.pick(scores[row])
            if seq.finished:
                self.scheduler.finish(seq)
            out.append((seq, seq.token_ids[before:]))
        return out
