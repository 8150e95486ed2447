"""The OpenAI wire format without a server: request decoding, validation and refusals (r1/serving/protocol.py)."""

from __future__ import annotations

import pytest

from r1.config import SEED_MAX, SEED_MIN, STRUCTURED_FIELDS, ServeConfig
from r1.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_messages,
    choice_seed,
    decode_json,
    parse_request,
    sampling_for,
    unsupported,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    "raw, param",
    [
        (b'{"messages": [{"content": "a\\ud800"}]}', "messages.0.content"),  # a lone high surrogate
        (b'{"a": {"b": ["x", "\\uDC00"]}}', "a.b.1"),  # a lone low surrogate, upper-case escape
        (b'{"metadata": {"\\ud800": 1}}', "metadata.'\\ud800'"),  # in a key
    ],
)
def test_lone_surrogates_are_400_naming_where(raw, param):
    with pytest.raises(APIError) as error:
        decode_json(raw)
    assert error.value.status == 400 and error.value.param == param


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"{nope", "Expecting property name"),
        (b'{"max_tokens": ' + b"9" * 5000 + b"}", "integer string conversion"),  # past Python's digit limit
        (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
        (b'{"a": "\xff"}', "utf-8"),  # not UTF-8
    ],
)
def test_bodies_json_cannot_take_are_400(raw, reason):
    with pytest.raises(APIError, match=reason) as error:
        decode_json(raw)
    assert error.value.status == 400 and error.value.code == "invalid_json"


def test_a_lone_surrogate_deep_inside_a_body_is_found_without_recursion():
    depth = 900  # within what json.loads accepts; a recursive walk on top of a deep stack would not be
    raw = b'{"a": ' + b"[" * depth + b'"\\udfff"' + b"]" * depth + b"}"
    with pytest.raises(APIError) as error:
        decode_json(raw)
    assert error.value.param == "a." + ".".join(["0"] * depth)


def test_surrogate_pairs_and_plain_escapes_decode():
    assert decode_json(b'{"t": "\\ud83d\\ude00 \\u4f60"}') == {"t": "\U0001f600 你"}


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"best_of": 3}, "best_of"),
        # the legacy form of tool calling (tools and tool_choice are served: tests/test_tools.py)
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": {"name": "f"}}, "functions"),
    ],
)
def test_chat_features_r1_does_not_implement_are_refused(extra, param):
    with pytest.raises(APIError) as error:
        unsupported(parse_request(ChatCompletionRequest, {**CHAT, **extra}))
    assert (error.value.status, error.value.param, error.value.code) == (400, param, "unsupported")


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"logprobs": False, "top_logprobs": 0, "logit_bias": {}, "frequency_penalty": 0, "presence_penalty": 0.0},
        {"best_of": 1, "tool_choice": "none", "tools": [{"type": "function", "function": {"name": "f"}}]},
        {"tool_choice": "auto", "response_format": {"type": "text"}, "functions": [], "function_call": "none"},
        {"parallel_tool_calls": True, "store": False, "metadata": {"k": "v"}},  # unknown fields: ignored
    ],
)
def test_neutral_values_pass(extra):
    unsupported(parse_request(ChatCompletionRequest, {**CHAT, **extra}))


@pytest.mark.parametrize("extra, param", [({"suffix": "end"}, "suffix")])
def test_completion_features_r1_does_not_implement_are_refused(extra, param):
    with pytest.raises(APIError) as error:
        unsupported(parse_request(CompletionRequest, {"model": "m", "prompt": "1 +", **extra}))
    assert error.value.param == param
    unsupported(parse_request(CompletionRequest, {"model": "m", "prompt": "1 +", "echo": False, "suffix": ""}))


@pytest.mark.parametrize(
    "kind, body, expected",
    [
        ("chat", {}, None),
        ("chat", {"logprobs": False, "top_logprobs": 0}, None),
        ("chat", {"logprobs": True}, 0),  # the chosen token's only
        ("chat", {"logprobs": True, "top_logprobs": 20}, 20),
        ("completion", {}, None),
        ("completion", {"logprobs": 0}, 0),
        ("completion", {"logprobs": 5}, 5),
        ("completion", {"logprobs": 2, "echo": True}, 2),
    ],
)
def test_logprobs_requests_become_sampling_logprobs(kind, body, expected):
    request = parse_request(ChatCompletionRequest, {**CHAT, **body}) if kind == "chat" else \
        parse_request(CompletionRequest, {"model": "m", "prompt": "1 +", **body})
    unsupported(request)
    sampling = sampling_for(request, ServeConfig())
    assert sampling.logprobs == expected
    # With echo the prompt's tokens get theirs too (lm-eval's loglikelihood requests).
    assert sampling.prompt_logprobs == (expected if body.get("echo") else None)


@pytest.mark.parametrize(
    "kind, body, param",
    [
        ("chat", {"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("chat", {"logprobs": 2}, "logprobs"),  # chat takes a boolean
        ("completion", {"logprobs": 21}, "logprobs"),
        ("completion", {"logprobs": True}, "logprobs"),  # completions take a number
    ],
)
def test_bad_logprobs_requests_are_400_naming_the_field(kind, body, param):
    with pytest.raises(APIError) as error:
        request = parse_request(ChatCompletionRequest, {**CHAT, **body}) if kind == "chat" else \
            parse_request(CompletionRequest, {"model": "m", "prompt": "1 +", **body})
        sampling_for(request, ServeConfig())
    assert (error.value.status, error.value.param) == (400, param), error.value.message


def test_vllm_sampling_extensions_reach_sampling():
    request = parse_request(CompletionRequest, {"model": "m", "prompt": "1 +", "min_p": 0.05, "min_tokens": 3,
                                                "ignore_eos": True, "stop_token_ids": [7, 2]})
    sampling = sampling_for(request, ServeConfig())
    assert (sampling.min_p, sampling.min_tokens, sampling.ignore_eos, sampling.stop_token_ids) == (0.05, 3, True, [7, 2])
    defaults = sampling_for(parse_request(ChatCompletionRequest, CHAT), ServeConfig())
    assert (defaults.min_p, defaults.min_tokens, defaults.ignore_eos, defaults.stop_token_ids) == (0.0, 0, False, [])


@pytest.mark.parametrize("top_k, expected", [(-1, 0), (0, 0), (5, 5)])
def test_top_k_minus_one_means_no_top_k_as_in_vllm(top_k, expected):
    sampling = sampling_for(parse_request(ChatCompletionRequest, {**CHAT, "top_k": top_k}), ServeConfig())
    assert sampling.top_k == expected


@pytest.mark.parametrize(
    "body, param",
    [
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"stop_token_ids": [3, -1]}, "stop_token_ids.1"),
        ({"stop_token_ids": list(range(1025))}, "stop_token_ids"),
    ],
)
def test_bad_vllm_sampling_extensions_are_400_naming_the_field(body, param):
    with pytest.raises(APIError) as error:
        sampling_for(parse_request(ChatCompletionRequest, {**CHAT, **body}), ServeConfig())
    assert (error.value.status, error.value.param) == (400, param), error.value.message


@pytest.mark.parametrize("kind, response_format, schema", [
    ("chat", None, None),
    ("chat", {"type": "text"}, None),
    ("chat", {"type": "json_object"}, {"type": "object"}),
    ("completion", {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "integer"}, "strict": True}},
     {"type": "integer"}),
])
def test_response_format_becomes_a_json_schema(kind, response_format, schema):
    extra = {} if response_format is None else {"response_format": response_format}
    request = parse_request(ChatCompletionRequest, {**CHAT, **extra}) if kind == "chat" else \
        parse_request(CompletionRequest, {"model": "m", "prompt": "1 +", **extra})
    unsupported(request)
    assert sampling_for(request, ServeConfig()).json_schema == schema


@pytest.mark.parametrize("fields, expected", [
    # vLLM's guided decoding, each spelling, to the SamplingConfig field the engine constrains with.
    ({"guided_json": {"type": "integer"}}, {"json_schema": {"type": "integer"}}),
    ({"guided_json": '{"type": "integer"}'}, {"json_schema": {"type": "integer"}}),  # a schema's JSON text
    ({"guided_regex": "[0-9]+"}, {"regex": "[0-9]+"}),
    ({"guided_choice": ["yes", "否"]}, {"choice": ["yes", "否"]}),
    ({"guided_grammar": 'root ::= "a" | "b"'}, {"grammar": 'root ::= "a" | "b"'}),
    ({"structured_outputs": {"json": {"type": "integer"}}}, {"json_schema": {"type": "integer"}}),
    ({"structured_outputs": {"regex": "x+", "disable_fallback": True}}, {"regex": "x+"}),  # an option taken
    ({"structured_outputs": {"json_object": True}}, {"json_schema": {"type": "object"}}),
    ({"structured_outputs": {"choice": None, "grammar": 'root ::= "a"'}}, {"grammar": 'root ::= "a"'}),
    ({"guided_choice": ["a"], "guided_decoding_backend": "xgrammar", "response_format": {"type": "text"}},
     {"choice": ["a"]}),
    ({}, {}),
])
def test_guided_decoding_fields_become_the_constraint(fields, expected):
    for request in (parse_request(ChatCompletionRequest, {**CHAT, **fields}),
                    parse_request(CompletionRequest, {"model": "m", "prompt": "1 +", **fields})):
        unsupported(request)
        sampling = sampling_for(request, ServeConfig())
        assert {kind: getattr(sampling, kind) for kind in STRUCTURED_FIELDS if getattr(sampling, kind) is not None} \
            == expected


@pytest.mark.parametrize("fields, param", [
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs.regex"),
    ({"guided_json": [1]}, "guided_json"),
    ({"guided_json": '"a string"'}, "guided_json"),
    ({"guided_regex": ""}, "guided_regex"),
    ({"guided_regex": "a" * 70000}, "guided_regex"),
    ({"guided_choice": ["a", 1]}, "guided_choice"),
    ({"guided_choice": ["a"] * 1025}, "guided_choice"),
    ({"guided_grammar": "root ::= "}, "guided_grammar"),
    ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs.json_object"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
])
def test_bad_guides_are_400_naming_the_field(fields, param):
    with pytest.raises(APIError) as error:
        sampling_for(parse_request(ChatCompletionRequest, {**CHAT, **fields}), ServeConfig())
    assert (error.value.status, error.value.param) == (400, param), error.value.message


def test_guides_are_refused_naming_the_field_on_an_engine_without_them():
    config = ServeConfig.model_validate({"engine": {"engine": "vllm"}})
    for fields, param in (({"guided_choice": ["a"]}, "guided_choice"), ({"response_format": {"type": "json_object"}},
                                                                        "response_format")):
        with pytest.raises(APIError, match="not supported with engine.name: vllm") as error:
            sampling_for(parse_request(ChatCompletionRequest, {**CHAT, **fields}), config)
        assert error.value.param == param


@pytest.mark.parametrize("response_format, param", [
    ({"type": "json_schema", "json_schema": {"name": "a"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema"}, "response_format.json_schema.schema"),
    ({"type": "yaml"}, "response_format.type"),
])
def test_bad_response_formats_are_400_naming_the_field(response_format, param):
    with pytest.raises(APIError) as error:
        sampling_for(parse_request(ChatCompletionRequest, {**CHAT, "response_format": response_format}), ServeConfig())
    assert (error.value.status, error.value.param) == (400, param)


def test_logprob_entries_are_released_only_for_text_the_screening_passed_unchanged():
    from r1.serving.logprobs import LogprobLedger

    ledger = LogprobLedger()
    entry = lambda token, chars: (token, -0.5, (), chars)  # noqa: E731
    # An item of two tokens, text [0, 2) and [2, 4); a token ending inside a character (no text of
    # its own, at 4) and the token completing it, [4, 7); then [7, 12).
    ledger.add([entry(1, 2), entry(2, 2)], 4)
    ledger.add([entry(3, 0), entry(4, 3)], 3)
    ledger.add([entry(5, 5)], 5)
    # Nothing screened yet: nothing released. Then the first token's text passed.
    assert ledger.release(0, [], False, False) == []
    assert ledger.release(3, [], False, False) == [entry(1, 2)]
    assert ledger.release(4, [], False, False) == [entry(2, 2)]
    # The empty token waits for the text after it; that text was redacted: both are dropped; a
    # token of clean text in the same item as a redacted one keeps its entry.
    assert ledger.release(4, [], False, False) == []
    assert ledger.release(9, [(4, 6)], False, False) == []
    assert ledger.release(12, [(4, 6)], False, False) == [entry(5, 5)]
    # At the end everything left is decided: an end-of-sequence token (no text), and text flushed
    # without a token after it (an abort's held text) does not shift anything.
    ledger.add([entry(6, 2), entry(7, 0)], 5)
    assert ledger.release(14, [(4, 6)], False, final=True) == [entry(6, 2), entry(7, 0)]
    # A blocked stream releases nothing more.
    ledger.add([entry(8, 3)], 3)
    assert ledger.release(None, [], True, False) == []
    # Where each token's text lies unknown (split=False): all count as the whole text.
    blind = LogprobLedger()
    blind.add([entry(1, 0), entry(2, 0)], 6, split=False)
    blind.add([entry(3, 1)], 1)
    assert blind.release(7, [(4, 5)], False, False) == [entry(3, 1)]
    blind.add([entry(4, 0), entry(5, 0)], 3, split=False)
    assert blind.release(None, [], False, False) == [entry(4, 0), entry(5, 0)]
    # No screening (None): everything at once, a token without text included.
    open_ledger = LogprobLedger()
    open_ledger.add([entry(1, 2), entry(2, 0)], 2)
    assert open_ledger.release(None, [], False, False) == [entry(1, 2), entry(2, 0)]


@pytest.mark.parametrize("profile, text", [
    ("letters", "5 + 17 = 22\n</think>\nThe answer is 22."),
    ("default", "卡号 4111 1111 1111 1111，密码是 abc123xyz，验证码 884213。好的 ok"),
])
def test_the_ledger_with_a_real_stream_releases_exactly_the_unchanged_tokens(profile, text):
    # The serving path's pieces together, in-process: a reply cut into tokens (some with no text of
    # their own) and the tokens into stream items at random; the items go through a SafetyStream and
    # the ledger. Whatever the cuts, the released entries are those of the tokens whose text lies
    # outside every redacted finding of `check` on the whole reply (a token without text counts
    # with the character after it).
    import random

    from r1.config import SafetyConfig, SafetyRuleConfig
    from r1.safety import SafetyFilter
    from r1.serving.logprobs import LogprobLedger

    rules = [SafetyRuleConfig(id="letters", kind="regex", pattern="[a-z]{2}", input="off", output="redact"),
             SafetyRuleConfig(id="equals_digit", kind="regex", pattern=r"= \d", input="off", output="redact")]
    safety = SafetyFilter(SafetyConfig(profile="strict", rules=rules)) if profile == "letters" else \
        SafetyFilter.from_profile("default")
    findings = [f for f in safety.check(text, "output").findings if f.action == "redact"]
    assert findings
    rng = random.Random(7)
    for _ in range(300):
        chars, position = [], 0
        while position < len(text):
            size = rng.choice([0, 1, 1, 2, 3])
            chars.append(min(size, len(text) - position))
            position += chars[-1]
        entries = [(index, -1.0, (), size) for index, size in enumerate(chars)]
        expected, start = [], 0
        for entry in entries:
            end = start + entry[3]
            if not any(f.start < max(end, start + 1) and start < f.end for f in findings):
                expected.append(entry)
            start = end
        stream, ledger, released, fed, index = safety.stream("output"), LogprobLedger(), [], 0, 0
        while index < len(entries):
            item = entries[index : index + rng.randint(1, 5)]
            index += len(item)
            piece = text[fed : fed + sum(entry[3] for entry in item)]
            fed += len(piece)
            ledger.add(item, len(piece))
            final = index == len(entries)
            stream.feed(piece)
            if final:
                stream.flush()
            screened = fed if final else stream.to_state()["emitted_chars"]
            released += ledger.release(screened, stream.withheld, stream.action == "block", final)
        assert released == expected, chars


def test_a_responses_request_reads_as_the_chat_request_it_stands_for():
    from r1.serving.responses import ResponsesRequest, chat_request

    wanted = parse_request(ResponsesRequest, {
        "model": "m", "instructions": "be brief", "max_output_tokens": 7, "temperature": 0.2, "stream": True,
        "input": [{"role": "developer", "content": "x"},
                  {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"},
                                                                  {"type": "input_text", "text": "b"}]}],
        "store": True, "reasoning": {"effort": "low"}, "metadata": {"k": "v"}})
    chat = chat_request(wanted)
    assert [(m.role, m.text()) for m in chat.messages] == [("system", "be brief"), ("developer", "x"), ("user", "a\nb")]
    assert (chat.max_tokens, chat.temperature, chat.stream) == (7, 0.2, True)
    one = chat_request(parse_request(ResponsesRequest, {"model": "m", "input": "hello"}))
    assert [(m.role, m.text()) for m in one.messages] == [("user", "hello")] and one.max_tokens is None


@pytest.mark.parametrize("instructions, input_, chat_param, param", [
    (None, "hi", "messages.0.content", "input"),
    ("be brief", "hi", "messages.0.content", "instructions"),
    ("be brief", "hi", "messages.1.content", "input"),
    ("be brief", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages.2.content", "input.1.content"),
    (None, [{"role": "user", "content": "a"}], "messages", "input"),
    (None, "hi", "max_tokens", "max_output_tokens"),
    (None, "hi", "temperature", "temperature"),
])
def test_chat_errors_name_the_responses_field(instructions, input_, chat_param, param):
    from r1.serving.responses import ResponsesRequest, responses_error

    wanted = parse_request(ResponsesRequest, {"model": "m", "instructions": instructions, "input": input_})
    error = responses_error(APIError(400, "max_tokens=9 is too many", param=chat_param, code="x"), wanted)
    assert (error.status, error.param, error.code) == (400, param, "x")
    assert "max_output_tokens=9" in error.message


def test_response_events_stream_the_items_in_order_and_end_with_the_status():
    import json as json_module

    from r1.serving.responses import ResponseEvents, ResponsesRequest

    def parse(raw: bytes) -> list[dict]:
        return [json_module.loads(block.split("data: ", 1)[1]) for block in raw.decode().split("\n\n") if block]

    events = ResponseEvents(parse_request(ResponsesRequest, {"model": "m", "input": "hi"}), "m")
    stream = parse(events.opening() + events.delta("thinking", "") + events.delta(" more", "4") + events.delta("", "2")
                   + events.closing("content_filter", 5, 7, 3))
    assert [e["sequence_number"] for e in stream] == list(range(len(stream)))
    assert [e["type"] for e in stream] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.incomplete"]
    final = stream[-1]["response"]
    assert final["incomplete_details"] == {"reason": "content_filter"}
    assert [item["type"] for item in final["output"]] == ["reasoning", "message"]
    assert final["output"][0]["content"][0]["text"] == "thinking more" and final["output"][1]["content"][0]["text"] == "42"
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] == 3 and final["usage"]["total_tokens"] == 12
    # No answer text at all: the message item still comes, empty; "stop" completes.
    quiet = ResponseEvents(parse_request(ResponsesRequest, {"model": "m", "input": "hi"}), "m")
    ending = parse(quiet.opening() + quiet.closing("stop", 1, 1, 0))
    assert ending[-1]["type"] == "response.completed" and ending[-1]["response"]["output"][0]["content"][0]["text"] == ""


def test_logprobs_wire_formats():
    from r1.serving.logprobs import chat_logprobs, completion_logprobs, token_id_name

    texts = {1: "Hi", 2: " 你", 3: "!"}.__getitem__
    entries = [(1, -0.25, ((1, -0.25), (3, -2.0)), 2), (2, -1.5, ((3, -0.5), (2, -1.5)), 2), (3, float("-inf"), (), 1)]
    chat = chat_logprobs(entries, texts)["content"]
    assert chat[1] == {"token": " 你", "logprob": -1.5, "bytes": list(" 你".encode()),
                       "top_logprobs": [{"token": "!", "logprob": -0.5, "bytes": [33]},
                                        {"token": " 你", "logprob": -1.5, "bytes": list(" 你".encode())}]}
    assert chat[2]["logprob"] == -9999.0 and chat[2]["top_logprobs"] == []  # JSON has no -Infinity
    legacy, end = completion_logprobs(entries, texts, offset=10)
    assert legacy["tokens"] == ["Hi", " 你", "!"] and legacy["token_logprobs"] == [-0.25, -1.5, -9999.0]
    assert legacy["text_offset"] == [10, 12, 14] and end == 15
    # The alternatives and, always, the chosen token.
    assert legacy["top_logprobs"] == [{"Hi": -0.25, "!": -2.0}, {"!": -0.5, " 你": -1.5}, {"!": -9999.0}]
    # An echoed prompt's first token: nothing before it, null logprob and alternatives.
    echoed, _ = completion_logprobs([(1, None, (), 2), *entries[:1]], texts)
    assert echoed["token_logprobs"] == [None, -0.25] and echoed["top_logprobs"][0] is None
    # vLLM's return_tokens_as_token_ids: tokens named by id; bytes and offsets still the text's.
    named = chat_logprobs(entries, texts, token_id_name)["content"][1]
    assert (named["token"], named["bytes"], [top["token"] for top in named["top_logprobs"]]) == (
        "token_id:2", list(" 你".encode()), ["token_id:3", "token_id:2"])
    legacy, end = completion_logprobs(entries, texts, offset=10, name_of=token_id_name)
    assert legacy["tokens"] == ["token_id:1", "token_id:2", "token_id:3"] and legacy["text_offset"] == [10, 12, 14]
    assert legacy["top_logprobs"][0] == {"token_id:1": -0.25, "token_id:3": -2.0} and end == 15


@pytest.mark.parametrize(
    "prompt, message",
    [
        (["a", [1]], "not a mix"),
        ([[1, 2], []], "empty prompt"),
        (["a", ""], "empty string"),
        ([4, -1], "token ids must be >= 0"),
        ([[1, 2], [3, -4]], "token ids must be >= 0"),
        ({"x": 1}, "valid string"),
    ],
)
def test_prompt_errors_name_the_prompt_field(prompt, message):
    with pytest.raises(APIError, match=message) as error:
        parse_request(CompletionRequest, {"model": "m", "prompt": prompt})
    assert error.value.param == "prompt"


def test_frequency_and_presence_penalties_reach_sampling():
    from r1.config import ServeConfig
    from r1.serving.protocol import sampling_for

    request = parse_request(ChatCompletionRequest, {**CHAT, "frequency_penalty": 0.5, "presence_penalty": -1})
    unsupported(request)  # implemented, so not refused
    sampling = sampling_for(request, ServeConfig())
    assert (sampling.frequency_penalty, sampling.presence_penalty) == (0.5, -1.0)
    for field, value in (("frequency_penalty", 2.5), ("presence_penalty", -3)):
        with pytest.raises(APIError) as error:
            parse_request(ChatCompletionRequest, {**CHAT, field: value})
        assert error.value.param == field


def test_logit_bias_reaches_sampling_with_token_ids():
    from r1.config import ServeConfig
    from r1.serving.protocol import sampling_for

    request = parse_request(ChatCompletionRequest, {**CHAT, "logit_bias": {"5": -100, "17": 2.5}})
    unsupported(request)
    assert sampling_for(request, ServeConfig()).logit_bias == {5: -100.0, 17: 2.5}
    for bias in ({"five": 1}, {"5": 101}, {"-3": 1}, {str(i): 1 for i in range(1025)}):
        with pytest.raises(APIError) as error:
            sampling_for(parse_request(ChatCompletionRequest, {**CHAT, "logit_bias": bias}), ServeConfig())
        assert error.value.status == 400 and error.value.param.startswith("logit_bias"), bias


def test_union_member_names_stay_out_of_the_param():
    with pytest.raises(APIError) as error:
        parse_request(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": 5}]})
    assert error.value.param == "messages.0.content"


@pytest.mark.parametrize("seed", [SEED_MAX + 1, SEED_MIN - 1, 2**70])
def test_seeds_beyond_64_bits_are_400(seed):
    with pytest.raises(APIError) as error:
        parse_request(ChatCompletionRequest, {**CHAT, "seed": seed})
    assert error.value.param == "seed"


@pytest.mark.parametrize(
    "seed, index, expected",
    [(None, 3, None), (7, 0, 7), (7, 2, 9), (-5, 1, -4), (SEED_MAX, 1, SEED_MIN), (SEED_MAX - 1, 3, SEED_MIN + 1)],
)
def test_choice_seeds_stay_within_64_bits(seed, index, expected):
    assert choice_seed(seed, index) == expected


def test_text_content_parts_are_joined_by_newlines():
    request = parse_request(ChatCompletionRequest, {"model": "m", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "part A"}, {"type": "text", "text": "part B"}]},
    ]})
    assert chat_messages(request, ServeConfig())[1] == {"role": "user", "content": "part A\npart B"}


@pytest.mark.parametrize(
    "part, code",
    [
        ({"type": "image_url", "image_url": {"url": "http://x"}}, "unsupported"),  # not text
        ({"text": "no type"}, "unsupported"),
        ({"type": "text"}, "invalid_value"),  # a text part without its text
        ({"type": "text", "text": 5}, "invalid_value"),
    ],
)
def test_content_parts_other_than_text_are_400_naming_the_part(part, code):
    request = parse_request(ChatCompletionRequest, {"model": "m", "messages": [
        {"role": "user", "content": "first"},
        {"role": "user", "content": [{"type": "text", "text": "ok"}, part]},
    ]})
    with pytest.raises(APIError) as error:
        chat_messages(request, ServeConfig())
    assert (error.value.status, error.value.param, error.value.code) == (400, "messages.1.content.1", code)


@pytest.mark.parametrize("field, value, cls, param", [
    ("stream", "no", CompletionRequest, "stream"),  # lax parsing read "no" as false, "yes" and 1 as true
    ("stream", 1, ChatCompletionRequest, "stream"),
    ("echo", "yes", CompletionRequest, "echo"),
    ("code_validation", "yes", ChatCompletionRequest, "code_validation"),
    ("stream_options", {"include_usage": "true"}, ChatCompletionRequest, "stream_options.include_usage"),
])
def test_switches_take_json_booleans_only(field, value, cls, param):
    body = {"model": "m", "prompt": "p"} if cls is CompletionRequest else {"model": "m", "messages": [{"role": "user", "content": "q"}]}
    with pytest.raises(APIError) as error:
        parse_request(cls, {**body, field: value})
    assert error.value.status == 400 and error.value.param == param
    assert parse_request(cls, {**body, "stream": True}).stream is True


@pytest.mark.parametrize("cls, body, param", [
    # booleans and strings are not numbers (lax parsing read true as 1.0 and "5" as 5)
    (CompletionRequest, {"model": "m", "prompt": "x", "temperature": True}, "temperature"),
    (CompletionRequest, {"model": "m", "prompt": "x", "n": True}, "n"),
    (CompletionRequest, {"model": "m", "prompt": "x", "max_tokens": "5"}, "max_tokens"),
    (CompletionRequest, {"model": "m", "prompt": "x", "seed": "1"}, "seed"),
    # a token id true is not token 1
    (CompletionRequest, {"model": "m", "prompt": [True]}, "prompt"),
    # a user message needs content (OpenAI refuses these too)
    (ChatCompletionRequest, {"model": "m", "messages": [{"role": "user"}]}, "messages.0"),
    (ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": None}]}, "messages.0"),
    (ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": []}]}, "messages.0"),
])
def test_fields_take_their_json_type_only(cls, body, param):
    with pytest.raises(APIError) as error:
        parse_request(cls, body)
    assert error.value.status == 400 and error.value.param.startswith(param), error.value.message


def test_integers_are_numbers_and_an_assistant_may_have_no_content():
    request = parse_request(ChatCompletionRequest, {"model": "m", "temperature": 1, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "again"}]})
    assert request.temperature == 1.0


def test_a_stop_string_longer_than_the_limit_is_400_naming_stop():
    # The detokenizer checks every stop string's prefixes at every token: their length is bounded.
    request = parse_request(CompletionRequest, {"model": "m", "prompt": "x", "stop": ["y" * 257]})
    with pytest.raises(APIError) as error:
        sampling_for(request, ServeConfig())
    assert error.value.status == 400 and error.value.param == "stop" and "at most 256" in error.value.message


def test_completion_prompts_one_or_a_batch():
    from r1.config import ServeConfig
    from r1.serving.protocol import completion_prompts

    def prompts(prompt, n=1):
        return completion_prompts(parse_request(CompletionRequest, {"model": "m", "prompt": prompt, "n": n}),
                                  ServeConfig(max_n=4))

    assert prompts("1 +") == (["1 +"], ["prompt"])
    assert prompts([5, 6]) == ([[5, 6]], ["prompt"])
    assert prompts(["a", "b"], n=2) == (["a", "b"], ["prompt.0", "prompt.1"])
    assert prompts([[5], [6, 7]]) == ([[5], [6, 7]], ["prompt.0", "prompt.1"])
    with pytest.raises(APIError, match="3 prompts with n=2 make 6 choices") as error:
        prompts(["a", "b", "c"], n=2)
    assert error.value.param == "prompt" and error.value.status == 400


def test_tokenize_requests():
    from r1.config import ModelConfig, ServeConfig
    from r1.model import load_tokenizer
    from r1.serving.protocol import DetokenizeRequest, TokenizeRequest, tokenize

    tokenizer = load_tokenizer(ModelConfig())
    prompt = parse_request(TokenizeRequest, {"model": "m", "prompt": "1 + 1 ="})
    assert tokenize(tokenizer, prompt, ServeConfig()) == tokenizer.encode("1 + 1 =", add_special_tokens=True)
    chat = parse_request(TokenizeRequest, {"model": "m", "messages": [{"role": "developer", "content": "hi"}]})
    text = tokenizer.apply_chat_template([{"role": "system", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert tokenize(tokenizer, chat, ServeConfig()) == tokenizer.encode(text, add_special_tokens=False)
    # A check across fields has no single field to name: the message says what to send.
    for body in ({"model": "m"}, {"model": "m", "prompt": "x", "messages": [{"role": "user", "content": "y"}]}):
        with pytest.raises(APIError, match="either prompt") as error:
            parse_request(TokenizeRequest, body)
        assert error.value.param is None and error.value.status == 400
    with pytest.raises(APIError) as error:
        parse_request(DetokenizeRequest, {"model": "m", "tokens": [1, True]})
    assert error.value.param == "tokens.1"


def test_responses_function_tools_read_as_chat_tools_and_calls_come_as_items():
    import json as json_module

    from r1.serving.responses import ResponseEvents, ResponsesRequest, chat_request, responses_error

    call = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "add", "arguments": "{\"a\": 1}",
            "status": "completed"}
    wanted = parse_request(ResponsesRequest, {
        "model": "m", "tools": [{"type": "function", "name": "add", "parameters": {"type": "object"}}],
        "tool_choice": {"type": "function", "name": "add"}, "parallel_tool_calls": False,
        "input": [{"role": "user", "content": "add"},
                  {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "t"}]},
                  call, {**call, "call_id": "call_2"},
                  {"type": "function_call_output", "call_id": "call_1", "output": "1"},
                  {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "2"}]}]})
    chat = chat_request(wanted)
    assert chat.tools == [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    assert chat.tool_choice == {"type": "function", "function": {"name": "add"}} and chat.parallel_tool_calls is False
    # The reasoning item is dropped; the two calls are one assistant message; each output a tool message.
    assert [m.role for m in chat.messages] == ["user", "assistant", "tool", "tool"]
    assert [c.id for c in chat.messages[1].tool_calls] == ["call_1", "call_2"]
    assert [(m.tool_call_id, m.text()) for m in chat.messages[2:]] == [("call_1", "1"), ("call_2", "2")]
    # Chat's field names back in the Responses request's words.
    for chat_param, param in (("messages.3.tool_call_id", "input.5.call_id"), ("messages.2.content", "input.4.output"),
                              ("messages.1.content", "input.2"), ("tools.0.function.parameters", "tools.0.parameters"),
                              ("tool_choice.function.name", "tool_choice.name")):
        assert responses_error(APIError(400, "x", param=chat_param), wanted).param == param
    # Calls as output items: none streamed as a message; arguments whole in one delta.
    events = ResponseEvents(wanted, "m")
    made = [{"id": "call_9", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2}"}}]
    raw = events.opening() + events.delta("thinking", "") + events.function_calls(made) + events.closing("tool_calls", 3, 4, 1)
    stream = [json_module.loads(block.split("data: ", 1)[1]) for block in raw.decode().split("\n\n") if block]
    assert [e["type"] for e in stream][2:] == [
        "response.output_item.added", "response.reasoning_text.delta", "response.reasoning_text.done",
        "response.output_item.done", "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    final = stream[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["reasoning", "function_call"]
    assert final["output"][1] | {"id": None} == {"type": "function_call", "id": None, "call_id": "call_9", "name": "add",
                                                "arguments": "{\"a\": 2}", "status": "completed"}
    assert final["tools"] == wanted.tools and final["parallel_tool_calls"] is False
    whole = ResponseEvents(wanted, "m").finished("", "", "tool_calls", 1, 1, 0, made)
    assert [item["type"] for item in whole["output"]] == ["function_call"] and whole["status"] == "completed"


def test_input_items_come_from_the_screened_messages():
    # What GET /v1/responses/{id}/input_items lists is built from the chat messages as the input
    # screening returned them (a redaction shows), one item per input item, instructions left out.
    from r1.serving.responses import ResponsesRequest, chat_request, input_items

    wanted = ResponsesRequest.model_validate({"model": "m", "instructions": "Be brief.", "input": [
        {"role": "user", "content": "my card 4111 1111 1111 1111"},
        {"type": "reasoning", "id": "rs_1", "summary": []},  # dropped, as the prompt drops it
        {"type": "function_call", "call_id": "c1", "name": "add", "arguments": '{"a": 1}'},
        {"type": "function_call", "call_id": "c2", "name": "add", "arguments": '{"a": 2}'},
        {"type": "function_call_output", "call_id": "c1", "output": "1"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "2"}]}]})
    messages = chat_messages(chat_request(wanted), ServeConfig())
    screened = [{**m, "content": m["content"].replace("4111 1111 1111 1111", "[已隐藏]")} for m in messages]
    items = input_items(wanted, screened)
    assert [(item["type"], item.get("call_id")) for item in items] == [
        ("message", None), ("function_call", "c1"), ("function_call", "c2"), ("function_call_output", "c1"),
        ("function_call_output", "c2")]
    assert items[0]["content"] == [{"type": "input_text", "text": "my card [已隐藏]"}]
    assert [(item["name"], item["arguments"]) for item in items[1:3]] == [("add", '{"a": 1}'), ("add", '{"a": 2}')]
    assert [item["output"] for item in items[3:]] == ["1", "2"]
    assert all(item["status"] == "completed" for item in items) and len({item["id"] for item in items}) == 5
    # A call whose written block the screening changed keeps the block's text as its arguments.
    broken = [*screened[:2], {**screened[2], "content": screened[2]["content"].replace('"a": 2', '"a": [已隐藏')}]
    assert input_items(wanted, broken + screened[3:])[2]["arguments"].endswith('"a": [已隐藏}}')


def test_input_item_pages_and_the_stored_format():
    from r1.serving.responses import page_of_items, read_stored_response, stored_response_data

    items = [{"id": f"msg-{n}"} for n in range(5)]
    ids = lambda page: [item["id"] for item in page["data"]]  # noqa: E731
    assert ids(page_of_items(items, 20, "desc", None, None)) == ["msg-4", "msg-3", "msg-2", "msg-1", "msg-0"]
    first = page_of_items(items, 2, "asc", None, None)
    assert (ids(first), first["first_id"], first["last_id"], first["has_more"]) == (["msg-0", "msg-1"], "msg-0", "msg-1", True)
    assert ids(page_of_items(items, 2, "asc", "msg-3", None)) == ["msg-4"]
    assert not page_of_items(items, 2, "asc", "msg-2", None)["has_more"]
    assert ids(page_of_items(items, 20, "desc", None, "msg-1")) == ["msg-4", "msg-3", "msg-2"]
    assert ids(page_of_items(items, 20, "asc", "msg-0", "msg-3")) == ["msg-1", "msg-2"]
    empty = page_of_items([], 20, "desc", None, None)
    assert (empty["data"], empty["first_id"], empty["last_id"], empty["has_more"]) == ([], None, None, False)
    with pytest.raises(APIError) as error:
        page_of_items(items, 20, "desc", None, "msg-9")
    assert (error.value.status, error.value.param) == (400, "before")
    # The stored data: object and items; the items dropped past the size limit; the object alone
    # (what an earlier revision stored) reads as a response without items.
    response = {"id": "resp-1", "object": "response", "output": []}
    assert read_stored_response(stored_response_data(response, items, 10_000)) == (response, items)
    assert read_stored_response(stored_response_data(response, items, 100)) == (response, None)
    assert read_stored_response(__import__("json").dumps(response)) == (response, None)
