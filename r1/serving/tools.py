"""Tool calling on chat completions: OpenAI's `tools` / `tool_choice`, for any model.

The request's functions are described to the model in a system text of r1's own (`tools_prompt`),
and a model calls one by answering with a block per call:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

History in OpenAI's shape (an assistant message with `tool_calls`, `tool` messages with the
results) is written out in the same text form, the results in a user turn, so every chat template
that knows system, user and assistant renders it; a template's own tool syntax is not used.

`tool_choice`:
- `"auto"` (the default when tools are given): the model answers freely; blocks in its answer
  become `tool_calls` (`ToolCallStream`). Text before the first block streams as content; from the
  first block on the answer is held to the end and parsed. An answer whose blocks do not parse (bad
  JSON, a function not offered, cut off) is returned as content, unchanged, as vLLM does.
- `"required"`: the answer is constrained (structured output) to a JSON array of one or more
  `{"name", "arguments"}` objects, each function's arguments following its `parameters` schema.
- `{"type": "function", "function": {"name": ...}}`: the answer is constrained to that function's
  arguments, as vLLM does; finish_reason is "stop", as OpenAI gives for a named choice.
A constrained answer that is not the JSON it was constrained to (cut off by `max_tokens`, or
changed by the output screening) is returned as content, with no call.
- `"none"`: tools are not described, the answer is plain text.

`parallel_tool_calls: false` allows one call (the array holds one item; of parsed blocks the first).

Everything here works on the text the output screening has passed: a tool call's arguments are
model output like any other, so a value the filter redacted is redacted in them too (which can
make them invalid JSON: clients must parse arguments defensively, as with OpenAI's).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from r1.serving.errors import APIError

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
# A tool's result as the model reads it: between these (`result_text`).
RESULT_OPEN, RESULT_CLOSE = "<tool_response>\n", "\n</tool_response>"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # used with fullmatch: "$" would let a final "\n" through
_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|\Z)", re.DOTALL)


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict[str, Any]

    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"name": self.name}
        if self.description:
            spec["description"] = self.description
        spec["parameters"] = self.parameters
        return {"type": "function", "function": spec}


@dataclass(frozen=True)
class ToolPlan:
    """What a request's `tools` / `tool_choice` / `parallel_tool_calls` ask for."""

    functions: tuple[Function, ...]
    mode: str  # "auto" | "required" | "named"
    name: str | None = None  # the function a named choice forces
    parallel: bool = True

    def names(self) -> set[str]:
        return {function.name for function in self.functions}

    def function(self, name: str) -> Function:
        return next(function for function in self.functions if function.name == name)

    def schema(self) -> dict[str, Any] | None:
        """The JSON schema a constrained answer follows (None for "auto")."""
        if self.mode == "named":
            return self.function(self.name).parameters
        if self.mode == "required":
            calls = [{"type": "object", "properties": {"name": {"const": f.name}, "arguments": f.parameters},
                      "required": ["name", "arguments"], "additionalProperties": False} for f in self.functions]
            array: dict[str, Any] = {"type": "array", "minItems": 1,
                                     "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
            if not self.parallel:
                array["maxItems"] = 1
            return array
        return None


def tool_plan(tools: list[Any] | None, tool_choice: Any, parallel_tool_calls: bool | None) -> ToolPlan | None:
    """The request's tool plan; None when the answer is plain text (no tools, or tool_choice "none").
    400 naming the field for a malformed tool or a choice of a function not offered."""
    functions = [_function(tool, index) for index, tool in enumerate(tools or [])]
    seen: set[str] = set()
    for index, function in enumerate(functions):
        if function.name in seen:
            raise APIError(400, f"two tools are named {function.name!r}; tool names must be unique",
                           param=f"tools.{index}.function.name", code="invalid_value")
        seen.add(function.name)
    choice = tool_choice if tool_choice is not None else "auto"
    if choice == "none" or (choice == "auto" and not functions):  # neutral values: a plain-text answer
        return None
    if not functions:
        raise APIError(400, f"tool_choice {json.dumps(choice)} needs tools; give tools or omit tool_choice",
                       param="tool_choice", code="invalid_value")
    parallel = True if parallel_tool_calls is None else parallel_tool_calls
    if choice in ("auto", "required"):
        return ToolPlan(tuple(functions), choice, parallel=parallel)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" \
        and isinstance(choice.get("function"), dict) else None
    if not isinstance(name, str):
        raise APIError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                       '{"name": ...}}', param="tool_choice", code="invalid_value")
    if name not in seen:
        raise APIError(400, f"tool_choice names function {name!r}, which is not among the tools",
                       param="tool_choice.function.name", code="invalid_value")
    return ToolPlan(tuple(functions), "named", name, parallel)


def _function(tool: Any, index: int) -> Function:
    param = f"tools.{index}"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise APIError(400, 'a tool is {"type": "function", "function": {"name": ..., "parameters": {...}}}',
                       param=param, code="invalid_value")
    spec = tool["function"]
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise APIError(400, "a function name is 1 to 64 letters, digits, underscores or dashes",
                       param=f"{param}.function.name", code="invalid_value")
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise APIError(400, "a function description is a string", param=f"{param}.function.description",
                       code="invalid_value")
    parameters = spec.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise APIError(400, "a function's parameters are a JSON schema object",
                       param=f"{param}.function.parameters", code="invalid_value")
    return Function(name, description, parameters)


def check_schemas(plan: ToolPlan) -> None:
    """A constrained plan's schemas must compile (xgrammar); 400 naming the tool whose does not."""
    if plan.mode == "auto":
        return
    try:
        import xgrammar

        from r1.engine.structured import xgrammar_reason
    except ImportError:
        raise APIError(400, f"tool_choice {plan.mode!r} constrains the answer and needs the xgrammar package: "
                       "pip install 'r1-cluster[structured]'", param="tool_choice", code="unsupported") from None
    for index, function in enumerate(plan.functions):
        if plan.mode == "named" and function.name != plan.name:
            continue
        try:
            xgrammar.Grammar.from_json_schema(json.dumps(function.parameters), any_whitespace=False)
        except Exception as error:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError with its reason
            raise APIError(400, f"the function's parameters schema cannot be used: {xgrammar_reason(error)}",
                           param=f"tools.{index}.function.parameters", code="invalid_value") from None


def tools_prompt(plan: ToolPlan) -> str:
    """The system text that offers the functions and says how to call them."""
    specs = "\n".join(json.dumps(function.spec(), ensure_ascii=False) for function in plan.functions)
    if plan.mode == "named":
        ask = f"Call the function {plan.name}."
    elif plan.mode == "required":
        ask = "Call at least one of the functions." if plan.parallel else "Call exactly one of the functions."
    else:
        ask = "Call functions when they help; otherwise answer directly."
        if not plan.parallel:
            ask += " Call at most one function."
    return (f"You can call these functions:\n<tools>\n{specs}\n</tools>\n{ask} To call a function, answer with "
            f"a block per call:\n{TOOL_CALL_OPEN}\n{{\"name\": <function name>, \"arguments\": <arguments as a JSON "
            f"object>}}\n{TOOL_CALL_CLOSE}")


def with_tools_prompt(messages: list[dict[str, str]], text: str) -> list[dict[str, str]]:
    """`messages` with the tools text at the end of the leading system message (or in a new one):
    templates differ in how many system messages they show, all show the first. No text: `messages`."""
    if not text:
        return messages
    if messages and messages[0]["role"] == "system":
        first = messages[0]["content"]
        return [{"role": "system", "content": f"{first}\n\n{text}" if first else text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def call_text(name: str, arguments: str) -> str:
    """A call as the model writes it (the arguments as sent when they are JSON, else as a string)."""
    try:
        value = json.loads(arguments)
    except ValueError:
        value = arguments
    return (f"{TOOL_CALL_OPEN}\n{json.dumps({'name': name, 'arguments': value}, ensure_ascii=False)}\n"
            f"{TOOL_CALL_CLOSE}")


def result_text(content: str) -> str:
    """A tool's result as the model reads it."""
    return f"{RESULT_OPEN}{content}{RESULT_CLOSE}"


def new_call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": arguments}}


def _arguments(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def written_calls(text: str) -> list[tuple[str | None, str]]:
    """The calls written in `text` (as `call_text` writes them), each as (name, arguments JSON);
    a block that is not such a call (changed by the input screening, say) as (None, its text)."""
    calls: list[tuple[str | None, str]] = []
    for block in _BLOCK.finditer(text):
        try:
            call = json.loads(block.group(1))
        except ValueError:
            call = None
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            arguments = call.get("arguments", {})
            calls.append((call["name"], arguments if isinstance(arguments, str) else _arguments(arguments)))
        else:
            calls.append((None, block.group(1).strip()))
    return calls


def parse_tool_calls(text: str, plan: ToolPlan) -> tuple[list[dict[str, Any]], str] | None:
    """The calls in an "auto" answer's `text` (which holds at least one block) and the text outside
    the blocks; None if a block does not parse into a call of an offered function."""
    calls = []
    for block in _BLOCK.finditer(text):
        try:
            call = json.loads(block.group(1))
        except ValueError:
            return None
        if not isinstance(call, dict) or call.get("name") not in plan.names():
            return None
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # arguments given as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append(new_call(call["name"], _arguments(arguments)))
    if not calls:
        return None
    return (calls if plan.parallel else calls[:1]), _BLOCK.sub("", text).strip()


def parse_constrained(text: str, plan: ToolPlan) -> list[dict[str, Any]] | None:
    """The calls of a constrained ("required" or named) answer; None if `text` is not the JSON the
    constraint leads to (cut off by max_tokens, or changed by the output screening)."""
    try:
        answer = json.loads(text)
    except ValueError:
        return None
    if plan.mode == "named":  # the answer is the arguments themselves
        return [new_call(plan.name, text.strip())] if isinstance(answer, dict) else None
    items = answer
    if not isinstance(items, list) or not items:
        return None
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in plan.names() or not isinstance(item.get("arguments"), dict):
            return None
        calls.append(new_call(item["name"], _arguments(item["arguments"])))
    return calls


@dataclass
class ToolCallStream:
    """One choice's answer text (after the reasoning) on its way to the client: what may be shown as
    content now, and at the end the calls it made."""

    plan: ToolPlan
    _held: str = ""
    _calling: bool = False  # a block has begun: everything from it on is held
    calls: list[dict[str, Any]] = field(default_factory=list)

    def feed(self, text: str) -> str:
        """Content that can be shown now: for "auto", the text before any (possible) block start."""
        if self.plan.mode != "auto" or self._calling:
            self._held += text
            return ""
        text = self._held + text
        start = text.find(TOOL_CALL_OPEN)
        if start >= 0:
            self._calling, self._held = True, text[start:]
            return text[:start]
        keep = _partial_open(text)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def finish(self) -> str:
        """The rest of the content; `calls` holds the calls made (empty: the text was an answer)."""
        held, self._held = self._held, ""
        if self.plan.mode == "auto":
            parsed = parse_tool_calls(held, self.plan) if self._calling else None
            if parsed is None:
                return held
            self.calls, rest = parsed
            return rest
        calls = parse_constrained(held, self.plan)
        if calls is None:
            return held
        self.calls = calls
        return ""


def _partial_open(text: str) -> int:
    """Length of the longest end of `text` that begins `<tool_call>` (held until the next text decides)."""
    for size in range(min(len(text), len(TOOL_CALL_OPEN) - 1), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-size:]):
            return size
    return 0
