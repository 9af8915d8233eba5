"""Sampling parameters (vLLM's shape) and the token choice made on rank 0."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """How to pick tokens, in vLLM's shape. ``temperature=0`` is greedy; ``top_k=0``, ``top_p=1``
    and ``min_p=0`` disable those filters; ``seed`` makes sampling reproducible (across runs and
    TP degrees; with ``n > 1``, completion i uses ``seed + i``); ``ignore_eos`` keeps going past
    end-of-sequence (benchmarks). ``stop_token_ids`` end a sequence like EOS does.
    Penalties as in vLLM and OpenAI: ``presence_penalty`` and ``frequency_penalty`` lower the
    logits of tokens already generated (once, or once per use); ``repetition_penalty`` > 1 damps
    every token of the prompt and the output (transformers' rule). ``logprobs=k`` returns each
    generated token's log-probability and the k most likely; ``prompt_logprobs=k`` the same for
    the prompt's tokens (from the model's raw logits)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        def whole(name: str, low: int, value) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

        whole("max_tokens", 1, self.max_tokens)
        whole("n", 1, self.n)
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty!r}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                whole(name, 0, getattr(self, name))
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids (integers >= 0), got {self.stop_token_ids!r}")

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that needs the full logits: each rank's best logit is enough."""
        return self.temperature == 0 and not self.penalised and self.logprobs is None

    def for_child(self, i: int) -> "SamplingParams":
        """The parameters of completion ``i`` of ``n``: one completion, its own seed."""
        from dataclasses import replace

        return replace(self, n=1, seed=None if self.seed is None else self.seed + i,
                       prompt_logprobs=self.prompt_logprobs if i == 0 else None)  # the prompt is scored once


def room_left(prompt_tokens: int, context: int) -> int:
    """How many tokens a sequence may still generate after its prompt: the one context check
    (the engine, the serving loop and the HTTP server all ask it; 0 or less: none)."""
    return context - prompt_tokens


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    g = torch.Generator()
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(params.seed)
    return g


def penalise(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """vLLM's penalties on float32 logits [vocab]: repetition over prompt and output, presence and
    frequency over the output."""
    logits = logits.clone()
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.zeros_like(logits).index_add_(0, torch.tensor(output_ids), torch.ones(len(output_ids)))
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from float32 logits [vocab] (penalties already applied)."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0)
        probs /= probs.sum()
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs /= probs.sum()
    # exponential race: argmax(p / E) with E ~ Exp(1) draws from p with one batch of randoms,
    # so a seed consumes the same random numbers whatever the vocabulary split
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return int((probs / race).argmax())
