"""The OpenAI-compatible server.

HTTP behaviour (errors, auth, SSE format, metrics, disconnects, engine failure) runs against
a fake engine with ServingEngine's interface: fast, no model. The real engine at TP=2 then
serves the official ``openai`` client, 16 concurrent streams (each checked against the same
prompt run alone through ``tpserve.LLM``), and a killed worker, through ``tpserve serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from tpserve.engine.sampling import SamplingParams
from tpserve.engine.serving import Event
from tpserve.server import create_app
from tpserve.utils.net import free_port

# ---- a fake engine ------------------------------------------------------------------------

REPLY = ["Hello", " from", " the", " fake", " engine"]


class FakeTokenizer:
    chat_template = "fake"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) % 1000 for c in text]}

    def get_vocab(self) -> dict:  # one character a token
        return {chr(i): i for i in range(1000)}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


@dataclass
class _FakeRequest:
    params: SamplingParams
    on_event: object
    prompt_tokens: int
    done: int = 0


class FakeEngine:
    """ServingEngine's interface without a model. Each request gets REPLY one word per step
    (then "stop"), or with ignore_eos the words over and over until max_tokens ("length")."""

    model_name = "fake-model"
    context = 512
    queue_depth = 0

    def __init__(self, step_s: float = 0.005, reply: list[str] = REPLY) -> None:
        self.reply = reply
        self.tokenizer = FakeTokenizer()
        self.error: str | None = None
        self.step_s = step_s
        self.submitted: list[tuple[list[int], SamplingParams]] = []
        self.aborted: list[int] = []
        self._active: dict[int, _FakeRequest] = {}
        self._lock = threading.Lock()
        self._next = 1
        self._closed = False
        threading.Thread(target=self._loop, daemon=True).start()

    @property
    def healthy(self) -> bool:
        return self.error is None

    @property
    def running(self) -> int:
        return len(self._active)

    def submit(self, prompt_token_ids: list[int], params: SamplingParams, on_event) -> int:
        if not self.healthy:
            raise RuntimeError(f"the engine is not running: {self.error}")
        if len(prompt_token_ids) + params.max_tokens > self.context:
            raise ValueError("prompt plus max_tokens exceeds the context")
        if not all(0 <= t < 1000 for t in prompt_token_ids):
            raise ValueError("prompt 0 has token ids outside the vocabulary 0..999")
        with self._lock:
            rid, self._next = self._next, self._next + 1
            self._active[rid] = _FakeRequest(params, on_event, len(prompt_token_ids))
            self.submitted.append((list(prompt_token_ids), params))
        return rid

    def abort(self, request_id: int) -> None:
        with self._lock:
            if self._active.pop(request_id, None) is not None:
                self.aborted.append(request_id)

    def fail(self, message: str, quiet: bool = False) -> None:
        """A worker died: in-flight requests get an "error" event (none at all when ``quiet``)."""
        with self._lock:
            self.error = message
            gone, self._active = self._active, {}
        for rid, r in gone.items():
            if not quiet:
                r.on_event(Event(rid, "", [], "error", message, r.prompt_tokens, r.done))

    def close(self) -> None:
        self._closed = True

    def _loop(self) -> None:
        while not self._closed:
            time.sleep(self.step_s)
            with self._lock:
                items = list(self._active.items())
            for rid, r in items:
                i = r.done
                if i == len(self.reply) and not r.params.ignore_eos:
                    event = Event(rid, "", [], "stop", None, r.prompt_tokens, i)
                else:
                    r.done += 1
                    finish = "length" if r.done >= r.params.max_tokens else None
                    event = Event(rid, self.reply[i % len(self.reply)], [100 + i], finish, None, r.prompt_tokens, r.done)
                with self._lock:
                    if rid not in self._active:
                        continue
                    if event.finish_reason:
                        del self._active[rid]
                r.on_event(event)


@contextlib.contextmanager
def running(app):
    """Serve ``app`` with uvicorn on a free loopback port, in a thread; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def fake():
    engine = FakeEngine()
    with running(create_app(engine)) as url:
        with httpx.Client(base_url=url, timeout=10) as client:
            yield engine, client
    engine.close()


def sse(lines) -> list:
    """The ``data:`` payloads of a server-sent event stream (JSON decoded, "[DONE]" as is)."""
    out = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_error(r: httpx.Response, status: int, param=..., code=...) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    if param is not ...:
        assert err["param"] == param, err
    if code is not ...:
        assert err["code"] == code, err
    return err


M = "fake-model"

# ---- HTTP behaviour on the fake engine ----------------------------------------------------


def test_models_and_health(fake):
    _, c = fake
    assert c.get("/health").json()["status"] == "ok"
    models = c.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [M]
    assert c.get(f"/v1/models/{M}").json()["id"] == M
    assert_error(c.get("/v1/models/gpt-4"), 404, "model", "model_not_found")


def test_completion(fake):
    engine, c = fake
    r = c.post("/v1/completions", json={"model": M, "prompt": "hi", "max_tokens": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == M and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": "Hello from the", "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    # OpenAI's defaults: 16 tokens, temperature 1
    r = c.post("/v1/completions", json={"model": M, "prompt": "hi", "stop": "x", "seed": 7, "top_k": 5})
    assert r.json()["choices"][0]["text"] == "Hello from the fake engine"
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    ids, params = engine.submitted[-1]
    assert ids == [ord("h"), ord("i")]
    assert (params.max_tokens, params.temperature, params.seed, params.top_k, params.stop) == (16, 1.0, 7, 5, ["x"])


def test_completion_prompt_shapes(fake):
    engine, c = fake
    r = c.post("/v1/completions", json={"model": M, "prompt": [5, 6, 7], "max_tokens": 1})
    assert r.json()["choices"][0]["text"] == "Hello" and engine.submitted[-1][0] == [5, 6, 7]
    for prompt in (["a", "bb"], [[1], [2, 3]]):
        r = c.post("/v1/completions", json={"model": M, "prompt": prompt, "max_tokens": 2})
        body = r.json()
        assert [ch["index"] for ch in body["choices"]] == [0, 1]
        assert all(ch["text"] == "Hello from" for ch in body["choices"])
        assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_chat(fake):
    engine, c = fake
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    r = c.post("/v1/chat/completions", json={"model": M, "messages": messages, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello from the fake engine"},
                                "logprobs": None, "finish_reason": "stop"}]
    ids, params = engine.submitted[-1]
    assert "".join(map(chr, ids)) == "<system>Be brief.\n<user>Hi\nthere\n<assistant>"
    assert body["usage"]["prompt_tokens"] == len(ids) and body["usage"]["completion_tokens"] == 5
    # chat's default max_tokens is the rest of the context; max_completion_tokens wins over max_tokens
    assert params.max_tokens == engine.context - len(ids) and params.temperature == 0
    r = c.post("/v1/chat/completions", json={"model": M, "messages": messages, "max_tokens": 9,
                                             "max_completion_tokens": 2})
    assert r.json()["choices"][0]["message"]["content"] == "Hello from"


def test_chat_stream_is_openai_sse(fake):
    _, c = fake
    body = {"model": M, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({ch["id"] for ch in chunks}) == 1 and all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == "Hello from the fake engine"
    assert [ch["choices"][0]["finish_reason"] for ch in chunks][-1] == "stop"
    assert all(ch["choices"][0]["finish_reason"] is None for ch in chunks[:-1])
    assert all("usage" not in ch for ch in chunks)

    body.update(stream_options={"include_usage": True}, max_tokens=2)
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        events = sse(r.iter_lines())
    assert events[-1] == "[DONE]" and events[-2]["choices"] == []
    assert events[-2]["usage"] == {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22}
    assert events[-3]["choices"][0]["finish_reason"] == "length"


def test_completion_stream(fake):
    _, c = fake
    body = {"model": M, "prompt": ["a", "b"], "max_tokens": 3, "stream": True}
    with c.stream("POST", "/v1/completions", json=body) as r:
        events = sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    for index in (0, 1):
        mine = [ch["choices"][0] for ch in events[:-1] if ch["choices"][0]["index"] == index]
        assert "".join(ch["text"] for ch in mine) == "Hello from the"
        assert mine[-1]["finish_reason"] == "length"
    assert all(ch["object"] == "text_completion" for ch in events[:-1])


def test_a_token_that_completes_no_character_still_streams_a_chunk():
    """As vLLM streams: one chunk per token, with empty text while a character is incomplete (the
    first half of a two-token character), so clients can time every token."""
    with running(create_app(FakeEngine(reply=["Caf", "", "\u00e9 ok"]))) as url, httpx.Client(base_url=url, timeout=10) as c:
        body = {"model": M, "prompt": "hi", "max_tokens": 3, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            texts = [ch["choices"][0]["text"] for ch in sse(r.iter_lines())[:-1]]
        assert texts == ["Caf", "", "\u00e9 ok"]
        body = {"model": M, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            deltas = [ch["choices"][0]["delta"] for ch in sse(r.iter_lines())[1:-1]]
        assert deltas == [{"content": "Caf"}, {"content": ""}, {"content": "\u00e9 ok"}]


BAD = [
    (b"{not json", 400, None, None),
    (b"", 400, None, None),
    (b"[1, 2]", 400, None, None),
    ({"prompt": "hi"}, 400, "model", "missing_required_parameter"),
    ({"model": M}, 400, "prompt", "missing_required_parameter"),
    ({"model": M, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", "invalid_type"),
    ({"model": M, "prompt": "hi", "max_tokens": 1.5}, 400, "max_tokens", "invalid_type"),
    ({"model": M, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"model": M, "prompt": "hi", "temperature": -0.5}, 400, "temperature", "invalid_value"),
    ({"model": M, "prompt": "hi", "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ({"model": M, "prompt": "hi", "top_p": 0}, 400, "top_p", "invalid_value"),
    ({"model": M, "prompt": "hi", "stream": "yes"}, 400, "stream", "invalid_type"),
    ({"model": M, "prompt": "hi", "stop": 5}, 400, "stop", "invalid_type"),
    ({"model": M, "prompt": [1, "a"]}, 400, "prompt", "invalid_type"),
    ({"model": M, "prompt": []}, 400, "prompt", "invalid_value"),
    ({"model": M, "prompt": "hi", "n": 0}, 400, "n", "invalid_value"),
    ({"model": M, "prompt": "hi", "logprobs": 21}, 400, "logprobs", "invalid_value"),
    ({"model": M, "prompt": "hi", "best_of": 3}, 400, "best_of", "unsupported_value"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model", "model_not_found"),
    ({"model": M, "prompt": "hi", "max_tokens": 10_000}, 400, "max_tokens", "context_length_exceeded"),
    ({"model": M, "prompt": "x" * 600, "max_tokens": 1}, 400, "prompt", "context_length_exceeded"),
    ({"model": M, "prompt": [5000]}, 400, "prompt", "invalid_value"),  # refused by the engine itself
]
BAD_CHAT = [
    ({"model": M}, 400, "messages", "missing_required_parameter"),
    ({"model": M, "messages": []}, 400, "messages", "invalid_value"),
    ({"model": M, "messages": "hi"}, 400, "messages", "invalid_type"),
    ({"model": M, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", "invalid_value"),
    ({"model": M, "messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content", "invalid_type"),
    ({"model": M, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content[0]", "unsupported_value"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "model_not_found"),
    ({"model": M, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature", ...),
    ({"model": M, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, 400, "max_tokens",
     "context_length_exceeded"),
]


@pytest.mark.parametrize("path,body,status,param,code",
                         [("/v1/completions", *b) for b in BAD] + [("/v1/chat/completions", *b) for b in BAD_CHAT])
def test_bad_requests_get_openai_errors(fake, path, body, status, param, code):
    _, c = fake
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    err = assert_error(c.post(path, **kwargs), status, param, code)
    assert err["type"] == "invalid_request_error"
    # the server is still fine
    r = c.post("/v1/completions", json={"model": M, "prompt": "ok", "max_tokens": 1})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "Hello"


def test_unknown_routes_and_methods_get_openai_errors(fake):
    _, c = fake
    assert_error(c.get("/v1/nothing"), 404, None, "not_found")
    assert_error(c.get("/v1/completions"), 405, None, "method_not_allowed")


def test_fastapi_validation_errors_have_the_openai_shape_too():
    """Routes that let FastAPI validate (none of ours today) answer 400 in OpenAI's shape, not 422."""
    engine = FakeEngine()
    app = create_app(engine)

    @app.get("/extra")
    async def extra(n: int) -> dict:
        return {"n": n}

    with running(app) as url:
        err = assert_error(httpx.get(f"{url}/extra", params={"n": "many"}), 400, "n", "invalid_value")
        assert "integer" in err["message"]
        assert httpx.get(f"{url}/extra", params={"n": 3}).json() == {"n": 3}
    engine.close()


def test_bad_requests_do_not_disturb_a_running_stream(fake):
    engine, c = fake
    body = {"model": M, "prompt": "go", "max_tokens": 60, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=str(c.base_url), timeout=10) as other:
        with other.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            for bad, *_ in BAD:
                kwargs = {"content": bad} if isinstance(bad, bytes) else {"json": bad}
                assert 400 <= c.post("/v1/completions", **kwargs).status_code < 500
            events = sse([first, *lines])
    assert events[-1] == "[DONE]"
    texts = [ch["choices"][0]["text"] for ch in events[:-1]]
    assert len(texts) == 60 and events[-2]["choices"][0]["finish_reason"] == "length"


def test_api_key():
    engine = FakeEngine()
    with running(create_app(engine, api_key="sekret")) as url, httpx.Client(base_url=url, timeout=10) as c:
        ok = {"model": M, "prompt": "hi", "max_tokens": 1}
        assert_error(c.post("/v1/completions", json=ok), 401, None, "invalid_api_key")
        assert_error(c.post("/v1/completions", json=ok, headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(c.get("/v1/models", headers={"Authorization": "sekret"}), 401)
        # the key is checked before the body is even parsed
        assert_error(c.post("/v1/completions", content=b"{oops"), 401)
        good = {"Authorization": "Bearer sekret"}
        assert c.post("/v1/completions", json=ok, headers=good).json()["choices"][0]["text"] == "Hello"
        assert c.get("/v1/models", headers=good).status_code == 200
        # probes and scrapers need no key
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
    engine.close()


def _samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_per_app_registry():
    """Two apps in one process each count their own requests."""
    engines = [FakeEngine(), FakeEngine()]
    with running(create_app(engines[0])) as url0, running(create_app(engines[1])) as url1:
        with httpx.Client(base_url=url0, timeout=10) as c0, httpx.Client(base_url=url1, timeout=10) as c1:
            for _ in range(3):
                c0.post("/v1/completions", json={"model": M, "prompt": "hi", "max_tokens": 4})
            c0.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
            c0.post("/v1/chat/completions", json={"model": M, "messages": [{"role": "user", "content": "x"}],
                                                  "stream": True})
            c1.get("/health")
            m0, m1 = c0.get("/metrics"), c1.get("/metrics")
    assert m0.headers["content-type"].startswith("text/plain")
    s0, s1 = _samples(m0.text), _samples(m1.text)
    assert s0[("tpserve_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] == 3
    assert s0[("tpserve_requests_total", (("endpoint", "/v1/completions"), ("status", "404")))] == 1
    assert s0[("tpserve_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))] == 1
    assert s0[("tpserve_generated_tokens_total", ())] == 3 * 4 + 5
    assert s0[("tpserve_time_to_first_token_seconds_count", (("endpoint", "/v1/completions"),))] == 3
    assert s0[("tpserve_request_latency_seconds_count", (("endpoint", "/v1/completions"),))] == 3
    assert s0[("tpserve_request_latency_seconds_count", (("endpoint", "/v1/chat/completions"),))] == 1
    assert s0[("tpserve_queue_depth", ())] == 0 and s0[("tpserve_running_requests", ())] == 0
    assert s0[("tpserve_engine_healthy", ())] == 1
    assert ("tpserve_requests_total", (("endpoint", "/v1/completions"), ("status", "200"))) not in s1
    assert s1[("tpserve_requests_total", (("endpoint", "/health"), ("status", "200")))] == 1
    for e in engines:
        e.close()


def _wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_client_disconnect_aborts_the_request(fake):
    engine, c = fake
    body = {"model": M, "prompt": "go", "max_tokens": 400, "ignore_eos": True}
    with httpx.Client(base_url=str(c.base_url), timeout=10) as quitter:
        with quitter.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()  # (kept: dropping the iterator would close the connection)
            next(line for line in lines if line)
            rid = max(engine._active)
    assert _wait_for(lambda: rid in engine.aborted), "a dropped stream was not aborted"
    # a non-streaming client that gives up is noticed too (the server polls for the disconnect)
    with pytest.raises(httpx.ReadTimeout):
        c.post("/v1/completions", json=body, timeout=0.3)
    rid = engine._next - 1
    assert _wait_for(lambda: rid in engine.aborted), "a dropped request was not aborted"
    assert engine.running == 0


@pytest.mark.parametrize("quiet", [False, True], ids=["error-event", "silent-death"])
def test_engine_failure_ends_requests_with_5xx(quiet):
    """A dead worker: streams get an error event, waiting requests a 5xx, /health 503 — within
    seconds, even if the engine never sends the error event (the server polls its health)."""
    engine = FakeEngine()
    with running(create_app(engine)) as url, httpx.Client(base_url=url, timeout=20) as c:
        long = {"model": M, "prompt": "go", "max_tokens": 400, "ignore_eos": True}
        waited = {}

        def wait_plain():
            waited["r"] = httpx.post(f"{url}/v1/completions", json=long, timeout=20)

        plain = threading.Thread(target=wait_plain)
        with c.stream("POST", "/v1/completions", json={**long, "stream": True}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            plain.start()
            assert _wait_for(lambda: engine.running == 2)
            failed_at = time.monotonic()
            engine.fail("worker rank 1: pid 1234 exited (killed by signal 9)", quiet=quiet)
            events = sse([first, *lines])
        assert time.monotonic() - failed_at < 3
        plain.join(timeout=10)
        assert not plain.is_alive() and time.monotonic() - failed_at < 3
        assert events[-1] == "[DONE]" and "error" in events[-2]
        err = events[-2]["error"]
        assert err["type"] == "server_error" and "killed by signal 9" in err["message"]
        assert all("choices" in e for e in events[:-2])
        err = assert_error(waited["r"], 500, code="engine_error")
        assert "killed by signal 9" in err["message"]
        health = c.get("/health")
        assert health.status_code == 503 and "killed by signal 9" in health.json()["error"]
        assert_error(c.post("/v1/completions", json=long), 503, code="engine_unavailable")
        assert _samples(c.get("/metrics").text)[("tpserve_engine_healthy", ())] == 0
    engine.close()


def test_serve_on_a_busy_port_fails_at_once_in_one_line():
    """The port is bound before the model loads, so the mistake costs a second, not a load."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "tpserve", "serve", "--port", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in run.stderr and "Traceback" not in run.stderr, run.stderr


# ---- the real engine at TP=2, through `tpserve serve` --------------------------------------

PROMPTS = ["The capital of Germany is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are", "import numpy as np\n", "My favourite food is",
           "Water boils at", "The quick brown fox", "In 1969, humans", "The largest planet in the solar system is",
           "To make a cup of tea, first", "Dear Sir or Madam,", "The meaning of life is",
           "SELECT * FROM users WHERE", "Photosynthesis is the process", "One, two, three,"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
NEW = 16


def _reference() -> dict:
    """Each prompt alone through tpserve.LLM (TP=1, greedy): what the server must reproduce."""
    from tpserve import LLM

    with LLM(dtype="float32") as llm:
        greedy = SamplingParams(max_tokens=NEW)
        completions = [llm.generate(p, greedy)[0].outputs[0] for p in PROMPTS]
        chat = llm.chat(CHAT, SamplingParams(max_tokens=24))[0].outputs[0]
        ids = llm.tokenizer(SCORED)["input_ids"]
        scored = torch.log_softmax(llm.logits([ids])[0], dim=-1)
    return {"completions": [(o.text, o.finish_reason) for o in completions], "chat": chat.text, "scored_ids": ids,
            "scored": [None] + [float(scored[i - 1, t]) for i, t in enumerate(ids) if i]}


def _children(pid: int) -> list[int]:
    kids = []
    for path in Path("/proc").glob(f"{pid}/task/*/children"):
        kids += [int(k) for k in path.read_text().split()]
    return kids


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _workers(pid: int) -> list[int]:
    out = []
    for kid in _children(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{kid}/cmdline").read_bytes():
                out.append(kid)
        except OSError:
            pass
    return out


@contextlib.contextmanager
def tpserve_serve(tmp: Path, *extra: str, while_loading=lambda: None):
    """``python -m tpserve serve --tp 2 --dtype float32`` on a free port (float32: its answers
    must equal TP=1's exactly); yields (url, process, stderr file, what ``while_loading()``, run
    while the server loads its model, returned)."""
    port = free_port()
    err = tmp / f"serve-{port}.err"
    with open(tmp / f"serve-{port}.out", "wb") as out_f, open(err, "wb") as err_f:
        proc = subprocess.Popen([sys.executable, "-m", "tpserve", "serve", "--tp", "2", "--port", str(port), "--dtype", "float32", *extra],
                                stdout=out_f, stderr=err_f)
    url = f"http://127.0.0.1:{port}"
    try:
        loaded = while_loading()
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"the server exited with {proc.returncode}: {err.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the server did not become healthy in time"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        yield url, proc, err, loaded
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """One server for the module; the reference answers are computed while it loads."""
    with tpserve_serve(tmp_path_factory.mktemp("serve"), while_loading=_reference) as (url, proc, _, reference):
        name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        yield url, name, reference, proc


def test_openai_client(real):
    import openai

    url, name, reference, _ = real
    assert name == "SmolLM2-135M-Instruct"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == [name]

    chat = client.chat.completions.create(model=name, messages=CHAT, max_tokens=24, temperature=0)
    text = chat.choices[0].message.content
    assert "Paris" in text and text == reference["chat"]
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens > 0
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    stream = client.chat.completions.create(model=name, messages=CHAT, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    done = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=NEW, temperature=0)
    assert (done.choices[0].text, done.choices[0].finish_reason) == reference["completions"][0]
    assert "Berlin" in done.choices[0].text and done.usage.completion_tokens == NEW

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=name, messages=CHAT, temperature=-1)


async def _stream_one(client: httpx.AsyncClient, name: str, prompt: str, t0: float) -> dict:
    body = {"model": name, "prompt": prompt, "max_tokens": NEW, "temperature": 0, "stream": True}
    lines, first = [], None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line and first is None:
                first = time.monotonic() - t0
            lines.append(line)
    events = sse(lines)
    assert events[-1] == "[DONE]"
    return {"text": "".join(e["choices"][0]["text"] for e in events[:-1]),
            "finish": events[-2]["choices"][0]["finish_reason"], "first": first, "done": time.monotonic() - t0}


def _stream_all(url: str, name: str) -> list[dict]:
    """Every prompt in PROMPTS as its own concurrent stream, started together."""
    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            t0 = time.monotonic()
            return await asyncio.gather(*[_stream_one(client, name, p, t0) for p in PROMPTS])

    return asyncio.run(main())


SCORED = "The capital of France is Paris, and the capital of Italy is Rome."


def test_what_evaluators_send_echo_logprobs_token_ids_n_and_tokenize(real):
    """lm-evaluation-harness's loglikelihood request (token-id prompts, echo, logprobs=1,
    max_tokens=1), n > 1, chat logprobs, and vLLM's /tokenize and /detokenize."""
    url, name, reference, _ = real
    ids = reference["scored_ids"]
    with httpx.Client(base_url=url, timeout=120) as c:
        tokenized = c.post("/tokenize", json={"model": name, "prompt": SCORED}).json()
        assert tokenized["tokens"] == ids and tokenized["count"] == len(ids)
        assert c.post("/detokenize", json={"tokens": ids}).json()["prompt"] == SCORED
        body = {"model": name, "prompt": [ids, ids[:5]], "echo": True, "logprobs": 1, "max_tokens": 1,
                "temperature": 0}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        first, second = sorted(r.json()["choices"], key=lambda ch: ch["index"])
        lp = first["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
        assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:len(ids)], reference["scored"][1:])) < 1e-3
        assert all(top[tok] == lp["token_logprobs"][i]
                   for i, (tok, top) in enumerate(zip(lp["tokens"], lp["top_logprobs"])) if top)
        assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())  # the greedy continuation
        assert first["text"].startswith(SCORED) and len(second["logprobs"]["tokens"]) == 6
        assert r.json()["usage"]["prompt_tokens"] == len(ids) + 5
        r = c.post("/v1/completions", json={"model": name, "prompt": "Once upon a time", "n": 3, "max_tokens": 5,
                                            "temperature": 1.0, "seed": 7})
        assert sorted(ch["index"] for ch in r.json()["choices"]) == [0, 1, 2]
        once = c.post("/tokenize", json={"prompt": "Once upon a time"}).json()["count"]
        assert r.json()["usage"]["prompt_tokens"] == once  # one prompt, however many choices
        chat = c.post("/v1/chat/completions", json={"model": name, "messages": CHAT, "max_tokens": 6, "temperature": 0,
                                                     "logprobs": True, "top_logprobs": 2}).json()
        content = chat["choices"][0]["logprobs"]["content"]
        assert len(content) == chat["usage"]["completion_tokens"]
        assert all(len(item["top_logprobs"]) == 2 and item["top_logprobs"][0]["logprob"] == item["logprob"]
                   for item in content)  # greedy: the chosen token is the most likely
        assert "".join(item["token"] for item in content) == chat["choices"][0]["message"]["content"]
        body = {"model": name, "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0,
                "logprobs": 2, "stream": True, "echo": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            events = sse(list(r.iter_lines()))
        chunks = [e["choices"][0] for e in events[:-1]]
        assert chunks[0]["text"].startswith("The capital of France is")  # the echo comes first
        streamed = [tok for ch in chunks if ch["logprobs"] for tok in ch["logprobs"]["tokens"]]
        prompt_len = c.post("/tokenize", json={"prompt": "The capital of France is"}).json()["count"]
        assert len(streamed) == prompt_len + 5 and chunks[0]["logprobs"]["token_logprobs"][0] is None


def test_sixteen_concurrent_streams_each_get_their_own_answer(real):
    url, name, reference, _ = real
    results = _stream_all(url, name)
    assert [(r["text"], r["finish"]) for r in results] == reference["completions"]
    # they ran together: every stream had its first token before any stream had finished
    assert max(r["first"] for r in results) < min(r["done"] for r in results)


def test_compiled_server_gives_the_same_answers(real, tmp_path):
    """serve --compile compiles its decode graphs before answering; the batch then grows from one
    row to sixteen, through every compiled graph, with the same answers as eager generate."""
    _, name, reference, _ = real
    with tpserve_serve(tmp_path, "--compile") as (url, _, err, _):
        assert "compiled decode" in err.read_text()
        results = _stream_all(url, name)
    assert [(r["text"], r["finish"]) for r in results] == reference["completions"]


def test_a_new_request_joins_a_running_batch(real):
    """Continuous batching: a short request that arrives during a long one finishes first."""
    url, name, _, _ = real
    long = {"model": name, "prompt": "Count slowly:", "max_tokens": 60, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=url, timeout=120) as c, c.stream("POST", "/v1/completions", json=long) as r:
        lines = r.iter_lines()
        for _ in range(5):  # the long one is decoding
            next(line for line in lines if line)
        short = c.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 4, "ignore_eos": True})
        assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 4
        still_running = _samples(c.get("/metrics").text)[("tpserve_running_requests", ())]
        rest = sse(list(lines))
    assert still_running == 1, "the short request waited for the long one"
    assert rest[-1] == "[DONE]" and rest[-2]["choices"][0]["finish_reason"] == "length"


def test_worker_death_ends_requests_and_the_server(tmp_path):
    with tpserve_serve(tmp_path) as (url, proc, err, _):
        workers = _workers(proc.pid)
        assert len(workers) == 1, workers
        name = "SmolLM2-135M-Instruct"
        long = {"model": name, "prompt": "Tell me a long story.", "max_tokens": 1500, "ignore_eos": True}
        waited = {}

        def wait_plain():
            waited["r"] = httpx.post(f"{url}/v1/completions", json=long, timeout=60)

        plain = threading.Thread(target=wait_plain)
        with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", "/v1/completions",
                                                                     json={**long, "stream": True}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            plain.start()
            time.sleep(0.5)
            os.kill(workers[0], signal.SIGKILL)
            killed_at = time.monotonic()
            events = sse([first, *lines])
            ended = time.monotonic() - killed_at
            health = httpx.get(f"{url}/health", timeout=5)
        plain.join(timeout=30)
        assert ended < 10, f"the stream took {ended:.1f}s to end"
        assert events[-1] == "[DONE]" and "error" in events[-2], events[-3:]
        assert "killed by signal 9" in events[-2]["error"]["message"]
        assert health.status_code == 503 and "killed by signal 9" in health.json()["error"]
        assert not plain.is_alive()
        assert 500 <= waited["r"].status_code < 600 and "error" in waited["r"].json()
        proc.wait(timeout=30)
        assert proc.returncode != 0
        stderr = err.read_text()
        assert "engine failed" in stderr and "killed by signal 9" in stderr and "Traceback" not in stderr, stderr
        assert _wait_for(lambda: all(_gone(w) for w in workers), 10), "a worker outlived the server"


def test_sigterm_ends_streams_and_the_server_at_once(tmp_path):
    """The engine loop runs on the server's main thread (HTTP on another): SIGTERM must still end
    in-flight streams, with an error event, and the process with its workers, within seconds."""
    with tpserve_serve(tmp_path) as (url, proc, err, _):
        workers = _workers(proc.pid)
        assert len(workers) == 1, workers
        long = {"model": "SmolLM2-135M-Instruct", "prompt": "Tell me a long story.", "max_tokens": 1500,
                "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=url, timeout=60) as c, c.stream("POST", "/v1/completions", json=long) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith("data: {")
            proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            rest = [line for line in lines if line]
            ended = time.monotonic() - sent
        proc.wait(timeout=30)
        assert ended < 10, f"the stream took {ended:.1f}s to end"
        events = sse(rest)  # ended by the server, not cut off: an error event, then [DONE]
        assert events[-1] == "[DONE]" and "shut down" in events[-2]["error"]["message"], events[-3:]
        assert proc.returncode == -signal.SIGTERM, (proc.returncode, err.read_text()[-2000:])
        assert "Traceback" not in err.read_text()
        assert _wait_for(lambda: all(_gone(w) for w in workers), 10), "a worker outlived the server"


# ---- one request cannot knock the server over -----------------------------------------------

def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_huge_body_gets_413_and_costs_the_server_nothing(real):
    url, name, _, proc = real
    before = _rss_kb(proc.pid)
    head = json.dumps({"model": name, "max_tokens": 1})[:-1].encode() + b', "prompt": "'
    body = head + b"a" * (50 * 2**20) + b'"}'
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert "4,194,304 bytes" in assert_error(r, 413, None, "request_too_large")["message"]

        def chunked():  # no Content-Length: the server counts the bytes as they arrive
            yield head
            for _ in range(50):
                yield b"a" * 2**20

        r = c.post("/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
        assert_error(r, 413, None, "request_too_large")
        assert c.get("/health").status_code == 200
        ok = c.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200
        metrics = _samples(c.get("/metrics").text)
    assert _rss_kb(proc.pid) - before < 200 * 1024
    assert metrics[("tpserve_requests_total", (("endpoint", "/v1/completions"), ("status", "413")))] == 1


def test_a_two_megabyte_prompt_is_refused_untokenized_while_a_stream_runs(real):
    url, name, _, _ = real
    long = {"model": name, "prompt": "Count slowly:", "max_tokens": 40, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    huge = "word " * 400_000  # 2 MB
    with httpx.Client(base_url=url, timeout=120) as c, c.stream("POST", "/v1/completions", json=long) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        tokenized = _samples(c.get("/metrics").text)[("tpserve_tokenized_characters_total", ())]
        big = c.post("/v1/completions", json={"model": name, "prompt": huge, "max_tokens": 1})
        assert "characters" in assert_error(big, 400, "prompt", "context_length_exceeded")["message"]
        chat = c.post("/v1/chat/completions", json={"model": name, "messages": [{"role": "user", "content": huge}]})
        assert_error(chat, 400, "messages", "context_length_exceeded")
        # neither was tokenized at all: more characters than 2048 tokens can hold is too long already
        assert _samples(c.get("/metrics").text)[("tpserve_tokenized_characters_total", ())] == tokenized
        rest = sse([first, *lines])
    assert rest[-1] == "[DONE]" and rest[-2]["usage"]["completion_tokens"] == 40  # the stream kept going
    assert rest[-3]["choices"][0]["finish_reason"] == "length"


def test_a_model_without_tokenizer_takes_token_ids():
    engine = FakeEngine()
    engine.tokenizer = None
    with running(create_app(engine)) as url, httpx.Client(base_url=url, timeout=10) as c:
        ok = c.post("/v1/completions", json={"model": M, "prompt": [5, 6, 7], "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 3
        err = assert_error(c.post("/v1/completions", json={"model": M, "prompt": "hi"}), 400, "prompt")
        assert "--tokenizer" in err["message"]
        assert_error(c.post("/v1/chat/completions", json={"model": M, "messages": [{"role": "user", "content": "x"}]}),
                     400, "messages")
    engine.close()
