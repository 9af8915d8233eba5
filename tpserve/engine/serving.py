"""Continuous batching for servers: requests join and leave the running decode loop.

A background thread on rank 0 owns an :class:`LLM`. Each turn it prefills newly arrived
requests into free rows of a per-rank KV cache (one request at a time), then runs one decode
step over every busy row; finished rows are freed at once. Callers see each request as a
stream of :class:`Event`\\ s, delivered from the engine thread.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

from tpserve.parallel.layers import REDUCE_ROWS

from .llm import LLM
from .sampling import SamplingParams, room_left
from .sequence import Sequence


@dataclass
class Event:
    request_id: int
    text: str  # new text since the previous event
    token_ids: list[int]  # new token ids since the previous event
    finish_reason: str | None  # None while running; "stop" | "length"; "error" if the engine failed
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _Seq:
    rid: int
    ids: list[int]
    state: Sequence
    on_event: Callable[[Event], None]
    row: int = -1
    last: int = 0  # the token to feed next


class ServingEngine:
    """An LLM plus the thread that batches whatever requests are in flight."""

    def __init__(self, model=None, tensor_parallel_size: int = 1, dtype: str = "auto", device: str | None = None,
                 max_batch: int = 16, max_model_len: int = 2048,
                 on_fatal: Callable[[str], None] | None = None, compile: bool = False,
                 tokenizer: str | None = None, skip_tokenizer_init: bool = False) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.llm = LLM(model=model, tensor_parallel_size=tensor_parallel_size, dtype=dtype, device=device,
                       compile=compile, tokenizer=tokenizer, skip_tokenizer_init=skip_tokenizer_init)
        self.tokenizer = self.llm.tokenizer
        self.model_name = self.llm.model_path.name
        self.context = min(self.llm.context, max_model_len)
        self.max_batch = max_batch
        self.on_fatal = on_fatal
        self.error: str | None = None
        self._ids = itertools.count(1)
        self._waiting: deque[_Seq] = deque()
        self._rows: list[_Seq | None] = [None] * max_batch
        self._aborted: set[int] = set()
        self._wake = threading.Condition()
        self._stop = False
        try:
            if compile:
                self._compile_now()
            self.llm._run(("slots_init", max_batch, self.context))
        except BaseException:
            self.llm.close()
            raise
        self._thread = threading.Thread(target=self._loop, name="tpserve-engine", daemon=True)
        self._thread.start()

    def _compile_now(self) -> None:
        """Compile every decode graph a batch of up to ``max_batch`` rows can need, before the
        first request, so that no request waits for a compile."""
        model = self.llm.model
        sizes = sorted({min(n, self.max_batch) for n in (1, 2, REDUCE_ROWS + 1)})
        self.llm._run(("slots_init", sizes[-1], 8))
        for row in range(sizes[-1]):
            self.llm._run(("slots_prefill", row, [0, 0]))
        for rows in sizes:
            if model.decode_graph(rows) not in model.compiled_graphs:
                self.llm._run(("slots_decode", [0] * rows, [2] * rows))

    # ---- public -------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self.error is None and not self._stop

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(s is not None for s in self._rows)

    def submit(self, prompt_token_ids: list[int], params: SamplingParams, on_event: Callable[[Event], None]) -> int:
        """Queue a request; ValueError at once if it can never run."""
        ids = self.llm._check_ids(list(prompt_token_ids), 0)
        if params.max_tokens > room_left(len(ids), self.context):
            raise ValueError(f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                             f"model's context of {self.context} tokens; lower max_tokens or shorten the prompt")
        seq = _Seq(next(self._ids), ids, Sequence(self.llm, params, params.max_tokens), on_event)
        with self._wake:  # checked under the lock the failure path takes, so no request is lost
            if not self.healthy:
                raise RuntimeError(f"the engine is not running: {self.error or 'closed'}")
            self._waiting.append(seq)
            self._wake.notify()
        return seq.rid

    def abort(self, request_id: int) -> None:
        with self._wake:
            self._aborted.add(request_id)

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self.llm.close()

    # ---- the loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stop:
                self._drop_aborted()
                self._admit()
                if self.running:
                    self._decode()
                else:
                    with self._wake:
                        if not self._waiting and not self._stop:
                            self._wake.wait(timeout=0.5)
                    if any(not p.is_alive() for p in self.llm._workers):  # died while idle
                        self.llm._fail("waiting for requests", None)
        except BaseException as exc:  # a worker died, or a bug: fail everything, loudly
            with self._wake:
                self.error = f"{type(exc).__name__}: {exc}"
                pending = [s for s in self._rows if s is not None] + list(self._waiting)
                self._rows = [None] * self.max_batch
                self._waiting.clear()
            for seq in pending:
                self._emit(seq, finish="error")
            if self.on_fatal is not None:
                self.on_fatal(self.error)

    def _drop_aborted(self) -> None:
        with self._wake:
            if not self._aborted:
                return
            gone, self._aborted = self._aborted, set()
            self._waiting = deque(s for s in self._waiting if s.rid not in gone)
        for row, seq in enumerate(self._rows):
            if seq is not None and seq.rid in gone:
                self._rows[row] = None

    def _admit(self) -> None:
        while self._waiting and None in self._rows:
            with self._wake:
                seq = self._waiting.popleft()
            seq.row = self._rows.index(None)
            self._rows[seq.row] = seq
            logits = self.llm._run(("slots_prefill", seq.row, seq.ids))
            self._advance(seq, logits)

    def _decode(self) -> None:
        used = max(r for r, s in enumerate(self._rows) if s is not None) + 1
        tokens = [s.last if s else 0 for s in self._rows[:used]]
        positions = [len(s.ids) + len(s.state.token_ids) - 1 if s else -1 for s in self._rows[:used]]
        logits = self.llm._run(("slots_decode", tokens, positions))
        for row, seq in enumerate(self._rows[:used]):
            if seq is not None:
                self._advance(seq, logits[row])

    def _advance(self, seq: _Seq, logits) -> None:
        before = len(seq.state.token_ids)
        seq.last = seq.state.pick(logits)
        new = seq.state.token_ids[before:]
        if seq.state.finished:  # out of the batch before its client can hear that it finished
            self._rows[seq.row] = None
        self._emit(seq, new)

    def _emit(self, seq: _Seq, new: list[int] | None = None, finish: str | None = None) -> None:
        st = seq.state
        try:
            seq.on_event(Event(seq.rid, st.delta if finish is None else "", new or [], finish or st.reason,
                               self.error if finish == "error" else None, len(seq.ids), len(st.token_ids)))
        except Exception:  # a broken consumer must not take the engine down
            self.abort(seq.rid)
