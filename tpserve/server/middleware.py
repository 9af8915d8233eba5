"""What every request passes through before a route: the API-key check, the body-size limit
and request counting, and the Prometheus metrics they and the routes count into."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .limits import (
    counted,
    declared_too_large,
    drain,
)
from .protocol import APIError, too_large

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
_ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")



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


def make_metrics(engine) -> Metrics:
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


def outer_middleware(app: ASGIApp, metrics: Metrics, api_key: str | None, max_request_bytes: int) -> ASGIApp:
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
                await too_large(max_request_bytes).response()(scope, receive, send_counted)
                return
            await app(scope, counted(receive, max_request_bytes), send_counted)
        finally:
            metrics.requests.labels(_endpoint_label(scope["path"]), str(status)).inc()

    return edge
