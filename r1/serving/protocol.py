"""The OpenAI-compatible wire format: request validation and response objects.

Requests are validated here into r1 sampling parameters; every problem becomes an `APIError` with
an HTTP status and an OpenAI-style body that names the field (`param`) and the fix. The Serve
ingress (in `cluster/`) only moves bytes and calls these functions.

Unknown request fields are ignored, as OpenAI-compatible servers do, so newer clients keep working.
r1 extensions: `top_k`, `repetition_penalty`, `session_id`, `code_validation`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from r1.config import SamplingConfig, ServeConfig


class APIError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _error_type(status)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_type(status: int) -> str:
    return {
        400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
        422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
    }.get(status, "server_error")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported", param="messages.content")
            parts.append(part["text"])
        return "".join(parts)


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingFields(_Lenient):
    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    user: str | None = None
    session_id: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int]
    echo: bool = False


def parse_request(cls: type[BaseModel], body: Any) -> Any:
    """Validate a decoded JSON body; wrong types/values → 400 naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return cls.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        raise APIError(400, f"invalid value for '{param}': {first['msg']}", param=param, code="invalid_value") from None


def sampling_for(request: _SamplingFields, config: ServeConfig) -> SamplingConfig:
    """Merge request fields over the server's sampling defaults and check the limits."""
    max_tokens = getattr(request, "max_completion_tokens", None) or request.max_tokens
    if max_tokens is not None and max_tokens > config.max_tokens_limit:
        param = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) else "max_tokens"
        raise APIError(
            400, f"{param}={max_tokens} exceeds this server's limit of {config.max_tokens_limit}; use {param} <= {config.max_tokens_limit}",
            param=param, code="limit_exceeded",
        )
    if request.n > config.max_n:
        raise APIError(400, f"n={request.n} exceeds this server's limit of {config.max_n}; use n <= {config.max_n}", param="n", code="limit_exceeded")
    updates: dict[str, Any] = {}
    for field in ("temperature", "top_p", "top_k", "seed", "repetition_penalty"):
        value = getattr(request, field)
        if value is not None:
            updates[field] = value
    if max_tokens is not None:
        updates["max_new_tokens"] = max_tokens
    if request.stop is not None:
        updates["stop"] = [request.stop] if isinstance(request.stop, str) else request.stop
    try:
        return SamplingConfig.model_validate({**config.sampling.model_dump(), **updates})
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        raise APIError(400, f"invalid value for '{param}': {first['msg']}", param=param, code="invalid_value") from None


def chat_messages(request: ChatCompletionRequest, config: ServeConfig) -> list[dict[str, str]]:
    if len(request.messages) > config.max_messages:
        raise APIError(400, f"{len(request.messages)} messages exceed this server's limit of {config.max_messages}", param="messages")
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in request.messages]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def chat_response(response_id: str, model: str, choices: list[dict[str, Any]], usage: dict[str, int], **extra: Any) -> dict[str, Any]:
    return {"id": response_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage, **extra}


def chat_choice(index: int, reasoning: str, content: str, finish_reason: str | None) -> dict[str, Any]:
    message = {"role": "assistant", "content": content, "reasoning_content": reasoning or None, "reasoning": reasoning or None}
    return {"index": index, "message": message, "finish_reason": finish_reason, "logprobs": None}


def chat_chunk(response_id: str, model: str, created: int, index: int, delta: dict[str, Any], finish_reason: str | None = None,
               usage: dict[str, int] | None = None) -> dict[str, Any]:
    choices = [] if index < 0 else [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    chunk = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def completion_response(response_id: str, model: str, choices: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
    return {"id": response_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage}


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}


def completion_chunk(response_id: str, model: str, created: int, index: int, text: str, finish_reason: str | None = None,
                     usage: dict[str, int] | None = None) -> dict[str, Any]:
    choices = [] if index < 0 else [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}]
    chunk = {"id": response_id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def models_list(model: str, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "r1-cluster"}]}
