"""Which sequences run in the next step, and how many of their tokens (rank 0).

Every running sequence that has finished its prompt decodes one token per step. What is left of
the step's token budget goes to prompts, first those already being prefilled, then new ones in
arrival order; a prompt longer than what is left is cut into chunks (chunked prefill), and
several prompts can prefill in one step (batched prefill). When a decode needs a block and none
is free, the most recently started sequence gives its blocks back and waits to be recomputed
(preemption, as vLLM does): no request fails for lack of cache.
"""

from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .sequence import Sequence


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        self.blocks, self.max_num_seqs = blocks, max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.preemptions = 0

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop ``seq`` (finished or aborted), wherever it is, and give back its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        seq.preempted += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self, token_budget: int) -> list[tuple[Sequence, int]]:
        """``(sequence, tokens to compute)`` for the next step: decode rows first, then prompt chunks."""
        decode: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if seq not in self.running or seq.num_tokens - seq.num_computed != 1:
                continue
            while not self.blocks.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append(seq)
                decode.append((seq, 1))
        budget = token_budget
        chunks: list[tuple[Sequence, int]] = []
        for seq in self.running:
            left = seq.num_tokens - seq.num_computed
            if left > 1 and budget > 0:
                chunks.append((seq, min(left, budget)))
                budget -= chunks[-1][1]
        later: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self._shares_a_prefill(seq):  # its prefix is being computed: wait for it, then reuse it
                later.append(self.waiting.popleft())
                continue
            # keep a block per running sequence in hand, so the next decodes need not preempt
            if not self.blocks.can_allocate(seq.token_ids_all, len(self.running), seq.uses_cache):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq, seq.uses_cache)
            seq.uncached = seq.num_tokens - seq.num_computed
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            chunks.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(later))
        return decode + chunks

    def long_prefill(self, tokens: int) -> bool:
        """Whether a prompt with at least ``tokens`` to compute (less what the cache held) is
        prefilling, or is next to start."""
        if any(s.num_tokens - s.num_computed > 1 and s.uncached >= tokens for s in self.running):
            return True
        head = self.waiting[0] if self.waiting else None
        if head is None or head.num_tokens < tokens:
            return False
        held = len(self.blocks.cached_prefix(head.token_ids_all)) * self.blocks.block_size if head.uses_cache else 0
        return head.num_tokens - held >= tokens

    def _shares_a_prefill(self, seq: Sequence) -> bool:
        """Whether a running sequence is still prefilling the same first block (the n completions
        of one prompt, or requests with one system prompt that arrive together)."""
        bs = self.blocks.block_size
        if not self.blocks.prefix_caching or seq.num_tokens <= bs or not seq.uses_cache:
            return False
        head = seq.prompt_ids[:bs]
        return any(r.num_computed < len(r.prompt_ids) and r.prompt_ids[:bs] == head for r in self.running)

    def computed(self, scheduled: list[tuple[Sequence, int]]) -> None:
        """The step ran: its tokens' K/V are in the cache."""
        for seq, n in scheduled:
            seq.num_computed += n
            self.blocks.commit(seq)
