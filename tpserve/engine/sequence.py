"""Rank 0's view of one sequence being generated: its sampling state, its text as it grows
(incremental detokenizing), stop checks, and the part of the text a caller has not seen yet."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .detokenizer import IncrementalDetokenizer
from .sampling import SamplingParams, make_generator, penalise, sample


@dataclass
class Logprob:
    """vLLM's shape: a token's log-probability, its rank in the vocabulary (1: the most likely)
    and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


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
        self.tokenizer = tokenizer
        # one {token id: Logprob} per generated token / per prompt token (the first: None)
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = (
            [None] if params.prompt_logprobs is not None else None)
        self.block_table: list[int] = []
        self.num_computed = 0
        self.uncached = 0  # tokens it had to compute when it last started: the cache held the rest
        self.preempted = 0  # times its blocks were taken back (it is then recomputed)

    @property
    def uses_cache(self) -> bool:
        """Whether it may start from cached blocks: not when its prompt is scored
        (``prompt_logprobs``), which needs every prompt position computed."""
        return self.prompt_logprobs is None

    @property
    def token_ids_all(self) -> list[int]:
        return self.prompt_ids + self.token_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """Tokens ``start:end`` of prompt + output, without building the whole list (every step asks)."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.token_ids[start - p:end - p]
        return self.prompt_ids[start:] + self.token_ids[:end - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.reason is not None

    def pick(self, logits: torch.Tensor) -> int:
        """Sample the next token from float32 logits [vocab] and take it."""
        params = self.params
        scores = penalise(logits, params, self.prompt_ids, self.token_ids) if params.penalised else logits
        token = sample(scores, params, self.generator)
        entry = None
        if params.logprobs is not None:
            lp = torch.log_softmax(logits, dim=-1)
            top = lp.topk(params.logprobs) if params.logprobs else None
            chosen = float(lp[token])
            entry = self._entry(token, chosen, int((lp > lp[token]).sum()) + 1,
                                top.indices.tolist() if top else [], top.values.tolist() if top else [])
        return self.accept(token, entry)

    def _entry(self, token: int, logprob: float, rank: int, top_ids: list[int], top_lps: list[float]) -> dict:
        name = self._name
        out = {token: Logprob(logprob, rank, name(token))}
        for r, (t, v) in enumerate(zip(top_ids, top_lps), start=1):
            out.setdefault(t, Logprob(v, r, name(t)))
        return out

    def _name(self, token: int) -> str | None:
        return self.tokenizer.decode([token]) if self.tokenizer is not None else None

    def add_prompt_logprob(self, position: int, logprob: float, rank: int, top_ids: list[int],
                           top_lps: list[float]) -> None:
        """The log-probability of prompt token ``position + 1`` (computed at ``position``); a
        recomputed position (after preemption) is already known and kept."""
        if self.prompt_logprobs is not None and len(self.prompt_logprobs) == position + 1:
            self.prompt_logprobs.append(self._entry(self.prompt_ids[position + 1], logprob, rank, top_ids, top_lps))

    def accept(self, token: int, entry: dict | None = None) -> int:
        """Take ``token`` as this sequence's next: stop checks, text, what to stream."""
        self.delta = ""
        if (token in self.eos_ids and not self.params.ignore_eos) or token in self.params.stop_token_ids:
            self.reason = "stop"
            self._publish(self._whole_text())
            return token
        self.token_ids.append(token)
        if self.logprobs is not None and entry is not None:
            self.logprobs.append(entry)
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
