"""Tool calling's pure parts: the plan of a request's tools, the history written out as text, and
the parsing of an answer's calls, streamed in any chunking."""

from __future__ import annotations

import json
import random

import pytest

from r1.config import SamplingConfig, ServeConfig
from r1.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    chat_choice,
    chat_messages,
    parse_request,
    request_tools,
    tool_sampling,
)
from r1.serving.tools import TOOL_CALL_OPEN, ToolCallStream, parse_constrained, tool_plan, tools_prompt, with_tools_prompt

ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}
CITY = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CHAT = {"model": "r1-tiny", "messages": [{"role": "user", "content": "What is 2 + 3?"}]}


@pytest.mark.parametrize("tools, choice, param", [
    # a tool that is not a function, a function without a name, a name with a space, parameters that
    # are not a schema object, two functions of one name
    (["add"], None, "tools.0"),
    ([{"type": "function", "function": {}}], None, "tools.0.function.name"),
    ([{"type": "function", "function": {"name": "add two"}}], None, "tools.0.function.name"),
    ([{"type": "function", "function": {"name": "add\n"}}], None, "tools.0.function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], None, "tools.0.function.parameters"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], None, "tools.0.function.description"),
    ([ADD, ADD], None, "tools.1.function.name"),
    # a choice that needs tools, a choice of a function not offered, a choice in no known form
    (None, "required", "tool_choice"),
    ([ADD], {"type": "function", "function": {"name": "lookup"}}, "tool_choice.function.name"),
    ([ADD], "always", "tool_choice"),
    ([ADD], {"type": "function"}, "tool_choice"),
])
def test_bad_tools_are_400_naming_the_field(tools, choice, param):
    with pytest.raises(APIError) as error:
        tool_plan(tools, choice, None)
    assert (error.value.status, error.value.param) == (400, param)


def test_the_plan_of_each_choice():
    assert tool_plan(None, None, None) is None and tool_plan([ADD], "none", None) is None
    assert tool_plan([], "auto", None) is None  # "auto" with no tools: the neutral value, as before tools
    assert tool_plan([ADD], None, None).mode == "auto"  # tools given: auto by default, as OpenAI's
    named = tool_plan([ADD, CITY], {"type": "function", "function": {"name": "lookup"}}, False)
    assert (named.mode, named.name, named.parallel) == ("named", "lookup", False)
    assert named.schema() == CITY["function"]["parameters"]
    required = tool_plan([ADD, CITY], "required", False).schema()
    assert required["maxItems"] == 1 and [item["properties"]["name"] for item in required["items"]["anyOf"]] == [
        {"const": "add"}, {"const": "lookup"}]
    assert "maxItems" not in tool_plan([ADD], "required", True).schema()
    # A function without parameters takes an empty object.
    assert tool_plan([{"type": "function", "function": {"name": "now"}}], "auto", None).functions[0].parameters == {
        "type": "object", "properties": {}}


def test_constrained_schemas_compile():
    # What a "required" choice constrains the answer to must be a schema xgrammar compiles.
    import xgrammar

    for plan in (tool_plan([ADD, CITY], "required", False), tool_plan([ADD], "required", True)):
        xgrammar.Grammar.from_json_schema(json.dumps(plan.schema()), any_whitespace=False)


def _feed(plan, text: str, cuts: list[int]) -> tuple[list[str], str, list[dict]]:
    stream = ToolCallStream(plan)
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    shown = [stream.feed(piece) for piece in pieces]
    return shown, stream.finish(), stream.calls


@pytest.mark.parametrize("text, content, calls", [
    # an answer without calls: all of it is content, "<tool" and "<" included
    ("The sum is 5. Use <tool_ to call and a < b.", "The sum is 5. Use <tool_ to call and a < b.", []),
    # text before a call, then the call; two calls; a call with its arguments as a JSON string
    ("Let me add.\n<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 2, \"b\": 3}}\n</tool_call>",
     "Let me add.\n", [("add", {"a": 2, "b": 3})]),
    ("<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}</tool_call>\n<tool_call>{\"name\": "
     "\"lookup\", \"arguments\": \"{\\\"city\\\": \\\"Paris\\\"}\"}</tool_call>", "", [
         ("add", {"a": 1, "b": 2}), ("lookup", {"city": "Paris"})]),
    # a call whose closing tag the reply did not reach (it ended with the JSON)
    ("<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}", "", [("add", {"a": 1, "b": 2})]),
    # blocks that are not calls of an offered function: the text as it came, no call
    ("<tool_call>{\"name\": \"delete_all\", \"arguments\": {}}</tool_call>",
     "<tool_call>{\"name\": \"delete_all\", \"arguments\": {}}</tool_call>", []),
    ("ok <tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1,</tool_call>",
     "ok <tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1,</tool_call>", []),
    ("<tool_call>[1, 2]</tool_call>", "<tool_call>[1, 2]</tool_call>", []),
])
def test_auto_answers_in_any_chunking(text, content, calls):
    # Whatever the chunks, the content shown is the same, no piece of a call is shown before the
    # answer is parsed, and the calls are the same.
    plan = tool_plan([ADD, CITY], "auto", None)
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(12, len(text) - 1))))
        shown, rest, made = _feed(plan, text, cuts)
        if calls:
            assert "".join(shown) + rest == content and TOOL_CALL_OPEN not in "".join(shown)
        else:
            assert "".join(shown) + rest == text
        assert [(call["function"]["name"], json.loads(call["function"]["arguments"])) for call in made] == calls
        assert all(call["id"].startswith("call_") and call["type"] == "function" for call in made)


def test_one_call_without_parallel_tool_calls():
    text = ("<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}</tool_call><tool_call>{\"name\": "
            "\"add\", \"arguments\": {\"a\": 3, \"b\": 4}}</tool_call>")
    _, _, made = _feed(tool_plan([ADD], "auto", False), text, [7])
    assert [json.loads(call["function"]["arguments"]) for call in made] == [{"a": 1, "b": 2}]


def test_constrained_answers_are_held_and_parsed():
    named = tool_plan([ADD, CITY], {"type": "function", "function": {"name": "lookup"}}, None)
    shown, rest, made = _feed(named, '{"city": "Paris"}', [3, 9])
    assert shown == ["", "", ""] and rest == "" and made[0]["function"] == {"name": "lookup", "arguments": '{"city": "Paris"}'}
    required = tool_plan([ADD, CITY], "required", None)
    answer = '[{"name": "add", "arguments": {"a": 2, "b": 3}}, {"name": "lookup", "arguments": {"city": "Oslo"}}]'
    assert [c["function"]["name"] for c in parse_constrained(answer, required)] == ["add", "lookup"]
    # Cut off by max_tokens, or changed by the output screening: content, no call.
    for plan, text in ((named, '{"city": "Par'), (required, answer[:30]), (named, "内容包含敏感信息"),
                       (required, '[{"name": "nope", "arguments": {}}]'), (required, "[]")):
        shown, rest, made = _feed(plan, text, [2])
        assert "".join(shown) + rest == text and made == []


def test_history_with_calls_and_results_is_written_out_as_text():
    request = parse_request(ChatCompletionRequest, {**CHAT, "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Add 2 and 3, and look up Oslo."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}},
            {"id": "call_2", "type": "function", "function": {"name": "lookup", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rainy"}]},
    ]})
    messages = chat_messages(request, ServeConfig())
    # One message for each of the request's (so errors name them as sent), results as user turns.
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "user"]
    assert messages[2]["content"] == ('<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>\n'
                                      '<tool_call>\n{"name": "lookup", "arguments": {"city": "Oslo"}}\n</tool_call>')
    assert [m["content"] for m in messages[3:]] == ["<tool_response>\n5\n</tool_response>",
                                                   "<tool_response>\nrainy\n</tool_response>"]
    # The offered functions join the leading system text (or open one).
    offered = with_tools_prompt(messages, tools_prompt(tool_plan([ADD], "auto", None)))
    assert offered[0]["content"].startswith("Be brief.\n\nYou can call these functions:\n<tools>\n")
    assert json.dumps(ADD["function"]["parameters"]) in offered[0]["content"] and offered[1:] == messages[1:]
    assert with_tools_prompt(messages[1:], "T")[0] == {"role": "system", "content": "T"}
    assert with_tools_prompt(messages, "") is messages  # nothing offered: the messages as they are


@pytest.mark.parametrize("messages, param", [
    # a tool message answering no call of this request; one without its call's id; tool_calls on a user message
    ([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_9", "content": "5"}],
     "messages.1.tool_call_id"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "5"}], "messages.1"),
    ([{"role": "user", "content": "hi", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]}],
     "messages.0"),
    ([{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]}], "messages.0.tool_calls.0.function.arguments"),
])
def test_bad_tool_history_is_400_naming_the_message(messages, param):
    with pytest.raises(APIError) as error:
        chat_messages(parse_request(ChatCompletionRequest, {**CHAT, "messages": messages}), ServeConfig())
    assert (error.value.status, error.value.param) == (400, param)


@pytest.mark.parametrize("extra, param", [
    ({"logprobs": True}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"code_validation": True}, "code_validation"),
    ({"tool_choice": "required", "min_tokens": 3}, "min_tokens"),
    ({"tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "nonsense"}}}]}, "tools.0.function.parameters"),
])
def test_what_cannot_go_with_tools_is_400(extra, param):
    from r1.serving.protocol import sampling_for

    request = parse_request(ChatCompletionRequest, {**CHAT, "tools": [ADD], **extra})
    with pytest.raises(APIError) as error:
        tool_sampling(request, request_tools(request), sampling_for(request, ServeConfig()))
    assert (error.value.status, error.value.param) == (400, param)


def test_a_constrained_choice_needs_the_transformers_engine():
    # The GPU engines do no structured output: a constrained choice is refused naming tool_choice
    # (not response_format, which the request did not send); "auto" needs nothing of the engine.
    request = parse_request(ChatCompletionRequest, {**CHAT, "tools": [ADD], "tool_choice": "required"})
    with pytest.raises(APIError) as error:
        tool_sampling(request, request_tools(request), SamplingConfig(), "vllm")
    assert (error.value.param, "vllm" in error.value.message) == ("tool_choice", True)
    auto = parse_request(ChatCompletionRequest, {**CHAT, "tools": [ADD]})
    assert tool_sampling(auto, request_tools(auto), SamplingConfig(), "trtllm").json_schema is None


def test_constrained_choices_set_the_schema():
    request = parse_request(ChatCompletionRequest, {**CHAT, "tools": [ADD], "tool_choice": "required"})
    sampling = tool_sampling(request, request_tools(request), SamplingConfig())
    assert sampling.json_schema["type"] == "array"
    auto = parse_request(ChatCompletionRequest, {**CHAT, "tools": [ADD]})
    assert tool_sampling(auto, request_tools(auto), SamplingConfig()).json_schema is None


def test_a_choice_with_calls_has_no_content_unless_there_is_text():
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
    assert chat_choice(0, "", "", "tool_calls", tool_calls=[call])["message"]["content"] is None
    assert chat_choice(0, "", "Adding.", "tool_calls", tool_calls=[call])["message"]["content"] == "Adding."
    assert "tool_calls" not in chat_choice(0, "", "", "stop")["message"]
