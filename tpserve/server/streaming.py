"""Engine events to asyncio: the engine runs its continuous-batching loop in its own thread and
calls back from there; each HTTP request turns those callbacks into an asyncio queue, so any
number of requests wait on the event loop while one decode step serves them all. Answers are
collected whole or streamed as server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from tpserve.engine.sampling import SamplingParams

from .middleware import Metrics
from .protocol import APIError, EngineFailed, engine_error, unavailable

POLL_S = 0.5  # how often a waiting request re-checks engine health (a safety net: the engine also sends "error")



@dataclass
class Choice:
    index: int
    prompt_ids: list[int]
    counts_prompt: bool = True  # the first of a prompt's n choices carries its prompt in the usage
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # one {token id: Logprob} per token, when asked for
    prompt_logprobs: list | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None
    started: bool = False  # an event of it has been sent on (streaming: the echo goes first)


@dataclass
class Generation:
    """The engine requests behind one HTTP request, and the queue their events arrive on."""

    engine: Any
    metrics: Metrics
    endpoint: str
    queue: asyncio.Queue
    started: float
    choices: dict[int, Choice] = field(default_factory=dict)  # engine request id -> choice
    pending: set[int] = field(default_factory=set)


def submit(engine, metrics: Metrics, endpoint: str, prompts: list[list[int]], params: SamplingParams,
            prompt_param: str) -> Generation:
    """Queue every prompt in the engine; nothing is left queued if one is refused."""
    if not engine.healthy:
        raise unavailable(engine)
    loop = asyncio.get_running_loop()
    gen = Generation(engine, metrics, endpoint, asyncio.Queue(), time.monotonic())

    def on_event(event) -> None:  # engine thread
        try:
            loop.call_soon_threadsafe(gen.queue.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            pass

    try:
        for i, ids in enumerate(prompts):
            for j in range(params.n):  # OpenAI's order: each prompt's n choices together
                rid = engine.submit(ids, params.for_child(j), on_event)
                gen.choices[rid] = Choice(i * params.n + j, ids, j == 0)
                gen.pending.add(rid)
    except ValueError as exc:
        _abort_pending(gen)
        raise APIError(400, str(exc), param=prompt_param, code="invalid_value") from None
    except RuntimeError:
        _abort_pending(gen)
        if not engine.healthy:
            raise unavailable(engine) from None
        raise
    metrics.prompt_tokens.inc(sum(len(p) for p in prompts) * params.n)
    return gen


def _abort_pending(gen: Generation) -> None:
    for rid in gen.pending:
        try:
            gen.engine.abort(rid)
        except Exception:  # the engine may already be gone; nothing is left to stop then
            pass
        gen.metrics.finished.labels("abort").inc()
    gen.pending.clear()


async def _events(gen: Generation, request: Request | None = None) -> AsyncIterator[tuple[Choice, Any]]:
    """Each engine event as (its choice, the event) until every prompt finished. Raises
    EngineFailed if the engine fails; aborts what is left if the consumer stops early or
    (with ``request``) the client goes away."""
    first_token_seen: set[int] = set()
    next_check = time.monotonic() + POLL_S
    try:
        while gen.pending:
            try:
                event = await asyncio.wait_for(gen.queue.get(), timeout=max(0.001, next_check - time.monotonic()))
            except TimeoutError:
                event = None
            if time.monotonic() >= next_check:  # checked even while events flow: a client can leave any time
                next_check = time.monotonic() + POLL_S
                if event is None and not gen.engine.healthy:
                    raise EngineFailed(gen.engine.error or "the engine was shut down (the server is stopping)")
                if request is not None and await request.is_disconnected():
                    return
            if event is None:
                continue
            choice = gen.choices.get(event.request_id)
            if choice is None or event.request_id not in gen.pending:
                continue
            if event.finish_reason == "error":
                raise EngineFailed(event.error or gen.engine.error or "the engine failed")
            if event.token_ids:
                gen.metrics.generated_tokens.inc(len(event.token_ids))
                if event.request_id not in first_token_seen:
                    first_token_seen.add(event.request_id)
                    gen.metrics.ttft.labels(gen.endpoint).observe(time.monotonic() - gen.started)
            choice.completion_tokens = event.completion_tokens
            choice.text.append(event.text)
            choice.token_ids.extend(event.token_ids)
            if event.logprobs:
                choice.logprobs.extend(event.logprobs)
            if event.prompt_logprobs is not None:
                choice.prompt_logprobs = event.prompt_logprobs
            if event.finish_reason is not None:
                choice.finish_reason = event.finish_reason
                gen.pending.discard(event.request_id)
                gen.metrics.finished.labels(event.finish_reason).inc()
            yield choice, event
        gen.metrics.latency.labels(gen.endpoint).observe(time.monotonic() - gen.started)
    except EngineFailed:
        gen.metrics.finished.labels("error").inc(len(gen.pending))
        gen.pending.clear()
        raise
    finally:
        _abort_pending(gen)


def usage(gen: Generation) -> dict:
    prompt = sum(len(c.prompt_ids) for c in gen.choices.values() if c.counts_prompt)
    completion = sum(c.completion_tokens for c in gen.choices.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


async def collect(gen: Generation, request: Request) -> None:
    try:
        async for _ in _events(gen, request):
            pass
    except EngineFailed as exc:
        raise engine_error(str(exc)) from None


def stream(gen: Generation, chunk: Callable[[Choice, Any], dict], include_usage: bool,
            head: list[dict]) -> StreamingResponse:
    """Server-sent events: ``head`` chunks, one chunk per token (its text; "" while it completes no
    character) or finish, optionally a usage chunk, then ``[DONE]``; an engine failure becomes an
    error event (then ``[DONE]``)."""

    async def body() -> AsyncIterator[str]:
        for h in head:
            yield _sse(h)
        try:
            async for choice, event in _events(gen):
                # a chunk per token, as vLLM streams, even one that completes no character yet
                if event.text or event.token_ids or event.finish_reason or event.logprobs:
                    yield _sse(chunk(choice, event))
                    choice.started = True
        except EngineFailed as exc:
            yield _sse(engine_error(str(exc)).body())
            yield _sse("[DONE]")
            return
        if include_usage:
            last = chunk(next(iter(gen.choices.values())), None)
            yield _sse({**last, "choices": [], "usage": usage(gen)})
        yield _sse("[DONE]")

    events = body()
    # a client gone before the body even started leaves ``events`` unstarted, so its finally never
    # runs: abort whatever is still pending once the response is dropped (a no-op after a full stream)
    weakref.finalize(events, _abort_pending, gen)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
