"""OpenAI-compatible HTTP API (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``)
over a :class:`~tpserve.engine.serving.ServingEngine`, plus ``/health`` and ``/metrics``.

Request bodies and errors are in ``protocol``, what every request passes through in
``middleware``, the way answers come back from the engine in ``streaming``; here, the routes,
what a request asks of the engine, and the ``serve`` command.
"""


from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import sys
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from tpserve.engine.detokenizer import max_token_chars
from tpserve.engine.llm import MAX_LOGPROBS
from tpserve.engine.sampling import SamplingParams, room_left
from tpserve.utils.heap import freeze_heap

from .limits import (
    DEFAULT_MAX_REQUEST_BYTES,
    BodyTooLarge,
    PromptTooLong,
    Tokenizing,
)
from .middleware import make_metrics, outer_middleware
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerationRequest,
    TokenizeRequest,
    parse,
    too_large,
    validation_error,
)
from .streaming import Choice, collect, stream, submit, usage

UNHEALTHY_GRACE_S = 2.0  # after the engine fails, keep answering 503s this long, then exit
MAX_N = 64
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


# ---- request -> engine inputs ------------------------------------------------------------

def _check_model(engine, name: str) -> None:
    if name != engine.model_name:
        raise APIError(404, f"the model '{name}' does not exist; this server serves '{engine.model_name}'",
                       param="model", code="model_not_found")


def _sampling_params(req: GenerationRequest, max_tokens: int | None, longest_prompt: int, context: int,
                     prompt_param: str, logprobs: int | None = None, prompt_logprobs: int | None = None
                     ) -> SamplingParams:
    """Check the sampling fields (naming the bad one) and turn them into engine parameters."""
    n = 1 if req.n is None else req.n
    if not 1 <= n <= MAX_N:
        raise APIError(400, f"n must be between 1 and {MAX_N}, got {n}", param="n", code="invalid_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= (getattr(req, name) or 0) <= 2:
            raise APIError(400, f"{name} must be between -2 and 2, got {getattr(req, name)}", param=name,
                           code="invalid_value")
    if req.repetition_penalty is not None and not req.repetition_penalty > 0:
        raise APIError(400, f"repetition_penalty must be > 0 (1 disables it), got {req.repetition_penalty}",
                       param="repetition_penalty", code="invalid_value")
    if req.min_p is not None and not 0 <= req.min_p <= 1:
        raise APIError(400, f"min_p must be between 0 and 1, got {req.min_p}", param="min_p", code="invalid_value")
    if req.stop_token_ids is not None and not all(0 <= t for t in req.stop_token_ids):
        raise APIError(400, "stop_token_ids must be token ids (integers >= 0)", param="stop_token_ids",
                       code="invalid_value")
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
    room = room_left(longest_prompt, context)
    if room < 1:
        raise APIError(400, f"this model's maximum context length is {context} tokens, but the prompt has "
                            f"{longest_prompt} tokens, which leaves no room to generate",
                       param=prompt_param, code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = room
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens",
                       code="invalid_value")
    if max_tokens > room:
        raise APIError(400, f"this model's maximum context length is {context} tokens, but you requested "
                            f"{longest_prompt + max_tokens} tokens ({longest_prompt} in the prompt, {max_tokens} "
                            f"for the completion); lower max_tokens or shorten the prompt",
                       param="max_tokens", code="context_length_exceeded")
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              seed=req.seed, stop=req.stop, ignore_eos=req.ignore_eos, n=n,
                              presence_penalty=req.presence_penalty or 0.0,
                              frequency_penalty=req.frequency_penalty or 0.0,
                              repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                              min_p=req.min_p or 0.0, stop_token_ids=req.stop_token_ids, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs)
    except ValueError as exc:
        raise APIError(400, str(exc), code="invalid_value") from None


def _check_logprobs(k: int | None, param: str) -> None:
    if k is not None and not 0 <= k <= MAX_LOGPROBS:
        raise APIError(400, f"{param} must be between 0 and {MAX_LOGPROBS}, got {k}", param=param,
                       code="invalid_value")


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


# ---- log-probabilities, in OpenAI's two shapes ---------------------------------------------

def _token_name(engine, token: int, entry: dict | None) -> str:
    if entry is not None and token in entry and entry[token].decoded_token is not None:
        return entry[token].decoded_token
    if engine.tokenizer is not None:
        return engine.tokenizer.decode([token])
    return f"token_id:{token}"  # vLLM's spelling when there is no text


def _completion_logprobs(engine, tokens: list[int], entries: list[dict | None]) -> dict:
    """``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``; an entry of None (the
    first prompt token) has no log-probability."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for token, entry in zip(tokens, entries):
        name = _token_name(engine, token, entry)
        out["tokens"].append(name)
        out["text_offset"].append(offset)
        offset += len(name)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(entry[token].logprob)
        out["top_logprobs"].append({_token_name(engine, t, entry): lp.logprob for t, lp in entry.items()})
    return out


def _chat_logprobs(engine, tokens: list[int], entries: list[dict], k: int) -> dict:
    def item(token: int, entry: dict) -> dict:
        name = _token_name(engine, token, entry)
        return {"token": name, "logprob": entry[token].logprob, "bytes": list(name.encode("utf-8"))}

    content = []
    for token, entry in zip(tokens, entries):
        top = sorted((t for t, lp in entry.items() if lp.rank is not None and lp.rank <= k), key=lambda t: entry[t].rank)
        content.append({**item(token, entry), "top_logprobs": [item(t, entry) for t in top]})
    return {"content": content}


def _logprobs_of(engine, req, chat: bool, choice: Choice, tokens: list[int], entries: list, echo: bool):
    """The choice's ``logprobs`` field for ``tokens`` (with the prompt's first, for an echo)."""
    if chat:
        return _chat_logprobs(engine, tokens, entries, req.top_logprobs or 0) if req.logprobs else None
    if req.logprobs is None:
        return None
    if echo:
        prompt = choice.prompt_logprobs or [None] * len(choice.prompt_ids)
        tokens, entries = choice.prompt_ids + tokens, list(prompt) + list(entries)
    return _completion_logprobs(engine, tokens, entries)


def _prompt_text(engine, choice: Choice) -> str:
    return engine.tokenizer.decode(choice.prompt_ids) if engine.tokenizer is not None else ""


# ---- the app -----------------------------------------------------------------------------

async def _answer(request: Request, engine, gen, req: GenerationRequest, chat: bool) -> Response:
    """The one way a generation comes back, for completions and chat alike: collected whole, or
    streamed as server-sent events; only the shape of a choice differs."""
    base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": engine.model_name}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        extra = {"usage": None} if chat and include_usage else {}
        if chat:
            base = {**base, "object": "chat.completion.chunk"}

        def chunk(choice: Choice, event) -> dict:
            text, finish = (event.text, event.finish_reason) if event is not None else (None, None)
            echo = not chat and req.echo and event is not None and not choice.started
            if echo:  # a completion's echoed prompt comes before its first piece of text
                text = _prompt_text(engine, choice) + (text or "")
            token = event is not None and bool(event.token_ids)  # a token that completes no character: content ""
            part = {"delta": {"content": text or ""} if text or token else {}} if chat else {"text": text or ""}
            logprobs = None
            if event is not None and event.logprobs:
                new = event.token_ids[:len(event.logprobs)]
                logprobs = _logprobs_of(engine, req, chat, choice, new, event.logprobs, echo)
            return {**base, "choices": [{"index": choice.index, **part, "logprobs": logprobs,
                                         "finish_reason": finish}], **extra}

        head = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None}], **extra}] if chat else []
        return stream(gen, chunk, include_usage, head=head)
    await collect(gen, request)
    choices = []
    for c in sorted(gen.choices.values(), key=lambda c: c.index):
        text = "".join(c.text)
        echo = not chat and req.echo
        if echo:
            text = _prompt_text(engine, c) + text
        part = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        tokens = c.token_ids[:len(c.logprobs)]  # an ending EOS has no entry: it is not output
        logprobs = _logprobs_of(engine, req, chat, c, tokens, c.logprobs, echo)
        choices.append({"index": c.index, **part, "logprobs": logprobs, "finish_reason": c.finish_reason})
    return JSONResponse({**base, "choices": choices, "usage": usage(gen)})


def create_app(engine, api_key: str | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The HTTP API over ``engine`` (a ServingEngine or anything with its interface). With
    ``api_key``, every ``/v1`` route needs ``Authorization: Bearer <api_key>``; ``/health``
    and ``/metrics`` stay open for probes and scrapers. A body over ``max_request_bytes`` is
    answered 413 as soon as it is known to be."""
    app = FastAPI(title="tpserve", description="OpenAI-compatible API over a tensor-parallel engine",
                  version="0.1.0")
    metrics = make_metrics(engine)
    app.state.engine, app.state.metrics = engine, metrics
    app.add_middleware(outer_middleware, metrics=metrics, api_key=api_key, max_request_bytes=max_request_bytes)
    created = int(time.time())
    tok = None
    if engine.tokenizer is not None:
        tok = Tokenizing(engine.tokenizer, engine.context, max_token_chars(engine.tokenizer),
                         metrics.tokenized_chars.inc)
    app.state.tokenizing = tok

    @app.exception_handler(BodyTooLarge)
    async def _body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return too_large(max_request_bytes).response()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors()) or [{"type": "value_error", "loc": (), "msg": "invalid request"}]
        return validation_error(errors).response()

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
        req = await parse(request, CompletionRequest)
        _check_model(engine, req.model)
        if req.best_of not in (None, 1, req.n):
            raise APIError(400, "'best_of' other than n is not supported by this server", param="best_of",
                           code="unsupported_value")
        _check_logprobs(req.logprobs, "logprobs")
        prompts = await _completion_prompts(engine, tok, req)
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        params = _sampling_params(req, max_tokens, max(len(p) for p in prompts), engine.context, "prompt",
                                  req.logprobs, req.logprobs if req.echo and req.logprobs is not None else None)
        gen = submit(engine, metrics, "/v1/completions", prompts, params, "prompt")
        return await _answer(request, engine, gen, req, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await parse(request, ChatRequest)
        _check_model(engine, req.model)
        _check_logprobs(req.top_logprobs, "top_logprobs")
        ids = await _chat_prompt(engine, tok, req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = _sampling_params(req, max_tokens, len(ids), engine.context, "messages",
                                  (req.top_logprobs or 0) if req.logprobs else None)
        gen = submit(engine, metrics, "/v1/chat/completions", [ids], params, "messages")
        return await _answer(request, engine, gen, req, chat=True)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        """vLLM's: a prompt's token ids, or chat messages' through the template."""
        req = await parse(request, TokenizeRequest)
        if req.model is not None:
            _check_model(engine, req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "send either 'prompt' or 'messages'", param="prompt", code="invalid_value")
        _need_tokenizer(engine, "/tokenize", "prompt" if req.prompt is not None else "messages")
        if req.prompt is not None:
            ids = await _encode(tok, engine, req.prompt, "prompt", req.add_special_tokens)
        else:
            ids = await _chat_prompt(engine, tok, ChatRequest(model=engine.model_name, messages=req.messages))
        return {"count": len(ids), "max_model_len": engine.context, "tokens": ids, "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        req = await parse(request, DetokenizeRequest)
        if req.model is not None:
            _check_model(engine, req.model)
        _need_tokenizer(engine, "/detokenize", "tokens")
        vocab = len(engine.tokenizer)
        if not all(0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"tokens must be ids in 0..{vocab - 1}", param="tokens", code="invalid_value")
        return {"prompt": engine.tokenizer.decode(req.tokens)}

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


@contextlib.contextmanager
def _stop_on_signals(server, engine):
    """The first Ctrl-C or SIGTERM stops the HTTP server and the engine at once, so in-flight
    requests end with an error now instead of holding the graceful shutdown; a second Ctrl-C
    interrupts whatever runs. Afterwards the signal is raised again with the old handlers back
    (Ctrl-C: exit 130), as uvicorn does when it holds the signals itself."""
    caught: list[int] = []

    def handle(sig, frame) -> None:
        caught.append(sig)
        server.should_exit = True
        engine.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    old = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    for sig in caught[:1]:
        signal.raise_signal(sig)


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
                               compile=getattr(args, "compile", False), tokenizer=getattr(args, "tokenizer", None),
                               kv_cache_memory=getattr(args, "kv_cache_memory", None),
                               enable_prefix_caching=getattr(args, "prefix_caching", True),
                               quantization=getattr(args, "quantization", None), run_here=True)
    except BaseException:
        sock.close()
        raise
    try:
        app = create_app(engine, api_key=api_key,
                         max_request_bytes=getattr(args, "max_request_bytes", None) or DEFAULT_MAX_REQUEST_BYTES)
        server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))

        def http() -> None:  # HTTP on a thread of its own; the engine loop keeps the main thread
            try:
                server.run(sockets=[sock])
            finally:
                engine.stop()  # the server is gone (stopped, or it failed to start): so is the engine

        web = threading.Thread(target=http, name="tpserve-http", daemon=True)
        freeze_heap()  # the engine, the app and every module they import: out of the collector's walks
        shown = f"[{args.host}]" if ":" in args.host else args.host
        compiled = ", compiled decode" if getattr(args, "compile", False) else ""
        with _stop_on_signals(server, engine):
            web.start()
            print(f"tpserve serve: {engine.model_name} (TP={args.tp}, max batch {args.max_batch}, context "
                  f"{engine.context}{compiled}) at http://{shown}:{args.port}/v1", file=sys.stderr, flush=True)
            engine.run()  # until a signal, the server's end, or an engine failure
            if engine.error is not None and not server.should_exit:
                print(f"tpserve serve: the engine failed ({engine.error}); answering 503 for "
                      f"{UNHEALTHY_GRACE_S:g}s, then exiting", file=sys.stderr, flush=True)
                web.join(timeout=UNHEALTHY_GRACE_S)
            server.should_exit = True
            engine.close()  # in-flight requests end now, with an error
            web.join(timeout=30)
    finally:
        sock.close()
        engine.close()
    if engine.error is not None:
        raise WorkerError(f"the server stopped because the engine failed: {engine.error}")
