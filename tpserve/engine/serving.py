"""Continuous batching for servers: requests join and leave the running engine loop.

A thread on rank 0 owns an :class:`LLM` and turns its engine's :meth:`step` over and over: each
step decodes every running request and prefills chunks of waiting prompts, so requests join and
leave between steps. Callers see each request as a stream of :class:`Event`\\ s, delivered from
the engine's thread. That thread is a background one, or (``run_here=True``, as ``tpserve serve``
does) the caller's, through :meth:`ServingEngine.run`: torch's OpenMP threads take work fastest from
the main thread (measured on 2 cores: a parallel product started from a second thread took 2-3x
as long, and a decode step 2x; libgomp seems to count the main thread beside the second thread's
team, find more threads than cores, and stop spinning, so each parallel region waits for a wake-up).
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

from .llm import LLM
from .llm_engine import LLMEngine, StepTimer
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
    logprobs: list | None = None  # one {token id: Logprob} per new token, when asked for
    prompt_logprobs: list | None = None  # on a request's first event, when asked for


@dataclass
class _Request:
    rid: int
    ids: list[int]
    params: SamplingParams
    budget: int
    on_event: Callable[[Event], None]
    seq: Sequence | None = None
    told_prompt: bool = False


class ServingEngine:
    """An LLM plus the thread that batches whatever requests are in flight."""

    def __init__(self, model=None, tensor_parallel_size: int = 1, dtype: str = "auto", device: str | None = None,
                 max_batch: int = 16, max_model_len: int = 2048,
                 on_fatal: Callable[[str], None] | None = None, compile: bool = False,
                 tokenizer: str | None = None, skip_tokenizer_init: bool = False,
                 kv_cache_memory: int | None = None, enable_prefix_caching: bool = True,
                 quantization: str | None = None, run_here: bool = False) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.llm = LLM(model=model, tensor_parallel_size=tensor_parallel_size, dtype=dtype, device=device,
                       compile=compile, tokenizer=tokenizer, skip_tokenizer_init=skip_tokenizer_init,
                       max_num_seqs=max_batch, kv_cache_memory=kv_cache_memory,
                       enable_prefix_caching=enable_prefix_caching, quantization=quantization)
        self.engine: LLMEngine = self.llm.engine
        self.tokenizer = self.llm.tokenizer
        self.model_name = self.llm.model_path.name
        self.context = min(self.llm.context, max_model_len)
        self.max_batch = max_batch
        self.on_fatal = on_fatal
        self.error: str | None = None
        self._ids = itertools.count(1)
        self._incoming: deque[_Request] = deque()
        self._live: dict[int, _Request] = {}  # rid -> request, once the engine has it
        self._aborted: set[int] = set()
        self._wake = threading.Condition()
        self._stop = False
        self._looping: threading.Thread | None = None  # the thread turning the loop, while one does
        self._done = threading.Event()  # the loop has returned
        try:
            if compile:
                self._compile_now()
                self.engine.timer = StepTimer(self.engine.block_size)  # the compiles' step times say nothing
        except BaseException:
            self.llm.close()
            raise
        if not run_here:
            threading.Thread(target=self.run, name="tpserve-engine", daemon=True).start()

    def _compile_now(self) -> None:
        """Compile every decode graph a batch of up to ``max_batch`` rows can need, before the
        first request, so that no request waits for a compile."""
        from tpserve.parallel.layers import REDUCE_ROWS

        warm = SamplingParams(max_tokens=2, ignore_eos=True)
        for rows in sorted({min(n, self.max_batch) for n in (1, 2, REDUCE_ROWS + 1)}):
            if self.llm.model.decode_graph(rows) not in self.llm.model.compiled_graphs:
                self.llm.generate([[0, 0]] * rows, warm)

    # ---- public -------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self.error is None and not self._stop

    @property
    def queue_depth(self) -> int:
        return len(self._incoming) + len(self.engine.scheduler.waiting)

    @property
    def running(self) -> int:
        return len(self.engine.scheduler.running)

    def submit(self, prompt_token_ids: list[int], params: SamplingParams, on_event: Callable[[Event], None]) -> int:
        """Queue a request; ValueError at once if it can never run."""
        ids = self.llm._check_ids(list(prompt_token_ids), 0)
        if params.max_tokens > room_left(len(ids), self.context):
            raise ValueError(f"the prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                             f"model's context of {self.context} tokens; lower max_tokens or shorten the prompt")
        self.engine.check_fits(len(ids), params.max_tokens)
        if params.stop and self.tokenizer is None:
            self.llm._need_tokenizer("stop strings")
        req = _Request(next(self._ids), ids, params, params.max_tokens, on_event)
        with self._wake:  # checked under the lock the failure path takes, so no request is lost
            if not self.healthy:
                raise RuntimeError(f"the engine is not running: {self.error or 'closed'}")
            self._incoming.append(req)
            self._wake.notify()
        return req.rid

    def abort(self, request_id: int) -> None:
        with self._wake:
            self._aborted.add(request_id)

    def stop(self) -> None:
        """Ask the loop to return after its current step; safe in a signal handler (it takes no
        lock: an idle loop notices within its half-second wait)."""
        self._stop = True

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        looping = self._looping
        if looping is not None and looping is not threading.current_thread():
            self._done.wait(timeout=30)  # the loop must be out of the model before it closes
        self.llm.close()

    def run(self) -> None:
        """Turn the engine loop in the calling thread until :meth:`stop` / :meth:`close` or a
        failure (the background thread runs this too). A KeyboardInterrupt during a step fails
        the requests in flight, then propagates."""
        self._looping = threading.current_thread()
        try:
            self._loop()
        finally:
            self._looping = None
            self._done.set()

    # ---- the loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stop:
                self._take_new()
                if self.engine.has_unfinished():
                    for seq, new in self.engine.step():
                        req = self._live[seq.seq_id]
                        if seq.finished:  # out of the engine before its client can hear that it finished
                            del self._live[seq.seq_id]
                        self._emit(req, new)
                else:
                    with self._wake:
                        if not self._incoming and not self._aborted and not self._stop:
                            self._wake.wait(timeout=0.5)
                    if any(not p.is_alive() for p in self.llm._workers):  # died while idle
                        self.llm._fail("waiting for requests", None)
        except BaseException as exc:  # a worker died, a bug, or Ctrl-C in a step: fail everything, loudly
            with self._wake:
                self.error = f"{type(exc).__name__}: {exc}"
                pending = list(self._live.values()) + list(self._incoming)
                self._live.clear()
                self._incoming.clear()
            for req in pending:
                self._emit(req, finish="error")
            if self.on_fatal is not None:
                self.on_fatal(self.error)
            if isinstance(exc, KeyboardInterrupt):
                raise

    def _take_new(self) -> None:
        """Hand new requests to the engine and drop aborted ones, between steps."""
        with self._wake:
            new, self._incoming = list(self._incoming), deque()
            gone, self._aborted = self._aborted, set()
        for req in new:
            if req.rid in gone:
                continue
            req.seq = self.engine.add(req.ids, req.params, req.budget)
            self._live[req.seq.seq_id] = req
        for sid, req in list(self._live.items()):
            if req.rid in gone:
                self.engine.abort(req.seq)
                del self._live[sid]

    def _emit(self, req: _Request, new: list[int] | None = None, finish: str | None = None) -> None:
        st = req.seq
        delta = st.delta if st is not None and finish is None else ""
        reason = finish or (st.reason if st is not None else None)
        done = len(st.token_ids) if st is not None else 0
        logprobs = prompt = None
        if st is not None and finish is None:
            if st.logprobs is not None:
                logprobs = st.logprobs[len(st.logprobs) - len(new or []):]
            if st.prompt_logprobs is not None and not req.told_prompt:
                prompt, req.told_prompt = st.prompt_logprobs, True
        try:
            req.on_event(Event(req.rid, delta, new or [], reason, self.error if finish == "error" else None,
                               len(req.ids), done, logprobs, prompt))
        except Exception:  # a broken consumer must not take the engine down
            self.abort(req.rid)
