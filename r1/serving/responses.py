"""OpenAI's Responses API (`POST /v1/responses`) on top of the chat path.

A Responses request is a chat request in other words: `instructions` become a system message and
`input` (a string, or a list of messages whose content is a string or `input_text` parts) the
messages; `max_output_tokens` is `max_tokens`. `chat_request` makes that translation, so the
request is validated, screened and generated exactly as a chat completion is; `ResponseEvents`
puts the result in the Responses shape (`finished`, or streamed events): a `reasoning` output item holding
the model's reasoning (R1-style models always reason) and a `message` item holding the answer,
and for streams the event sequence the stock `openai` client reads (`response.created` …
`response.completed`). Errors name the Responses fields (`input.1.content`, `max_output_tokens`).

`text.format` json_object / json_schema is chat's `response_format` (structured output).

Not implemented, refused with a 400 naming the field when asked for: `tools`,
`previous_response_id` (nothing is stored: `store` is accepted and has no effect), `background`,
`include`. `reasoning` settings are accepted and not used.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Literal

from pydantic import Field, StrictBool

from r1.serving.protocol import APIError, ChatCompletionRequest, LenientModel, parse_request, new_id


class InputPart(LenientModel):
    type: str
    text: str | None = None


class InputMessage(LenientModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputPart]


class ResponsesRequest(LenientModel):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: StrictBool = False
    store: StrictBool | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None
    reasoning: dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    tool_choice: Any = None
    # Refused when they ask for something (`chat_request`).
    tools: list[Any] | None = None
    previous_response_id: str | None = None
    background: StrictBool | None = None
    include: list[str] | None = None
    text: dict[str, Any] | None = None


def _refuse(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported")


def chat_request(request: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion request a Responses request asks for; 400 naming the Responses field for
    what r1 does not implement or cannot read."""
    if request.tools:
        raise _refuse("tools", "tools are not supported on /v1/responses; call tools through /v1/chat/completions")
    if request.previous_response_id is not None:
        raise _refuse("previous_response_id", "responses are not stored on this server; send the whole conversation "
                      "as input (or use /v1/chat/completions with session_id)")
    if request.background:
        raise _refuse("background", "background responses are not supported; omit background")
    if request.include:
        raise _refuse("include", "include is not supported; omit it")
    messages: list[dict[str, Any]] = []
    if request.instructions is not None:
        messages.append({"role": "system", "content": request.instructions})
    if isinstance(request.input, str):
        messages.append({"role": "user", "content": request.input})
    else:
        if not request.input:
            raise APIError(400, "input is empty; send a string or at least one message", param="input",
                           code="invalid_value")
        for index, item in enumerate(request.input):
            if item.get("type", "message") != "message":
                raise _refuse(f"input.{index}", f"input items of type {item.get('type')!r} are not supported; send messages")
            try:
                message = parse_request(InputMessage, item)
            except APIError as error:
                raise APIError(400, error.message.replace("for '", f"for 'input.{index}."),
                               param=f"input.{index}" + (f".{error.param}" if error.param else ""), code=error.code) from None
            messages.append({"role": message.role, "content": _text(message, index)})
    body = {"model": request.model, "messages": messages, "stream": request.stream, "user": request.user,
            "max_tokens": request.max_output_tokens, "temperature": request.temperature, "top_p": request.top_p,
            "response_format": _response_format(request.text)}
    try:
        return parse_request(ChatCompletionRequest, {k: v for k, v in body.items() if v is not None})
    except APIError as error:
        raise responses_error(error, request) from None


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """`text.format` as chat's response_format: json_schema carries its schema at the top level here."""
    format_ = (text or {}).get("format")
    if not isinstance(format_, dict) or format_.get("type") != "json_schema":
        return format_
    return {"type": "json_schema", "json_schema": {key: value for key, value in format_.items() if key != "type"}}


def _text(message: InputMessage, index: int) -> str:
    if isinstance(message.content, str):
        return message.content
    texts = []
    for position, part in enumerate(message.content):
        if part.type not in ("input_text", "output_text") or part.text is None:
            raise _refuse(f"input.{index}.content.{position}", f"only text content parts are supported, not {part.type!r}")
        texts.append(part.text)
    return "\n".join(texts)


_MESSAGE_PARAM = re.compile(r"messages(?:\.(\d+))?(.*)")


def responses_error(error: APIError, request: ResponsesRequest) -> APIError:
    """A chat-path error with the field named as the Responses request sent it."""
    param = error.param
    if param in ("max_tokens", "max_completion_tokens"):
        param = "max_output_tokens"
    elif param is not None and param.startswith("response_format"):
        param = "text.format" + param.removeprefix("response_format").replace(".json_schema", "")
    elif param is not None and (match := _MESSAGE_PARAM.fullmatch(param)):
        index = None if match.group(1) is None else int(match.group(1))
        if request.instructions is not None and index is not None:
            index -= 1
        if index == -1:
            param = "instructions"
        elif index is None or isinstance(request.input, str):
            param = "input"
        else:
            param = f"input.{index}{match.group(2)}"
    message = error.message.replace("max_tokens", "max_output_tokens")
    return APIError(error.status, message, param=param, code=error.code, type=error.type)


def _usage(input_tokens: int, output_tokens: int, reasoning_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens}, "total_tokens": input_tokens + output_tokens}


class ResponseEvents:
    """One response: its output items as they grow, its object, and (streamed) its events."""

    def __init__(self, request: ResponsesRequest, model: str):
        self.request = request
        self.model = model
        self.id = new_id("resp")
        self.created = int(time.time())
        self._sequence = 0
        self.reasoning = ""
        self.content = ""
        self._reasoning_id = new_id("rs")
        self._message_id = new_id("msg")
        self._open: str | None = None  # the item being streamed: "reasoning" or "message"
        self._items: list[str] = []  # the output items opened so far, in order

    # -- the response object -------------------------------------------------------------------
    def _reasoning_item(self, status: str) -> dict[str, Any]:
        return {"type": "reasoning", "id": self._reasoning_id, "summary": [], "status": status,
                "content": [{"type": "reasoning_text", "text": self.reasoning}]}

    def _message_item(self, status: str) -> dict[str, Any]:
        return {"type": "message", "id": self._message_id, "role": "assistant", "status": status,
                "content": [{"type": "output_text", "text": self.content, "annotations": [], "logprobs": []}]}

    def _item(self, kind: str, status: str) -> dict[str, Any]:
        return self._reasoning_item(status) if kind == "reasoning" else self._message_item(status)

    def response(self, status: str = "in_progress", finish_reason: str | None = None,
                 usage: dict[str, Any] | None = None) -> dict[str, Any]:
        """The response object; a finished one is `incomplete` when `finish_reason` is "length" (the
        max_output_tokens limit) or "content_filter" (the safety filter blocked the output)."""
        if status != "in_progress" and finish_reason in ("length", "content_filter"):
            status = "incomplete"
        item_status = "completed" if status == "completed" else status
        output = [self._item(kind, item_status) for kind in self._items] if status != "in_progress" else []
        request = self.request
        return {
            "id": self.id, "object": "response", "created_at": self.created, "model": self.model, "status": status,
            "error": None,
            "incomplete_details": None if status != "incomplete" else
            {"reason": "max_output_tokens" if finish_reason == "length" else "content_filter"},
            "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
            "metadata": request.metadata or {}, "output": output, "parallel_tool_calls": False, "tool_choice": "none",
            "tools": [], "temperature": request.temperature, "top_p": request.top_p,
            "text": {"format": {"type": "text"}}, "store": False, "usage": usage,
        }

    def finished(self, reasoning: str, content: str, finish_reason: str | None, input_tokens: int, output_tokens: int,
                 reasoning_tokens: int) -> dict[str, Any]:
        """The whole (not streamed) response."""
        self.reasoning, self.content = reasoning, content
        self._items = (["reasoning"] if reasoning else []) + ["message"]
        return self.response("completed", finish_reason, _usage(input_tokens, output_tokens, reasoning_tokens))

    # -- streamed events -------------------------------------------------------------------------
    def _event(self, kind: str, **fields: Any) -> bytes:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return f"event: {kind}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode("utf-8")

    def opening(self) -> bytes:
        response = self.response()
        return self._event("response.created", response=response) + self._event("response.in_progress", response=response)

    def _switch(self, kind: str) -> bytes:
        """Close the item being streamed and open a `kind` item."""
        out = self._close()
        self._open = kind
        self._items.append(kind)
        index = len(self._items) - 1
        out += self._event("response.output_item.added", output_index=index, item=self._item(kind, "in_progress"))
        if kind == "message":
            out += self._event("response.content_part.added", item_id=self._message_id, output_index=index,
                               content_index=0, part={"type": "output_text", "text": "", "annotations": []})
        return out

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        index = len(self._items) - 1
        if self._open == "reasoning":
            out = self._event("response.reasoning_text.done", item_id=self._reasoning_id, output_index=index,
                              content_index=0, text=self.reasoning)
        else:
            part = {"type": "output_text", "text": self.content, "annotations": []}
            out = (self._event("response.output_text.done", item_id=self._message_id, output_index=index,
                               content_index=0, text=self.content, logprobs=[])
                   + self._event("response.content_part.done", item_id=self._message_id, output_index=index,
                                 content_index=0, part=part))
        out += self._event("response.output_item.done", output_index=index, item=self._item(self._open, "completed"))
        self._open = None
        return out

    def delta(self, reasoning: str, content: str) -> bytes:
        """Events for newly screened reasoning and answer text (reasoning comes first)."""
        out = b""
        if reasoning:
            if self._open != "reasoning":
                out += self._switch("reasoning")
            self.reasoning += reasoning
            out += self._event("response.reasoning_text.delta", item_id=self._reasoning_id,
                               output_index=len(self._items) - 1, content_index=0, delta=reasoning)
        if content:
            if self._open != "message":
                out += self._switch("message")
            self.content += content
            out += self._event("response.output_text.delta", item_id=self._message_id, output_index=len(self._items) - 1,
                               content_index=0, delta=content, logprobs=[])
        return out

    def closing(self, finish_reason: str | None, input_tokens: int, output_tokens: int, reasoning_tokens: int) -> bytes:
        """The end of the stream: the open item's done events, an empty answer if none came, and
        `response.completed` (or `response.incomplete` at max_output_tokens) with the usage."""
        out = b"" if "message" in self._items else self._switch("message")
        out += self._close()
        response = self.response("completed", finish_reason, _usage(input_tokens, output_tokens, reasoning_tokens))
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return out + self._event(kind, response=response)

    def error(self, error: APIError) -> bytes:
        return self._event("error", code=error.code, message=error.message, param=error.param)
