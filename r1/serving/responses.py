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

Function tools are chat's tool calling (`r1.serving.tools`) in the Responses shape: `tools` of
`{"type": "function", "name", "parameters"}`, `tool_choice` (`{"type": "function", "name"}` for a
named one), calls as `function_call` output items, and in the input `function_call` items (an
earlier answer's calls, as the client sends them back) and `function_call_output` items (their
results). A `reasoning` item sent back in the input is dropped: an R1-style template shows no
earlier reasoning to the model.

Stored responses (`store`, true unless the request says false, and `previous_response_id`) are
kept by the ingress in the session store (`actors.session_store`): a stored response is a session
named by the response's id, holding the conversation up to and including its answer, so any
stored response can be continued, again and again (branches), and survives a restart of the store.

A stored response also keeps its request's input as items (`input_items`, listed by
`GET /v1/responses/{id}/input_items`): built from the screened messages, so the store holds what
the input screening let through, never the raw input.

Not implemented, refused with a 400 naming the field when asked for: tools other than functions,
`background`, `include`. `reasoning.effort` limits the reasoning's tokens as chat's
`reasoning_effort` does; `reasoning.summary` is accepted and not used.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Literal

from pydantic import Field, StrictBool

from r1.serving import tools
from r1.serving.protocol import APIError, ChatCompletionRequest, LenientModel, parse_request, new_id


class InputPart(LenientModel):
    type: str
    text: str | None = None


class InputMessage(LenientModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputPart]


class FunctionCallItem(LenientModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(LenientModel):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputPart]


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
    tools: list[Any] | None = None
    previous_response_id: str | None = None
    text: dict[str, Any] | None = None
    # r1 extensions with chat's meaning (not in OpenAI's Responses API).
    seed: int | None = None
    logit_bias: dict[str, Any] | None = None
    # Refused when they ask for something (`chat_request`).
    background: StrictBool | None = None
    include: list[str] | None = None


def _refuse(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported")


def chat_request(request: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion request a Responses request asks for; 400 naming the Responses field for
    what r1 does not implement or cannot read."""
    if request.background:
        raise _refuse("background", "background responses are not supported; omit background")
    if request.include:
        raise _refuse("include", "include is not supported; omit it")
    messages = [message for message, _ in _messages(request)]
    body = {"model": request.model, "messages": messages, "stream": request.stream, "user": request.user,
            "max_tokens": request.max_output_tokens, "temperature": request.temperature, "top_p": request.top_p,
            "response_format": _response_format(request.text), "tools": _chat_tools(request.tools),
            "tool_choice": _chat_tool_choice(request.tool_choice), "parallel_tool_calls": request.parallel_tool_calls,
            "seed": request.seed, "logit_bias": request.logit_bias, "reasoning_effort": _effort(request.reasoning)}
    try:
        return parse_request(ChatCompletionRequest, {k: v for k, v in body.items() if v is not None})
    except APIError as error:
        raise responses_error(error, request) from None


def _effort(reasoning: dict[str, Any] | None) -> Any:
    """`reasoning.effort`, chat's reasoning_effort (its budget of reasoning tokens); `summary` is
    not produced (the whole reasoning is the reasoning item)."""
    return None if reasoning is None else reasoning.get("effort")


def _messages(request: ResponsesRequest) -> list[tuple[dict[str, Any], str]]:
    """The chat messages of `request`, each with the Responses field it came from (`instructions`,
    `input`, `input.N`): a chat error names that field. Consecutive `function_call` items are one
    assistant message (one answer's calls)."""
    messages: list[tuple[dict[str, Any], str]] = []
    if request.instructions is not None:
        messages.append(({"role": "system", "content": request.instructions}, "instructions"))
    if isinstance(request.input, str):
        messages.append(({"role": "user", "content": request.input}, "input"))
        return messages
    if not request.input:
        raise APIError(400, "input is empty; send a string or at least one message", param="input",
                       code="invalid_value")
    for index, item in enumerate(request.input):
        kind = item.get("type", "message")
        if kind == "reasoning":  # an earlier answer's reasoning, sent back: the template would drop it
            continue
        if kind == "function_call":
            call = _item(FunctionCallItem, item, index)
            tool_call = {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            if messages and messages[-1][1].endswith(".calls"):  # the same answer's next call
                messages[-1][0]["tool_calls"].append(tool_call)
            else:
                messages.append(({"role": "assistant", "content": None, "tool_calls": [tool_call]}, f"input.{index}.calls"))
        elif kind == "function_call_output":
            result = _item(FunctionCallOutputItem, item, index)
            output = result.output if isinstance(result.output, str) else _parts(result.output, index, "output")
            messages.append(({"role": "tool", "tool_call_id": result.call_id, "content": output}, f"input.{index}"))
        elif kind == "message":
            message = _item(InputMessage, item, index)
            content = message.content if isinstance(message.content, str) else _parts(message.content, index, "content")
            messages.append(({"role": message.role, "content": content}, f"input.{index}"))
        else:
            raise _refuse(f"input.{index}", f"input items of type {kind!r} are not supported; send messages, "
                          "function_call and function_call_output items")
    return messages


def _item(kind: type, item: dict[str, Any], index: int) -> Any:
    try:
        return parse_request(kind, item)
    except APIError as error:
        raise APIError(400, error.message.replace("for '", f"for 'input.{index}."),
                       param=f"input.{index}" + (f".{error.param}" if error.param else ""), code=error.code) from None


def _chat_tools(tools: list[Any] | None) -> list[Any] | None:
    """Responses function tools (flat: name, parameters) in chat's shape (under `function`)."""
    if tools is None:
        return None
    converted = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise _refuse(f"tools.{index}", f"only function tools are supported, not {kind!r}")
        converted.append({"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}})
    return converted


def _chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """`text.format` as chat's response_format: json_schema carries its schema at the top level here."""
    format_ = (text or {}).get("format")
    if not isinstance(format_, dict) or format_.get("type") != "json_schema":
        return format_
    return {"type": "json_schema", "json_schema": {key: value for key, value in format_.items() if key != "type"}}


def _parts(parts: list[InputPart], index: int, field: str) -> str:
    texts = []
    for position, part in enumerate(parts):
        if part.type not in ("input_text", "output_text") or part.text is None:
            raise _refuse(f"input.{index}.{field}.{position}", f"only text content parts are supported, not {part.type!r}")
        texts.append(part.text)
    return "\n".join(texts)


_MESSAGE_PARAM = re.compile(r"messages(?:\.(\d+))?(.*)")
# Chat's names of a tool's fields and of a named tool choice, and the Responses request's.
_TOOL_PARAM = re.compile(r"(tools\.\d+|tool_choice)\.function(.*)")


def responses_error(error: APIError, request: ResponsesRequest) -> APIError:
    """A chat-path error with the field named as the Responses request sent it."""
    param = error.param
    if param in ("max_tokens", "max_completion_tokens"):
        param = "max_output_tokens"
    elif param == "reasoning_effort":
        param = "reasoning.effort"
    elif param is not None and param.startswith("response_format"):
        param = "text.format" + param.removeprefix("response_format").replace(".json_schema", "")
    elif param is not None and (match := _TOOL_PARAM.fullmatch(param)):
        param = match.group(1) + match.group(2)
    elif param is not None and (match := _MESSAGE_PARAM.fullmatch(param)):
        if match.group(1) is None:
            param = "input"
        else:
            source = _messages(request)[int(match.group(1))][1]
            rest = match.group(2)
            if source.endswith(".calls"):  # an answer's calls, from one or more items: the first named
                source, rest = source.removesuffix(".calls"), ""
            elif source.startswith("input.") and rest in (".tool_call_id", ".content") and \
                    request.input[int(source.split(".")[1])].get("type") == "function_call_output":
                rest = {".tool_call_id": ".call_id", ".content": ".output"}[rest]
            param = source + ("" if source in ("instructions", "input") else rest)
    message = error.message.replace("max_tokens", "max_output_tokens").replace("reasoning_effort", "reasoning.effort")
    return APIError(error.status, message, param=param, code=error.code, type=error.type)


def input_items(request: ResponsesRequest, screened: list[dict[str, str]]) -> list[dict[str, Any]]:
    """The request's input as the items `GET /v1/responses/{id}/input_items` lists, in input order:
    its messages, function_call and function_call_output items (instructions are not input; a
    reasoning item sent back is dropped, as the prompt drops it). `screened` holds the request's chat
    messages (`chat_request`), as the input screening returned them: the texts come from there, so a
    redaction shows in the stored items too."""
    items: list[dict[str, Any]] = []
    for (message, source), chat in zip(_messages(request), screened):
        text = chat["content"]
        if source == "instructions":
            continue
        if source.endswith(".calls"):  # written out as <tool_call> blocks, one per call
            written = tools.written_calls(text)
            for number, call in enumerate(message["tool_calls"]):
                name, arguments = written[number] if number < len(written) else (None, "")
                items.append({"type": "function_call", "id": new_id("fc"), "call_id": call["id"],
                              "name": name or call["function"]["name"], "arguments": arguments, "status": "completed"})
        elif message["role"] == "tool":  # a result, wrapped as the model reads results
            output = text.removeprefix(tools.RESULT_OPEN).removesuffix(tools.RESULT_CLOSE)
            items.append({"type": "function_call_output", "id": new_id("fco"), "call_id": message["tool_call_id"],
                          "output": output, "status": "completed"})
        else:
            kind = "output_text" if message["role"] == "assistant" else "input_text"
            part = {"type": kind, "text": text, **({"annotations": []} if kind == "output_text" else {})}
            items.append({"type": "message", "id": new_id("msg"), "role": message["role"], "status": "completed",
                          "content": [part]})
    return items


def stored_response_data(response: dict[str, Any], items: list[dict[str, Any]], max_chars: int) -> str:
    """A stored response's `data` (kept with its exchange in the session store): the response object
    and its input items; the items left out (null) when both would take more than `max_chars`."""
    data = json.dumps({"response": response, "input_items": items}, ensure_ascii=False)
    if len(data) > max_chars:
        data = json.dumps({"response": response, "input_items": None}, ensure_ascii=False)
    return data


def read_stored_response(data: str) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """The response object and input items of a stored response's `data` (items None: not kept;
    a response stored before input items were kept has the object alone as its data)."""
    stored = json.loads(data)
    if stored.get("object") == "response":
        return stored, None
    return stored["response"], stored["input_items"]


def page_of_items(items: list[dict[str, Any]], limit: int, order: str, after: str | None,
                  before: str | None) -> dict[str, Any]:
    """One page of a response's input items, as OpenAI's list answers: `order` "asc" (input order)
    or "desc" (the default: last first), after / before an item id, at most `limit` of them."""
    ordered = items if order == "asc" else items[::-1]
    ids = [item["id"] for item in ordered]
    for param, cursor in (("after", after), ("before", before)):
        if cursor is not None and cursor not in ids:
            raise APIError(400, f"{param}: no input item '{cursor[:64]}' in this response", param=param,
                           code="invalid_value")
    start = ids.index(after) + 1 if after is not None else 0
    end = ids.index(before) if before is not None else len(ordered)
    page = ordered[start:end][:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": end - start > limit}


def _usage(input_tokens: int, output_tokens: int, reasoning_tokens: int, cached_tokens: int | None) -> dict[str, Any]:
    # cached_tokens: the input tokens the engine's prefix cache held (a field the object always has:
    # 0 from an engine that does not say).
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": cached_tokens or 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens}, "total_tokens": input_tokens + output_tokens}


class ResponseEvents:
    """One response: its output items as they grow, its object, and (streamed) its events."""

    def __init__(self, request: ResponsesRequest, model: str):
        self.request = request
        self.model = model
        self.id = new_id("resp")
        self.stored = False  # kept in the store once finished (its id can be a previous_response_id)
        self.created = int(time.time())
        self._sequence = 0
        self.reasoning = ""
        self.content = ""
        self._reasoning_id = new_id("rs")
        self._message_id = new_id("msg")
        self._open: str | None = None  # the item being streamed: "reasoning" or "message"
        self._items: list[str] = []  # the output items opened so far, in order ("call:N" for calls[N])
        self.calls: list[dict[str, Any]] = []  # function_call items (chat tool calls in the Responses shape)
        self.last_response: dict[str, Any] | None = None  # the finished response object (`finished`, `closing`)
        self.input_items: list[dict[str, Any]] = []  # the request's input, screened (`input_items`)

    # -- the response object -------------------------------------------------------------------
    def _reasoning_item(self, status: str) -> dict[str, Any]:
        return {"type": "reasoning", "id": self._reasoning_id, "summary": [], "status": status,
                "content": [{"type": "reasoning_text", "text": self.reasoning}]}

    def _message_item(self, status: str) -> dict[str, Any]:
        return {"type": "message", "id": self._message_id, "role": "assistant", "status": status,
                "content": [{"type": "output_text", "text": self.content, "annotations": [], "logprobs": []}]}

    def _item(self, kind: str, status: str) -> dict[str, Any]:
        if kind.startswith("call:"):
            return {**self.calls[int(kind[5:])], "status": status}
        return self._reasoning_item(status) if kind == "reasoning" else self._message_item(status)

    def _add_calls(self, calls: list[dict[str, Any]]) -> list[str]:
        """Chat tool calls as function_call items; their item kinds."""
        kinds = []
        for call in calls:
            kinds.append(f"call:{len(self.calls)}")
            self.calls.append({"type": "function_call", "id": new_id("fc"), "call_id": call["id"],
                               "name": call["function"]["name"], "arguments": call["function"]["arguments"]})
        return kinds

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
            "metadata": request.metadata or {}, "output": output,
            "parallel_tool_calls": request.parallel_tool_calls is not False,
            "tool_choice": request.tool_choice if request.tool_choice is not None else "auto" if request.tools else "none",
            "tools": request.tools or [], "temperature": request.temperature, "top_p": request.top_p,
            "text": {"format": {"type": "text"}}, "store": self.stored,
            "previous_response_id": request.previous_response_id, "usage": usage,
        }

    def finished(self, reasoning: str, content: str, finish_reason: str | None, input_tokens: int, output_tokens: int,
                 reasoning_tokens: int, calls: list[dict[str, Any]] | None = None,
                 cached_tokens: int | None = None) -> dict[str, Any]:
        """The whole (not streamed) response: a message item unless the answer is calls alone."""
        self.reasoning, self.content = reasoning, content
        self._items = (["reasoning"] if reasoning else []) + (["message"] if content or not calls else [])
        self._items += self._add_calls(calls or [])
        self.last_response = self.response("completed", finish_reason,
                                           _usage(input_tokens, output_tokens, reasoning_tokens, cached_tokens))
        return self.last_response

    def stored_data(self, max_chars: int) -> str | None:
        """What the store keeps of the finished response (`stored_response_data`); None before it finished."""
        if self.last_response is None:
            return None
        return stored_response_data(self.last_response, self.input_items, max_chars)

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

    def function_calls(self, calls: list[dict[str, Any]]) -> bytes:
        """Events for the answer's calls: each a function_call item whose arguments come whole."""
        out = self._close()
        for kind in self._add_calls(calls):
            self._items.append(kind)
            index, item = len(self._items) - 1, self._item(kind, "completed")
            out += self._event("response.output_item.added", output_index=index,
                               item={**item, "arguments": "", "status": "in_progress"})
            out += self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                               delta=item["arguments"])
            out += self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                               arguments=item["arguments"])
            out += self._event("response.output_item.done", output_index=index, item=item)
        return out

    def closing(self, finish_reason: str | None, input_tokens: int, output_tokens: int, reasoning_tokens: int,
                cached_tokens: int | None = None) -> bytes:
        """The end of the stream: the open item's done events, an empty answer if neither an answer
        nor calls came, and `response.completed` (or `response.incomplete` at max_output_tokens)
        with the usage."""
        out = b"" if "message" in self._items or self.calls else self._switch("message")
        out += self._close()
        response = self.last_response = self.response("completed", finish_reason,
                                                      _usage(input_tokens, output_tokens, reasoning_tokens, cached_tokens))
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return out + self._event(kind, response=response)

    def error(self, error: APIError) -> bytes:
        return self._event("error", code=error.code, message=error.message, param=error.param)
