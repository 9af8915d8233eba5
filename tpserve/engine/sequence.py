"""Rank 0's view of one sequence being generated: its sampling state, its text as it grows
(incremental detokenizing), stop checks, and the part of the text a caller has not seen yet."""

from __future__ import annotations

import torch

from .detokenizer import IncrementalDetokenizer
from .sampling import SamplingParams, make_generator, sample


class Sequence:
    """One sequence in the engine: its tokens, where its K/V live (``block_table``) and how many
    of its tokens the cache already holds (``num_computed``), its sampling state, and its text.
    The engine, the scheduler and the block manager all run on rank 0."""

    def __init__(self, seq_id: int, prompt_ids: list[int], params: SamplingParams, budget: int,
                 tokenizer=None, eos_ids: frozenset[int] | set[int] = frozenset()) -> None:
        self.seq_id, self.prompt_ids, self.params, self.budget = seq_id, prompt_ids, params, budget
        self.eos_ids = eos_ids
        self.generator = make_generator(params)
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.token_ids: list[int] = []  # generated
        self.text, self.delta, self.reason = "", "", None
        self._emitted = 0
        self.block_table: list[int] = []
        self.num_computed = 0
        self.preempted = 0  # times its blocks were taken back (it is then recomputed)

    @property
    def token_ids_all(self) -> list[int]:
        return self.prompt_ids + self.token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.reason is not None

    def pick(self, logits: torch.Tensor) -> int:
        return self.accept(sample(logits, self.params, self.generator))

    def accept(self, token: int) -> int:
        """Take ``token`` as this sequence's next: stop checks, text, what to stream."""
        self.delta = ""
        if token in self.eos_ids and not self.params.ignore_eos:
            self.reason = "stop"
            self._publish(self._whole_text())
            return token
        self.token_ids.append(token)
        if self.detok is not None:
            self.detok.add(token)
        text = self.detok.text if self.detok is not None else ""
        for stop in self.params.stop:
            at = text.find(stop, max(0, self._emitted - len(stop)))
            if at >= 0:
                text, self.reason = text[:at], "stop"
                break
        if self.reason is None and len(self.token_ids) >= self.budget:
            self.reason = "length"
            text = self._whole_text()
        shown = text
        if self.reason is None and self.params.stop:  # hold back what could be the start of a stop string
            keep = max(len(s) for s in self.params.stop) - 1
            shown = text[:max(self._emitted, len(text) - keep)]
        self._publish(shown, text)
        return token

    def _whole_text(self) -> str:
        """All the text, an incomplete last character included (the sequence is over)."""
        return self.detok.text + self.detok.tail if self.detok is not None else ""

    def _publish(self, shown: str, text: str | None = None) -> None:
        """``shown`` is what the caller may see so far; ``delta`` the part it has not seen yet."""
        self.delta = shown[self._emitted:]
        self._emitted = max(self._emitted, len(shown))
        self.text = shown if text is None else text
