"""OpenAI-compatible HTTP API (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``)
over a :class:`~tpserve.engine.serving.ServingEngine`, plus ``/health`` and ``/metrics``.

The engine runs its continuous-batching loop in its own thread and calls back from there;
each HTTP request turns those callbacks into an asyncio queue, so any number of requests
wait on the event loop while one decode step serves them all. Every error a client can see
has OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so the official
clients raise their usual exceptions.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
import socket
import sys
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tpserve.engine.detokenizer import max_token_chars
from tpserve.engine.sampling import SamplingParams

from .limits import (
    DEFAULT_MAX_REQUEST_BYTES,
    BodyTooLarge,
    PromptTooLong,
    Tokenizing,
    counted,
    declared_too_large,
    drain,
)

POLL_S = 0.5  # how often a waiting request re-checks engine health (a safety net: the engine also sends "error")
UNHEALTHY_GRACE_S = 2.0  # after the engine fails, keep answering 503s this long, then exit
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
_ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


# ---- errors ------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered to the client as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class EngineFailed(Exception):
    """The engine stopped (a worker died) while this request was waiting on it."""


def _too_large(limit: int) -> APIError:
    return APIError(413, str(BodyTooLarge(limit)), code="request_too_large")


def _engine_error(message: str) -> APIError:
    return APIError(500, f"the inference engine failed: {message}", "server_error", None, "engine_error")


def _unavailable(engine) -> APIError:
    return APIError(503, f"the inference engine is not running: {engine.error or 'shut down'}", "server_error",
                    None, "engine_unavailable")


# ---- request bodies ----------------------------------------------------------------------

class _Strict(BaseModel):
    # strict: "16" is not a number, 1.0 is not an integer (as OpenAI); unknown fields are ignored
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationRequest(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extension; 0 or -1 disable it
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    ignore_eos: bool = False  # vLLM's extension (benchmarks)


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None


_UNION_TYPES = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of token-id lists",
    "stop": "a string or a list of strings",
    "content": "a string or a list of content parts",
}


def _param_name(loc: tuple) -> str | None:
    """``("messages", 0, "content", "str")`` -> ``"messages[0].content"`` (pydantic's union tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part not in ("str", "int", "float", "bool", "list", "dict"):
            out += f".{part}" if out else part
        else:
            break
    return out or None


def _validation_error(errors: list[dict]) -> APIError:
    """The first problem pydantic found, said the way OpenAI says it."""
    first = errors[0]
    kind, loc = first["type"], tuple(first.get("loc", ()))
    if loc and loc[0] in ("body", "query", "path", "header"):  # FastAPI's RequestValidationError says where
        loc = loc[1:]
    param = _param_name(loc)
    if kind == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first['msg']}")
    if kind == "missing":
        return APIError(400, f"missing required field '{param}'", param=param, code="missing_required_parameter")
    if param is None:  # the body as a whole is wrong (an array, a number...)
        return APIError(400, "the request body must be a JSON object")
    leaf = param.rsplit(".", 1)[-1].split("[", 1)[0] if param else ""
    same_field = [e for e in errors if _param_name(tuple(e.get("loc", ()))[:1]) == _param_name(loc[:1])]
    if leaf in _UNION_TYPES and len(same_field) > 1:
        message = f"invalid type for '{param}': expected {_UNION_TYPES[leaf]}"
    else:
        got = first.get("input")
        shown = json.dumps(got)[:80] if isinstance(got, (str, int, float, bool, type(None))) else type(got).__name__
        message = f"invalid value for '{param}': {first['msg'].lower()}, got {shown}"
    return APIError(400, message, param=param, code="invalid_type" if kind.endswith("_type") else "invalid_value")


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    if not raw.strip():
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise _validation_error(exc.errors(include_url=False)) from None


# ---- request -> engine inputs ------------------------------------------------------------

def _check_model(engine, name: str) -> None:
    if name != engine.model_name:
        raise APIError(404, f"the model '{name}' does not exist; this server serves '{engine.model_name}'",
                       param="model", code="model_not_found")


def _sampling_params(req: _GenerationRequest, max_tokens: int | None, longest_prompt: int, context: int,
                     prompt_param: str) -> SamplingParams:
    """Check the sampling fields (naming the bad one) and turn them into engine parameters."""
    if req.n not in (None, 1):
        raise APIError(400, f"only n=1 is supported, got n={req.n}", param="n", code="unsupported_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0):
            raise APIError(400, f"'{name}' is not supported (only 0)", param=name, code="unsupported_value")
    temperature = 1.0 if req.temperature is None else req.temperature
    if not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be between 0 and 2, got {temperature}", param="temperature",
                       code="invalid_value")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p", code="invalid_value")
    top_k = 0 if req.top_k in (None, -1) else req.top_k
    if top_k < 0:
        raise APIError(400, f"top_k must be >= 0 (0 or -1 disable it), got {req.top_k}", param="top_k",
                       code="invalid_value")
    if req.seed is not None and not -2**63 <= req.seed < 2**64:
        raise APIError(400, "seed must fit in 64 bits", param="seed", code="invalid_value")
    if longest_prompt >= context:
        raise APIError(400, f"this model's maximum context length is {context} tokens, but the prompt has "
                            f"{longest_prompt} tokens, which leaves no room to generate",
                       param=prompt_param, code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = context - longest_prompt
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens",
                       code="invalid_value")
    if longest_prompt + max_tokens > context:
        raise APIError(400, f"this model's maximum context length is {context} tokens, but you requested "
                            f"{longest_prompt + max_tokens} tokens ({longest_prompt} in the prompt, {max_tokens} "
                            f"for the completion); lower max_tokens or shorten the prompt",
                       param="max_tokens", code="context_length_exceeded")
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              seed=req.seed, stop=req.stop, ignore_eos=req.ignore_eos)
    except ValueError as exc:
        raise APIError(400, str(exc), code="invalid_value") from None


def _need_tokenizer(engine, what: str, param: str) -> None:
    if engine.tokenizer is None:
        raise APIError(400, f"{what} needs a tokenizer, but the model '{engine.model_name}' was loaded without one; "
                            f"send token ids, or restart the server with --tokenizer PATH", param=param,
                       code="unsupported_value")


async def _encode(tok: Tokenizing, engine, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``text``; a text longer than the context could hold is refused untokenized."""
    try:
        return await tok.encode(text, add_special_tokens)
    except PromptTooLong as exc:
        raise APIError(400, f"this model's maximum context length is {engine.context} tokens, but {exc}; "
                            f"shorten the prompt", param=param, code="context_length_exceeded") from None


async def _completion_prompts(engine, tok: Tokenizing | None, req: CompletionRequest) -> list[list[int]]:
    """OpenAI's four prompt shapes -> one list of token ids per prompt."""
    prompt = req.prompt
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "'prompt' is empty", param="prompt", code="invalid_value")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            _need_tokenizer(engine, "a text prompt", "prompt")
            ids = await _encode(tok, engine, p, "prompt")
        else:
            ids = list(p)
        if not ids:
            raise APIError(400, f"prompt {i} is empty", param="prompt", code="invalid_value")
        out.append(ids)
    return out


async def _chat_prompt(engine, tok: Tokenizing | None, req: ChatRequest) -> list[int]:
    """The conversation through the model's chat template, ready for the assistant's turn."""
    if req.tools:
        raise APIError(400, "tools are not supported by this server", param="tools", code="unsupported_value")
    if req.logprobs:
        raise APIError(400, "logprobs are not supported by this server", param="logprobs", code="unsupported_value")
    messages = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"only text content parts are supported, got type {part.get('type')!r}",
                                   param=f"messages[{i}].content[{j}]", code="unsupported_value")
                texts.append(part["text"])
            content = "\n".join(texts)
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    _need_tokenizer(engine, "a chat request", "messages")
    if not getattr(engine.tokenizer, "chat_template", None):
        raise APIError(400, f"the model '{engine.model_name}' has no chat template; use /v1/completions",
                       param="messages", code="unsupported_value")
    chars = sum(len(m["content"]) for m in messages)
    if tok.too_long(chars):  # before the template: it would copy megabytes too
        raise APIError(400, f"this model's maximum context length is {engine.context} tokens, but the messages "
                            f"have {chars:,} characters, more than that many tokens can hold; shorten them",
                       param="messages", code="context_length_exceeded")
    try:
        text = await tok.run(lambda: engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                          tokenize=False))
    except Exception as exc:  # the template's own checks (e.g. roles must alternate)
        raise APIError(400, f"the chat template rejected these messages: {exc}", param="messages",
                       code="invalid_value") from None
    return await _encode(tok, engine, text, "messages", add_special_tokens=False)


# ---- metrics -----------------------------------------------------------------------------

@dataclass
class Metrics:
    """This app's Prometheus metrics, in a registry of their own (so several apps can share a process)."""

    registry: CollectorRegistry
    requests: Counter
    prompt_tokens: Counter
    generated_tokens: Counter
    ttft: Histogram
    latency: Histogram
    finished: Counter
    tokenized_chars: Counter


def _make_metrics(engine) -> Metrics:
    reg = CollectorRegistry()
    metrics = Metrics(
        registry=reg,
        requests=Counter("tpserve_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"],
                         registry=reg),
        prompt_tokens=Counter("tpserve_prompt_tokens", "Prompt tokens of admitted requests", registry=reg),
        generated_tokens=Counter("tpserve_generated_tokens", "Tokens generated", registry=reg),
        ttft=Histogram("tpserve_time_to_first_token_seconds", "Request arrival to its first generated token",
                       ["endpoint"], buckets=_TTFT_BUCKETS, registry=reg),
        latency=Histogram("tpserve_request_latency_seconds", "Request arrival to its last token",
                          ["endpoint"], buckets=_LATENCY_BUCKETS, registry=reg),
        finished=Counter("tpserve_finished_requests", "Generations by how they ended (stop, length, abort, error)",
                         ["reason"], registry=reg),
        tokenized_chars=Counter("tpserve_tokenized_characters", "Characters of prompt text tokenized",
                                registry=reg),
    )
    Gauge("tpserve_queue_depth", "Requests waiting for a free batch slot", registry=reg).set_function(
        lambda: engine.queue_depth)
    Gauge("tpserve_running_requests", "Requests in the decode batch", registry=reg).set_function(
        lambda: engine.running)
    Gauge("tpserve_engine_healthy", "1 while the engine and all its workers run", registry=reg).set_function(
        lambda: 1.0 if engine.healthy else 0.0)
    return metrics


def _endpoint_label(path: str) -> str:
    if path in _ENDPOINTS:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


def _outer_middleware(app: ASGIApp, metrics: Metrics, api_key: str | None, max_request_bytes: int) -> ASGIApp:
    """Outermost ASGI layer: the API-key check (before the body is read), the body-size limit
    (as the body arrives) and request counting."""
    expected = f"Bearer {api_key}".encode() if api_key else None

    async def edge(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        status = 500  # what a crash before any response counts as

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if expected is not None and scope["path"].startswith("/v1"):
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(given, expected):
                    what = "no API key was given" if not given else "the API key is wrong"
                    err = APIError(401, f"{what}; send 'Authorization: Bearer <key>'",
                                   code="invalid_api_key")
                    await err.response()(scope, receive, send_counted)
                    return
            if declared_too_large(scope["headers"], max_request_bytes):
                await drain(receive)
                await _too_large(max_request_bytes).response()(scope, receive, send_counted)
                return
            await app(scope, counted(receive, max_request_bytes), send_counted)
        finally:
            metrics.requests.labels(_endpoint_label(scope["path"]), str(status)).inc()

    return edge


# ---- engine events -> asyncio ------------------------------------------------------------

@dataclass
class _Choice:
    index: int
    prompt_tokens: int
    text: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None


@dataclass
class _Generation:
    """The engine requests behind one HTTP request, and the queue their events arrive on."""

    engine: Any
    metrics: Metrics
    endpoint: str
    queue: asyncio.Queue
    started: float
    choices: dict[int, _Choice] = field(default_factory=dict)  # engine request id -> choice
    pending: set[int] = field(default_factory=set)


def _submit(engine, metrics: Metrics, endpoint: str, prompts: list[list[int]], params: SamplingParams,
            prompt_param: str) -> _Generation:
    """Queue every prompt in the engine; nothing is left queued if one is refused."""
    if not engine.healthy:
        raise _unavailable(engine)
    loop = asyncio.get_running_loop()
    gen = _Generation(engine, metrics, endpoint, asyncio.Queue(), time.monotonic())

    def on_event(event) -> None:  # engine thread
        try:
            loop.call_soon_threadsafe(gen.queue.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            pass

    try:
        for i, ids in enumerate(prompts):
            rid = engine.submit(ids, params, on_event)
            gen.choices[rid] = _Choice(i, len(ids))
            gen.pending.add(rid)
    except ValueError as exc:
        _abort_pending(gen)
        raise APIError(400, str(exc), param=prompt_param, code="invalid_value") from None
    except RuntimeError:
        _abort_pending(gen)
        if not engine.healthy:
            raise _unavailable(engine) from None
        raise
    metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
    return gen


def _abort_pending(gen: _Generation) -> None:
    for rid in gen.pending:
        try:
            gen.engine.abort(rid)
        except Exception:  # the engine may already be gone; nothing is left to stop then
            pass
        gen.metrics.finished.labels("abort").inc()
    gen.pending.clear()


async def _events(gen: _Generation, request: Request | None = None) -> AsyncIterator[tuple[_Choice, Any]]:
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


def _usage(gen: _Generation) -> dict:
    prompt = sum(c.prompt_tokens for c in gen.choices.values())
    completion = sum(c.completion_tokens for c in gen.choices.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


async def _collect(gen: _Generation, request: Request) -> None:
    try:
        async for _ in _events(gen, request):
            pass
    except EngineFailed as exc:
        raise _engine_error(str(exc)) from None


def _stream(gen: _Generation, chunk: Callable[[_Choice, str | None, str | None], dict], include_usage: bool,
            head: list[dict]) -> StreamingResponse:
    """Server-sent events: ``head`` chunks, one chunk per piece of text or finish, optionally a usage
    chunk, then ``[DONE]``; an engine failure becomes an error event (then ``[DONE]``)."""

    async def body() -> AsyncIterator[str]:
        for h in head:
            yield _sse(h)
        try:
            async for choice, event in _events(gen):
                if event.text or event.finish_reason:
                    yield _sse(chunk(choice, event.text, event.finish_reason))
        except EngineFailed as exc:
            yield _sse(_engine_error(str(exc)).body())
            yield _sse("[DONE]")
            return
        if include_usage:
            last = chunk(next(iter(gen.choices.values())), None, None)
            yield _sse({**last, "choices": [], "usage": _usage(gen)})
        yield _sse("[DONE]")

    events = body()
    # a client gone before the body even started leaves ``events`` unstarted, so its finally never
    # runs: abort whatever is still pending once the response is dropped (a no-op after a full stream)
    weakref.finalize(events, _abort_pending, gen)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- the app -----------------------------------------------------------------------------

def create_app(engine, api_key: str | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The HTTP API over ``engine`` (a ServingEngine or anything with its interface). With
    ``api_key``, every ``/v1`` route needs ``Authorization: Bearer <api_key>``; ``/health``
    and ``/metrics`` stay open for probes and scrapers. A body over ``max_request_bytes`` is
    answered 413 as soon as it is known to be."""
    app = FastAPI(title="tpserve", description="OpenAI-compatible API over a tensor-parallel engine",
                  version="0.1.0")
    metrics = _make_metrics(engine)
    app.state.engine, app.state.metrics = engine, metrics
    app.add_middleware(_outer_middleware, metrics=metrics, api_key=api_key, max_request_bytes=max_request_bytes)
    created = int(time.time())
    tok = None
    if engine.tokenizer is not None:
        tok = Tokenizing(engine.tokenizer, engine.context, max_token_chars(engine.tokenizer),
                         metrics.tokenized_chars.inc)
    app.state.tokenizing = tok

    @app.exception_handler(BodyTooLarge)
    async def _body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return _too_large(max_request_bytes).response()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors()) or [{"type": "value_error", "loc": (), "msg": "invalid request"}]
        return _validation_error(errors).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = f"no route {request.method} {request.url.path}" if exc.status_code in codes else str(exc.detail)
        return APIError(exc.status_code, message, code=codes.get(exc.status_code)).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        return APIError(500, f"internal server error: {type(exc).__name__}: {exc}", "server_error").response()

    def model_card() -> dict:
        return {"id": engine.model_name, "object": "model", "created": created, "owned_by": "tpserve",
                "max_model_len": engine.context}

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.healthy:
            return JSONResponse({"status": "ok", "model": engine.model_name})
        return JSONResponse({"status": "unhealthy", "error": engine.error}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        _check_model(engine, model_id)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await _parse(request, CompletionRequest)
        _check_model(engine, req.model)
        for name, used in (("echo", req.echo), ("logprobs", req.logprobs), ("best_of", req.best_of not in (None, 1))):
            if used:
                raise APIError(400, f"'{name}' is not supported by this server", param=name,
                               code="unsupported_value")
        prompts = await _completion_prompts(engine, tok, req)
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        params = _sampling_params(req, max_tokens, max(len(p) for p in prompts), engine.context, "prompt")
        gen = _submit(engine, metrics, "/v1/completions", prompts, params, "prompt")
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": now, "model": engine.model_name}

        if req.stream:
            def chunk(choice: _Choice, text: str | None, finish: str | None) -> dict:
                return {**base, "choices": [{"index": choice.index, "text": text or "", "logprobs": None,
                                             "finish_reason": finish}]}

            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _stream(gen, chunk, include_usage, head=[])
        await _collect(gen, request)
        choices = [{"index": c.index, "text": "".join(c.text), "logprobs": None, "finish_reason": c.finish_reason}
                   for c in sorted(gen.choices.values(), key=lambda c: c.index)]
        return JSONResponse({**base, "choices": choices, "usage": _usage(gen)})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await _parse(request, ChatRequest)
        _check_model(engine, req.model)
        ids = await _chat_prompt(engine, tok, req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = _sampling_params(req, max_tokens, len(ids), engine.context, "messages")
        gen = _submit(engine, metrics, "/v1/chat/completions", [ids], params, "messages")
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "chat.completion", "created": now, "model": engine.model_name}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            extra = {"usage": None} if include_usage else {}
            base = {**base, "object": "chat.completion.chunk"}

            def chunk(choice: _Choice, text: str | None, finish: str | None) -> dict:
                delta = {"content": text} if text else {}
                return {**base, "choices": [{"index": choice.index, "delta": delta, "logprobs": None,
                                             "finish_reason": finish}], **extra}

            role = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}], **extra}
            return _stream(gen, chunk, include_usage, head=[role])
        await _collect(gen, request)
        choice = next(iter(gen.choices.values()))
        message = {"role": "assistant", "content": "".join(choice.text)}
        return JSONResponse({**base, "choices": [{"index": 0, "message": message, "logprobs": None,
                                                  "finish_reason": choice.finish_reason}],
                             "usage": _usage(gen)})

    return app


# ---- the command -------------------------------------------------------------------------

def _listen(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a busy port fails in a second, not after the load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as exc:  # OverflowError: a port outside 0..65535
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _watch(engine, server, failure: list[str]) -> None:
    """Stop the server (after a short grace for in-flight replies and health probes) once the
    engine fails; on Ctrl-C or SIGTERM stop the engine at once, so in-flight requests end with an
    error now instead of holding uvicorn's graceful shutdown until it gives up on them."""
    while not server.should_exit:
        if not engine.healthy:
            failure.append(engine.error or "the engine stopped")
            print(f"tpserve serve: the engine failed ({failure[0]}); answering 503 for {UNHEALTHY_GRACE_S:g}s, "
                  f"then exiting", file=sys.stderr, flush=True)
            time.sleep(UNHEALTHY_GRACE_S)
            server.should_exit = True
            return
        time.sleep(0.2)
    engine.close()


def serve(args) -> None:
    """``tpserve serve``: load the engine, serve HTTP until Ctrl-C or SIGTERM (then return) or
    an engine failure (then raise, so the process exits non-zero and says why)."""
    import uvicorn

    from tpserve.engine.llm import WorkerError
    from tpserve.engine.serving import ServingEngine

    api_key = args.api_key or os.environ.get("TPSERVE_API_KEY") or None  # the environment keeps it out of `ps`
    sock = _listen(args.host, args.port)
    if not _is_loopback(args.host) and not api_key:
        print(f"tpserve serve: warning: listening on {args.host} without --api-key; anyone who can reach this "
              f"port can use the model", file=sys.stderr)
    try:
        engine = ServingEngine(model=args.model, tensor_parallel_size=args.tp, dtype=args.dtype, device=args.device,
                               max_batch=args.max_batch, max_model_len=args.max_model_len,
                               compile=getattr(args, "compile", False), tokenizer=getattr(args, "tokenizer", None))
    except BaseException:
        sock.close()
        raise
    failure: list[str] = []
    try:
        app = create_app(engine, api_key=api_key,
                         max_request_bytes=getattr(args, "max_request_bytes", None) or DEFAULT_MAX_REQUEST_BYTES)
        server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
        threading.Thread(target=_watch, args=(engine, server, failure), name="tpserve-watchdog", daemon=True).start()
        shown = f"[{args.host}]" if ":" in args.host else args.host
        compiled = ", compiled decode" if getattr(args, "compile", False) else ""
        print(f"tpserve serve: {engine.model_name} (TP={args.tp}, max batch {args.max_batch}, context "
              f"{engine.context}{compiled}) at http://{shown}:{args.port}/v1", file=sys.stderr, flush=True)
        server.run(sockets=[sock])
    finally:
        sock.close()
        engine.close()
    if failure:
        raise WorkerError(f"the server stopped because the engine failed: {failure[0]}")
