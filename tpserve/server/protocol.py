"""What clients send (request bodies, checked strictly) and what every error looks like:
OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so the official clients
raise their usual exceptions."""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .limits import (
    BodyTooLarge,
)

# ---- errors

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


def too_large(limit: int) -> APIError:
    return APIError(413, str(BodyTooLarge(limit)), code="request_too_large")


def engine_error(message: str) -> APIError:
    return APIError(500, f"the inference engine failed: {message}", "server_error", None, "engine_error")


def unavailable(engine) -> APIError:
    return APIError(503, f"the inference engine is not running: {engine.error or 'shut down'}", "server_error",
                    None, "engine_unavailable")



# ---- request bodies

class _Strict(BaseModel):
    # strict: "16" is not a number, 1.0 is not an integer (as OpenAI); unknown fields are ignored
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class GenerationRequest(_Strict):
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
    # vLLM's extensions
    ignore_eos: bool = False
    repetition_penalty: float | None = None
    min_p: float | None = None
    stop_token_ids: list[int] | None = None


class CompletionRequest(GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None


class TokenizeRequest(_Strict):
    """vLLM's ``/tokenize``: a prompt, or chat messages through the template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


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


def validation_error(errors: list[dict]) -> APIError:
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


async def parse(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    if not raw.strip():
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False)) from None
