"""The OpenAI-compatible wire format: request validation and response objects.

Requests are validated here into r1 sampling parameters; every problem becomes an `APIError` with
an HTTP status and an OpenAI-style body that names the field (`param`) and the fix. The Serve
ingress (in `cluster/`) only moves bytes and calls these functions.

Unknown request fields are ignored, as OpenAI-compatible servers do, so newer clients keep working.
Known OpenAI features r1 does not implement (the legacy `functions`, suffix, best_of) are refused
with a 400 naming the field when a request asks for them, rather than silently ignored; their
neutral values (`function_call: "none"`, `best_of: 1`, ...) pass. Tool calling (`tools`,
`tool_choice`, tool messages) is `r1.serving.tools`'s. r1 extensions: `top_k`, `repetition_penalty`,
`session_id`, `code_validation`; vLLM's `min_p`, `min_tokens`, `ignore_eos`, `stop_token_ids`,
`include_stop_str_in_output`, `allowed_token_ids`, `bad_words`, `return_tokens_as_token_ids`,
`thinking_token_budget` (and SGLang's `thinking_budget`, OpenAI's `reasoning_effort`), `priority`, guided
decoding (`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`, `structured_outputs`),
`continue_final_message` (and DeepSeek's `prefix` messages) and `response_format` on completions.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator

from r1.chat_template import render_chat
from r1.config import MAX_CHOICES, MAX_GUIDE_CHARS, MAX_LOGPROBS, SEED_MAX, SEED_MIN, SamplingConfig, ServeConfig
from r1.reasoning import THINK_CLOSE, THINK_OPEN
from r1.serving import tools
from r1.serving.errors import APIError

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# A JSON escape of a UTF-16 surrogate (\ud800-\udfff): the only way a body's text can hold one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class LenientModel(BaseModel):
    # Unknown fields are ignored (clients send newer OpenAI fields); known ones take their JSON type
    # only: lax parsing read `"temperature": true` as 1.0, `"max_tokens": "5"` as 5 and a token id
    # `true` as 1 (an integer is still a valid number).
    model_config = ConfigDict(extra="ignore", strict=True)


class ToolCallFunction(LenientModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(LenientModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(LenientModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant message's calls
    tool_call_id: str | None = None  # a tool message's: the call it answers
    # DeepSeek's prefix completion: a final assistant message the reply continues (`_continuation`);
    # its reasoning_content continues the reasoning. (Elsewhere reasoning_content is dropped, as
    # the template drops earlier reasoning.)
    prefix: StrictBool | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _content_unless_assistant(self) -> ChatMessage:
        # Only an assistant message (one that called tools) may come without content, as in OpenAI's API.
        if self.role != "assistant" and (self.content is None or self.content == []):
            raise ValueError(f"a {self.role} message needs content: a string or a non-empty list of text parts")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def text(self, index: int = 0) -> str:
        """The message's text; a list of content parts must be text parts, joined by newlines (as vLLM
        joins them: parts are separate pieces of text, and run together their words would merge)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for position, part in enumerate(self.content):
            param, kind = f"messages.{index}.content.{position}", part.get("type")
            if kind != "text":
                raise APIError(400, f"only text content parts are supported, not type {kind!r}", param=param,
                               code="unsupported")
            if not isinstance(part.get("text"), str):
                raise APIError(400, "a text content part needs a string 'text'", param=param, code="invalid_value")
            parts.append(part["text"])
        return "\n".join(parts)


class StreamOptions(LenientModel):
    include_usage: StrictBool = False
    # vLLM's: with include_usage, every chunk also carries its choice's usage so far.
    continuous_usage_stats: StrictBool = False


class _SamplingFields(LenientModel):
    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # 0 or -1 (vLLM's spelling): no top-k filtering
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1)
    # Strict: JSON true/false only (lax parsing would read "no" as false, "yes" and 1 as true).
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    user: str | None = None
    session_id: str | None = None
    logit_bias: dict[str, Any] | None = None
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": {...}}} (`requested_schema`)
    response_format: dict[str, Any] | None = None
    # vLLM's sampling extensions (what vLLM's benchmark clients send): see SamplingConfig.
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: StrictBool | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    include_stop_str_in_output: StrictBool | None = None
    allowed_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    bad_words: list[str] | None = None
    # vLLM's: logprobs name each token "token_id:N" (its id) rather than by its text.
    return_tokens_as_token_ids: StrictBool | None = None
    # The reasoning's most tokens (vLLM's thinking_token_budget; SGLang's thinking_budget), or
    # OpenAI's reasoning_effort, a level standing for a budget (`reasoning_budget`).
    thinking_token_budget: int | None = Field(default=None, ge=0)
    thinking_budget: int | None = Field(default=None, ge=0)
    reasoning_effort: str | None = None
    # vLLM's priority (engine.scheduling_policy: priority): lower values are served first.
    priority: int | None = None
    # vLLM's guided decoding (`requested_constraint`): at most one of these, structured_outputs and a
    # non-text response_format. guided_json: a JSON schema (an object, or its JSON text).
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[Any] | None = None
    guided_grammar: str | None = None
    # vLLM's newer spelling: {"json" | "regex" | "choice" | "grammar": ..., or "json_object": true}.
    structured_outputs: dict[str, Any] | None = None
    # Taken for vLLM clients: r1 has one guided-decoding backend (xgrammar), named or not.
    guided_decoding_backend: str | None = None
    # A known OpenAI field r1 does not implement: refused when it asks for something (`unsupported`).
    best_of: int | None = None
    # vLLM's: refused when given (r1's JSON is compact, `r1.engine.structured`).
    guided_whitespace_pattern: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # Each generated token's log-probability, and the top_logprobs most likely tokens at its position.
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # vLLM's: continue the final assistant message (add_generation_prompt false, or left out).
    continue_final_message: StrictBool = False
    add_generation_prompt: StrictBool | None = None
    # r1 extension: run the generated code through syntax check, tests in the sandbox and repairs.
    code_validation: StrictBool = False
    # Tests for code_validation: asserts or pytest-style functions (generated by the model if absent).
    tests: str | list[str] | None = None
    max_repairs: int | None = Field(default=None, ge=0, le=16)
    # Tool calling (`r1.serving.tools`); the legacy functions / function_call are refused.
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    functions: list[Any] | None = None
    function_call: Any = None


class CompletionRequest(_SamplingFields):
    # One prompt (a string or a list of token ids) or a batch of them (a list of strings or a list
    # of token-id lists): each prompt of a batch gets `n` choices (`completion_prompts`).
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: StrictBool = False
    # Each generated token's log-probability, and the `logprobs` most likely tokens at its position.
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_kind_of_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and prompt:
            kinds = {str if isinstance(item, str) else list if isinstance(item, list) else int for item in prompt}
            if len(kinds) > 1:
                raise ValueError("a prompt is a string, a list of token ids, a list of strings or a list of "
                                 "token-id lists, not a mix of them")
            if kinds == {list} and not all(prompt):
                raise ValueError("a batch of token-id prompts holds an empty prompt")
            if kinds == {str} and not all(prompt):
                raise ValueError("a batch of prompts holds an empty string")
        return prompt

    @field_validator("prompt")
    @classmethod
    def _token_ids_not_negative(cls, prompt: Any) -> Any:
        for ids in prompt_batch(prompt) or [prompt]:
            if isinstance(ids, list) and any(token < 0 for token in ids):
                raise ValueError("token ids must be >= 0")
        return prompt


def prompt_batch(prompt: Any) -> list | None:
    """The prompts of a batched completion prompt (a list of strings or of token-id lists), or None
    for a single one (a string or a list of token ids)."""
    return list(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else None


class TokenizeRequest(LenientModel):
    """`POST /tokenize` (as vLLM serves it): a prompt, or chat messages rendered with the chat
    template, to the token ids the engine would see. `add_special_tokens` defaults as the engine
    encodes: on for a prompt, off for messages (the template writes its own)."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: StrictBool | None = None
    add_generation_prompt: StrictBool | None = None
    continue_final_message: StrictBool = False
    # Rendered as a chat request with them would be (the functions offered in the system text).
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either prompt (a string) or messages (chat messages), not both")
        return self


class DetokenizeRequest(LenientModel):
    """`POST /detokenize`: token ids back to text."""

    model: str
    tokens: list[Annotated[int, Field(ge=0)]]


def tokenize(tokenizer: Any, request: TokenizeRequest, config: ServeConfig) -> list[int]:
    """The token ids of a `TokenizeRequest`; 400 if the chat template refuses the messages."""
    if request.prompt is not None:
        add_special = True if request.add_special_tokens is None else request.add_special_tokens
        return list(tokenizer.encode(request.prompt, add_special_tokens=add_special))
    try:
        messages = tool_messages(chat_messages(request, config), request_tools(request))
        text = render_chat(tokenizer, messages, request.add_generation_prompt is not False)
    except ValueError as error:
        raise APIError(400, str(error), param="messages", code="invalid_value") from None
    return list(tokenizer.encode(text, add_special_tokens=bool(request.add_special_tokens)))


def unsupported(request: _SamplingFields) -> None:
    """Refuse (400, naming the field) a request that asks for an OpenAI feature r1 does not
    implement; the fields' neutral values pass, so clients that send defaults keep working."""
    asked: list[tuple[str, str]] = []
    if request.best_of not in (None, 1):
        asked.append(("best_of", "best_of is not supported; use n to get several choices"))
    if request.guided_whitespace_pattern is not None:
        asked.append(("guided_whitespace_pattern", "guided_whitespace_pattern is not supported: guided JSON is "
                      "compact (no whitespace between tokens); omit it"))
    if isinstance(request, ChatCompletionRequest):
        if request.functions or request.function_call not in (None, "none", "auto"):
            asked.append(("functions", "the legacy functions / function_call are not supported; send them as tools "
                          "and tool_choice"))
    if isinstance(request, CompletionRequest):
        if request.suffix:
            asked.append(("suffix", "suffix (insertion) is not supported; omit it"))
    if asked:
        param, message = asked[0]
        raise APIError(400, message, param=param, code="unsupported")


def decode_json(raw: bytes) -> Any:
    """The JSON body of a request; 400 for invalid JSON, and for strings holding a lone UTF-16
    surrogate ("\\ud800" escapes JSON allows but no text encoding can carry), naming the field."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as error:
        # ValueError: JSON syntax, invalid UTF-8, integers past Python's 4300-digit conversion limit;
        # RecursionError: arrays or objects nested deeper than the parser's recursion allows.
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise APIError(400, f"the request body is not valid JSON: {reason}", code="invalid_json") from None
    if _SURROGATE_ESCAPE.search(raw):  # pairs are joined by the parser; look for a lone one
        path = _lone_surrogate_path(body)
        if path is not None:
            raise APIError(400, f"invalid value for '{path}': a lone UTF-16 surrogate is not valid text",
                           param=path or None, code="invalid_value")
    return body


def _lone_surrogate_path(body: Any) -> str | None:
    """Path ("messages.0.content") of the first string or key holding a lone surrogate. Iterative:
    a body nested as deep as the JSON parser allows must not exhaust the recursion limit here."""
    pending: list[tuple[str, Any]] = [("", body)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, str):
            if _LONE_SURROGATE.search(value):
                return path
            continue
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        children = []
        for key, item in items:
            if isinstance(key, str) and _LONE_SURROGATE.search(key):
                return f"{path}.{key!r}".lstrip(".")
            children.append((f"{path}.{key}".lstrip("."), item))
        pending.extend(reversed(children))  # depth-first, in document order
    return None


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of an n > 1 request: seed + index, kept within the 64-bit range."""
    if seed is None or not index:
        return seed
    return (seed + index - SEED_MIN) % 2**64 + SEED_MIN


def parse_request(cls: type[BaseModel], body: Any) -> Any:
    """Validate a decoded JSON body; wrong types/values → 400 naming the field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return cls.model_validate(body)
    except ValidationError as error:
        raise invalid_value(error) from None


def invalid_value(error: ValidationError) -> APIError:
    """The 400 for a pydantic error: its first problem, naming the field's path as the client sent it."""
    first = error.errors()[0]
    param = ".".join(str(p) for p in first["loc"] if not _is_type_tag(p))
    if not param:  # a check across fields: its message says which
        return APIError(400, first["msg"].removeprefix("Value error, "), code="invalid_value")
    return APIError(400, f"invalid value for '{param}': {first['msg']}", param=param, code="invalid_value")


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _is_type_tag(part: Any) -> bool:
    """pydantic names the union member that failed in an error's location ('messages.0.content.str',
    'prompt.list[int]'); the field path the client sent has no such parts."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part)


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
    for field in ("temperature", "top_p", "top_k", "seed", "repetition_penalty", "frequency_penalty", "presence_penalty",
                  "logit_bias", "min_p", "min_tokens", "ignore_eos", "stop_token_ids", "include_stop_str_in_output",
                  "allowed_token_ids", "bad_words", "priority"):
        value = getattr(request, field)
        if value is not None:
            updates[field] = value
    if updates.get("top_k") == -1:
        updates["top_k"] = 0
    if max_tokens is not None:
        updates["max_new_tokens"] = max_tokens
    updates["logprobs"] = requested_logprobs(request)
    budget = reasoning_budget(request, config)
    if budget is not None:
        updates["thinking_token_budget"] = budget
    constraint = requested_constraint(request, config.engine.engine)
    if constraint is not None:
        _, kind, value = constraint
        updates[kind] = value
    if getattr(request, "echo", False):  # the echoed prompt's tokens get theirs too
        updates["prompt_logprobs"] = updates["logprobs"]
    if request.stop is not None:
        updates["stop"] = [request.stop] if isinstance(request.stop, str) else request.stop
    try:
        return SamplingConfig.model_validate({**config.sampling.model_dump(), **updates})
    except ValidationError as error:
        raise invalid_value(error) from None


def requested_schema(request: _SamplingFields) -> dict[str, Any] | None:
    """The JSON schema `response_format` asks the reply to follow: {"type": "object"} for
    json_object, the given schema for json_schema; None for text."""
    format_ = request.response_format
    kind = "text" if format_ is None else format_.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = format_.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise APIError(400, "response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                           param="response_format.json_schema.schema", code="invalid_value")
        return spec["schema"]
    raise APIError(400, f"response_format type {kind!r} is not one of text, json_object, json_schema",
                   param="response_format.type", code="invalid_value")


def reasoning_budget(request: _SamplingFields, config: ServeConfig) -> int | None:
    """The thinking_token_budget a request asks for: thinking_token_budget (vLLM), thinking_budget
    (SGLang), or reasoning_effort (OpenAI) through the server's reasoning_effort_budgets; None for
    no limit. 400 naming the field for two of them or an effort the server has no budget for."""
    given = [(field, getattr(request, field)) for field in ("thinking_token_budget", "thinking_budget", "reasoning_effort")
             if getattr(request, field) is not None]
    if len(given) > 1:
        raise APIError(400, f"{given[0][0]} and {given[1][0]} both limit the reasoning; give one of them",
                       param=given[1][0], code="invalid_value")
    if not given:
        return None
    field, value = given[0]
    if field != "reasoning_effort":
        return value
    levels = config.reasoning_effort_budgets
    if value not in levels:
        raise APIError(400, f"reasoning_effort {value[:32]!r} is not one of {', '.join(levels)}", param="reasoning_effort",
                       code="invalid_value")
    return levels[value]


# vLLM's guided-decoding fields and structured_outputs' keys, with the SamplingConfig field each sets.
_GUIDED_FIELDS = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}
_STRUCTURED_OUTPUTS_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                            "json_object": "json_schema"}
# structured_outputs' options that change nothing here (r1's JSON is compact already, one backend).
_STRUCTURED_OUTPUTS_OPTIONS = frozenset({"disable_fallback", "disable_any_whitespace", "disable_additional_properties"})


def _given_constraints(request: _SamplingFields) -> list[tuple[str, str, Any]]:
    """Every constraint the request gives, as (the field that gives it, SamplingConfig field, raw
    value), unchecked: response_format (not text), the guided_* fields, structured_outputs' keys."""
    given = []
    format_ = request.response_format
    if format_ is not None and format_.get("type", "text") != "text":
        given.append(("response_format", "json_schema", format_))
    given += [(field, kind, getattr(request, field)) for field, kind in _GUIDED_FIELDS.items()
              if getattr(request, field) is not None]
    for key, value in (request.structured_outputs or {}).items():
        param = f"structured_outputs.{key}"
        if key in _STRUCTURED_OUTPUTS_KEYS:
            if value is not None and value is not False:
                given.append((param, _STRUCTURED_OUTPUTS_KEYS[key], value))
        elif key not in _STRUCTURED_OUTPUTS_OPTIONS:
            raise APIError(400, f"structured_outputs.{key[:64]} is not supported; structured_outputs takes one of "
                           "json, regex, choice, grammar, json_object", param=param[:128], code="unsupported")
    return given


def constraint_param(request: _SamplingFields) -> str | None:
    """The field that constrains the request's reply (response_format, guided_regex, ...), if any."""
    given = _given_constraints(request)
    return given[0][0] if given else None


def requested_constraint(request: _SamplingFields, engine: str = "transformers") -> tuple[str, str, Any] | None:
    """The one constraint on the reply the request asks for, as (the field that asks, SamplingConfig
    field, checked value): response_format json_object / json_schema (a JSON schema), or vLLM's guided
    decoding (guided_json, guided_regex, guided_choice, guided_grammar, or the same as keys of
    structured_outputs). 400 naming the field for two of them, a value of the wrong shape, one xgrammar
    cannot compile (`check_constraint`, before any model work) or an engine without structured output."""
    given = _given_constraints(request)
    if not given:
        return None
    if len(given) > 1:
        raise APIError(400, f"{given[0][0]} and {given[1][0]} each constrain the reply; give one of them",
                       param=given[1][0], code="invalid_value")
    param, kind, value = given[0]
    value = requested_schema(request) if param == "response_format" else _guide_value(param, kind, value)
    if engine != "transformers":
        raise APIError(400, f"{param} (structured output) is not supported with engine.name: {engine}; use the "
                       "transformers engine", param=param, code="unsupported")
    if param != "response_format":  # response_format's schema is compiled by the engine, as before
        from r1.engine.structured import check_constraint
        from r1.engine.types import RequestError

        try:
            check_constraint(kind, value, param)
        except RequestError as error:
            raise APIError(400, str(error), param=param, code=error.code) from None
    return param, kind, value


def _guide_value(param: str, kind: str, value: Any) -> Any:
    """A guided-decoding value in the shape SamplingConfig takes; 400 naming `param` otherwise."""
    def invalid(message: str) -> APIError:
        return APIError(400, f"invalid value for '{param}': {message}", param=param, code="invalid_value")

    if param == "structured_outputs.json_object":
        if value is not True:
            raise invalid("json_object is true (any JSON object) or left out")
        return {"type": "object"}
    if kind == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as error:
                raise invalid(f"a JSON schema as text must be JSON: {error}") from None
        if not isinstance(value, dict):
            raise invalid("a JSON schema is an object")
        return value
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(item, str) and item for item in value):
            raise invalid("a non-empty list of non-empty strings")
        if len(value) > MAX_CHOICES:
            raise invalid(f"{len(value)} choices; at most {MAX_CHOICES} are allowed")
        return value
    if not isinstance(value, str) or not value:
        raise invalid(f"a non-empty string ({'a regular expression' if kind == 'regex' else 'an EBNF grammar'})")
    if len(value) > MAX_GUIDE_CHARS:
        raise invalid(f"{len(value)} characters; at most {MAX_GUIDE_CHARS} are allowed")
    return value


def requested_logprobs(request: _SamplingFields) -> int | None:
    """How many alternatives per token the request wants log-probabilities for (0: the chosen token's
    only); None when it wants none. Chat asks with `logprobs: true` and `top_logprobs`, completions
    with `logprobs: k`."""
    if isinstance(request, ChatCompletionRequest):
        if not request.logprobs:
            if request.top_logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
            return None
        return request.top_logprobs or 0
    return getattr(request, "logprobs", None)


def completion_prompts(request: CompletionRequest, config: ServeConfig) -> tuple[list[str | list[int]], list[str]]:
    """The request's prompts, and the param that names each in errors: one prompt ("prompt"), or
    a batch ("prompt.0", "prompt.1", …). Each prompt gets `n` choices, so a batch of k prompts
    makes k × n choices, at most `max_n` (as `n` alone)."""
    batch = prompt_batch(request.prompt)
    if batch is None:
        return [request.prompt], ["prompt"]
    choices = len(batch) * request.n
    if choices > config.max_n:
        raise APIError(400, f"{len(batch)} prompts with n={request.n} make {choices} choices, more than this server's "
                       f"limit of {config.max_n}; send fewer prompts per request", param="prompt", code="limit_exceeded")
    return batch, [f"prompt.{index}" for index in range(len(batch))]


def chat_messages(request: ChatCompletionRequest | TokenizeRequest, config: ServeConfig,
                  stored_calls: bool = False) -> list[dict[str, str]]:
    """The request's messages as the chat template gets them, one for each: text contents,
    `developer` as `system`, tool calls and their results written out as text (`r1.serving.tools`),
    a result as a user turn. (One for each, so that `messages.N` in an error names the request's
    message N.) The functions a request offers are not in them (`tool_messages` adds them).
    A tool message must answer a call made earlier in the request, or, with `stored_calls` (the
    request continues a stored conversation, which keeps calls as text without their ids), in it."""
    if len(request.messages) > config.max_messages:
        raise APIError(400, f"{len(request.messages)} messages exceed this server's limit of {config.max_messages}", param="messages")
    messages: list[dict[str, str]] = []
    calls: set[str] = set()  # ids of the calls made so far, which tool messages answer
    for index, message in enumerate(request.messages):
        text = message.text(index)
        if message.role == "tool":
            if message.tool_call_id not in calls and not stored_calls:
                raise APIError(400, f"tool message answers call {message.tool_call_id!r}, which no earlier assistant "
                               "message of this request made", param=f"messages.{index}.tool_call_id", code="invalid_value")
            messages.append({"role": "user", "content": tools.result_text(text)})
        elif message.tool_calls:
            calls.update(call.id for call in message.tool_calls)
            written = "\n".join(tools.call_text(call.function.name, call.function.arguments) for call in message.tool_calls)
            messages.append({"role": "assistant", "content": f"{text}\n{written}" if text else written})
        else:
            messages.append({"role": "system" if message.role == "developer" else message.role, "content": text})
    return _continuation(request, messages)


def _continuation(request: ChatCompletionRequest | TokenizeRequest, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with the final one marked `prefix` when the request continues it (vLLM's
    continue_final_message, or DeepSeek's `"prefix": true` on it; `r1.chat_template`); 400 naming
    the field for a continuation that cannot be one."""
    last = len(request.messages) - 1
    for index, message in enumerate(request.messages[:-1]):
        if message.prefix:
            raise APIError(400, "only the last message can be a prefix the reply continues", code="invalid_value",
                           param=f"messages.{index}.prefix")
    final = request.messages[-1]
    param = "continue_final_message" if request.continue_final_message else f"messages.{last}.prefix"
    if not (request.continue_final_message or final.prefix):
        if request.add_generation_prompt is False and isinstance(request, ChatCompletionRequest):
            raise APIError(400, "add_generation_prompt: false is only taken with continue_final_message: true (the "
                           "reply then continues the last assistant message)", param="add_generation_prompt",
                           code="invalid_value")
        return messages
    if request.add_generation_prompt:
        raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true: the reply either "
                       "continues the last message or starts a new one", param="add_generation_prompt",
                       code="invalid_value")
    if final.role != "assistant" or final.tool_calls:
        raise APIError(400, "the last message must be the start of the assistant's reply (role assistant, no "
                       "tool_calls) to be continued", param=param, code="invalid_value")
    content = messages[-1]["content"]
    if final.reasoning_content:
        if content:
            raise APIError(400, "a prefix continues either the reasoning (reasoning_content) or the answer (content), "
                           "not both", param=f"messages.{last}.reasoning_content", code="invalid_value")
        content = f"{THINK_OPEN}\n{final.reasoning_content}"
    if not content:
        raise APIError(400, "the message to continue is empty; send the start of the reply", param=param,
                       code="invalid_value")
    if THINK_CLOSE in content:
        raise APIError(400, f"a prefix cannot hold {THINK_CLOSE}: the template drops the reasoning before it; send "
                       "the start of the answer (content), or of the reasoning (reasoning_content)",
                       param=f"messages.{last}.content", code="invalid_value")
    return [*messages[:-1], {"role": "assistant", "content": content, "prefix": True}]


def request_tools(request: ChatCompletionRequest | TokenizeRequest) -> tools.ToolPlan | None:
    """The request's tool plan (None: a plain-text answer)."""
    return tools.tool_plan(request.tools, request.tool_choice, request.parallel_tool_calls)


def tool_sampling(request: ChatCompletionRequest, plan: tools.ToolPlan, sampling: SamplingConfig,
                  engine: str = "transformers") -> SamplingConfig:
    """`sampling` for a request that offers tools: a constrained choice ("required", a named
    function) constrains the answer to its schema (structured output: the transformers `engine`
    only). 400 for what cannot go with tools."""
    constrained = constraint_param(request)
    conflicts = [
        ("tool_choice", plan.mode != "auto" and engine != "transformers",
         f"tool_choice {plan.mode!r} constrains the answer, which engine.name: {engine} does not support; "
         "use tool_choice \"auto\" or the transformers engine"),
        ("logprobs", bool(request.logprobs), "logprobs are not returned with tools; omit logprobs or tools"),
        (constrained, constrained is not None,
         f"{constrained} cannot be combined with tools; an answer is either a tool call or constrained text"),
        ("code_validation", request.code_validation, "code_validation cannot be combined with tools"),
        ("min_tokens", plan.mode != "auto" and bool(sampling.min_tokens),
         f"min_tokens cannot be combined with tool_choice {plan.mode!r}, which constrains the answer"),
    ]
    for param, conflict, message in conflicts:
        if conflict:
            raise APIError(400, message, param=param, code="invalid_value")
    tools.check_schemas(plan)
    return sampling.model_copy(update={"json_schema": plan.schema()})


def tool_messages(messages: list[dict[str, str]], plan: tools.ToolPlan | None) -> list[dict[str, str]]:
    """`messages` with the functions of `plan` offered in the system text."""
    return tools.with_tools_prompt(messages, tools.tools_prompt(plan) if plan is not None else "")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens`: the prompt tokens the engine's prefix cache held
    (`prompt_tokens_details`, as OpenAI and vLLM give them), left out when the engine does not say."""
    usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return usage


def total_cached(counts: list[int | None]) -> int | None:
    """The cached prompt tokens of a request's generations together (`usage_dict`'s `cached_tokens`):
    None when any came from an engine that does not say."""
    return None if None in counts else sum(counts)


def chat_response(response_id: str, model: str, choices: list[dict[str, Any]], usage: dict[str, int], **extra: Any) -> dict[str, Any]:
    return {"id": response_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage, **extra}


def chat_choice(index: int, reasoning: str, content: str, finish_reason: str | None,
                logprobs: dict[str, Any] | None = None, tool_calls: list[dict[str, Any]] | None = None,
                stop_reason: str | int | None = None) -> dict[str, Any]:
    """A chat choice; `stop_reason` (vLLM's): the stop string or stop token id that ended it, else None."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "reasoning_content": reasoning or None,
                               "reasoning": reasoning or None}
    if tool_calls:  # as OpenAI answers a call: no content when there is no text besides it
        message["tool_calls"] = tool_calls
        message["content"] = content or None
    return {"index": index, "message": message, "finish_reason": finish_reason, "stop_reason": stop_reason,
            "logprobs": logprobs}


def chat_chunk(response_id: str, model: str, created: int, index: int, delta: dict[str, Any], finish_reason: str | None = None,
               usage: dict[str, int] | None = None, logprobs: dict[str, Any] | None = None,
               stop_reason: str | int | None = None) -> dict[str, Any]:
    """A chat stream chunk (index < 0: none, the usage chunk); a choice's last one carries its stop_reason."""
    choices = [] if index < 0 else [_chunk_choice({"index": index, "delta": delta}, finish_reason, logprobs, stop_reason)]
    chunk = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def completion_response(response_id: str, model: str, choices: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
    return {"id": response_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage}


def completion_choice(index: int, text: str, finish_reason: str | None,
                      logprobs: dict[str, Any] | None = None, stop_reason: str | int | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "finish_reason": finish_reason, "stop_reason": stop_reason, "logprobs": logprobs}


def completion_chunk(response_id: str, model: str, created: int, index: int, text: str, finish_reason: str | None = None,
                     usage: dict[str, int] | None = None, logprobs: dict[str, Any] | None = None,
                     stop_reason: str | int | None = None) -> dict[str, Any]:
    choices = [] if index < 0 else [_chunk_choice({"index": index, "text": text}, finish_reason, logprobs, stop_reason)]
    chunk = {"id": response_id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def _chunk_choice(choice: dict[str, Any], finish_reason: str | None, logprobs: dict[str, Any] | None,
                  stop_reason: str | int | None) -> dict[str, Any]:
    """A stream chunk's choice; its last chunk (with the finish reason) also says what stopped it."""
    choice.update(finish_reason=finish_reason, logprobs=logprobs)
    if finish_reason is not None:
        choice["stop_reason"] = stop_reason
    return choice


def model_object(model: str, created: int, max_model_len: int, parent: str | None = None) -> dict[str, Any]:
    """The model card; `max_model_len` (the context in tokens, prompt and reply together) and
    `parent` (a LoRA adapter's base model, null for the base) as vLLM gives them."""
    return {"id": model, "object": "model", "created": created, "owned_by": "r1-cluster", "max_model_len": max_model_len,
            "parent": parent}


def models_list(model: str, created: int, max_model_len: int, adapters: Sequence[str] = ()) -> dict[str, Any]:
    """The base model, then each LoRA adapter served beside it."""
    return {"object": "list", "data": [model_object(model, created, max_model_len),
                                       *(model_object(name, created, max_model_len, model) for name in adapters)]}
