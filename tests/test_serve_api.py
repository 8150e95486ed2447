"""The OpenAI-compatible API over real Ray Serve and real HTTP, with the stock `openai` client.

One module-scoped Ray + Serve instance hosts four applications of the real r1-tiny model: the
default one (whole model per replica), a sharded one (pipeline_stages=2, ModelShard actors), one
with the strict safety profile and one whose safety filter can never answer. Every Ray worker
traces into one JSON-lines file (R1_TRACE_FILE), so the tests can follow a request across processes.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest
import torch
from ray import serve

from cluster.serve.app import build_app
from r1.config import ModelConfig, SamplingConfig
from r1.model import load_tokenizer
from r1.reasoning import split_reasoning
from r1.trace_file import read_spans
from tests.lora_helpers import write_adapter
from tests.serve_helpers import answer_at_once, free_port, ray_serve, small_deployment, wait_http_ok

KEY = "test-key-1"
OTHER_KEY = "test-key-2"
MODEL = "r1-tiny"
ADAPTER = "tiny-lora"  # a LoRA adapter the main app serves beside MODEL
SMALL_SAFETY = small_deployment(min_replicas=1, max_replicas=2, num_cpus=0.02)
LETTERS_RULE = {"id": "test_letters", "kind": "regex", "pattern": "[a-z]{2}", "input": "off", "output": "redact"}
# Fires where an output digit follows "= ": r1-tiny continues "23 + 45 =" with " 68", so only output
# screening that reads the prompt's end sees it.
EQUALS_RULE = {"id": "test_equals_digit", "kind": "regex", "pattern": r"= \d", "input": "off", "output": "redact"}
MESSAGES = [{"role": "user", "content": "Mia has 23 apples. She buys 45 more. How many apples does she have now?"}]
ADD_TOOL = {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}}
WEATHER_TOOL = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["paris", "tokyo"]}}, "required": ["city"],
    "additionalProperties": False}}}
ADD_CHOICE = {"type": "function", "function": {"name": "add"}}


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    return tmp_path_factory.mktemp("trace") / "spans.jsonl"


@pytest.fixture(scope="module")
def metrics_port():
    return free_port()


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory):
    """A LoRA adapter of r1-tiny the main app serves as ADAPTER, and the model with it merged."""
    path = tmp_path_factory.mktemp("lora") / "adapter"
    return str(path), write_adapter(path, seed=7, targets=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def server(tmp_path_factory, trace_file, metrics_port, lora_adapter):
    port = free_port()
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# test keys\n{KEY}\n{OTHER_KEY}\n")
    common = {
        "api_keys_file": str(keys),
        "max_request_bytes": 4096,
        "max_n": 4,  # a batch of two prompts with n=2 fits; n=9 does not
        "request_timeout_s": 300,
        "ingress": small_deployment(num_cpus=0.05),
        "engine": {"max_num_seqs": 4, "max_queued_requests": 2},
        # Generous deadlines: on 2 shared cores a new SessionStore actor process can take a while to start.
        # Two SessionStore partitions rather than four: two processes fewer (tests/test_sessions_http.py covers them).
        "sessions": {"backend_url": f"sqlite:///{tmp_path_factory.mktemp('sessions')}/sessions.db", "call_timeout_s": 120,
                     "num_partitions": 2},
        # Generous deadline: 2 shared cores, the filter must not time out by accident.
        "safety": {"timeout_s": 20, "deployment": SMALL_SAFETY},
        # Four apps share ray.init(num_cpus=2): keep every replica's CPU share small so all fit.
        # The program's own budget (harness and tests; starting the sandbox has start_timeout_s):
        # more than the default 5 s, as the suite's other xdist worker saturates both cores.
        "code_validator": {"num_cpus": 0.05, "codecheck": {"timeout_s": 20.0}},
    }
    with ray_serve(port, env_vars={"R1_TRACE_FILE": str(trace_file)}, metrics_port=metrics_port):
        one_llm = small_deployment(min_replicas=1, max_replicas=1, num_cpus=0.05)
        small = {**common, "llm": one_llm, "ingress": one_llm, "code_validator": None, "sessions": {"enabled": False}}
        # The four apps deploy together (their replicas start side by side, not one app after another).
        serve.run_many([
            serve.RunTarget(build_app({**common, "llm": small_deployment(num_cpus=0.1),
                                       "engine": {**common["engine"], "lora_adapters": {ADAPTER: lora_adapter[0]}}}),
                            name="main", route_prefix="/"),
            # One replica of each and no sandbox: the sharded app's tests need the model path only.
            # Serve checks its LLM server's health rarely: the dead-shard test calls check_health
            # itself, and a replacement started by Serve's own check would race that test's requests.
            serve.RunTarget(
                build_app({**common, "pipeline_stages": 2, "shards": {"num_cpus": 0.1}, "ingress": one_llm,
                           "code_validator": None,
                           "llm": small_deployment(min_replicas=1, max_replicas=1, num_cpus=0.1,
                                                   health_check_period_s=3600.0)}),
                name="sharded", route_prefix="/sharded",
            ),
            # The guide's strict profile, plus an output rule that fires on any two lowercase letters.
            # engine.cpu_threads=2 here (the other apps keep Ray's setting); outputs do not depend on it.
            # Its ingress runs on Serve's default threads (ingress_single_loop: false), so the
            # streaming and screening tests on /strict cover both ingress modes.
            serve.RunTarget(
                build_app({**small, "engine": {**common["engine"], "cpu_threads": 2}, "ingress_single_loop": False,
                           "safety": {"profile": "strict", "rules": [LETTERS_RULE, EQUALS_RULE], "timeout_s": 20,
                                      "deployment": SMALL_SAFETY}}),
                name="strict", route_prefix="/strict",
            ),
            # A filter that can never answer in time: every request must fail closed.
            serve.RunTarget(build_app({**small, "safety": {"timeout_s": 0.0001, "deployment": SMALL_SAFETY}}),
                            name="failclosed", route_prefix="/failclosed"),
        ])
        base = f"http://127.0.0.1:{port}"
        for prefix in ("", "/sharded", "/strict", "/failclosed"):
            wait_http_ok(f"{base}{prefix}/health")
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig())


def test_models_and_health(server, client):
    # The model, then the LoRA adapter served beside it, whose parent it is (vLLM's model cards).
    assert [(m.id, m.model_dump()["parent"]) for m in client.models.list().data] == [(MODEL, None), (ADAPTER, MODEL)]
    # The context in tokens, as vLLM's model card gives it (r1-tiny's: 1024).
    assert client.models.list().data[0].model_dump()["max_model_len"] == 1024
    assert client.models.retrieve(MODEL).model_dump()["max_model_len"] == 1024
    assert client.models.retrieve(ADAPTER).model_dump()["parent"] == MODEL
    health = httpx.get(f"{server}/health", timeout=10)  # open without a key
    assert health.status_code == 200 and health.json() == {"status": "ok"}


def test_chat_completion_usage_and_reasoning_split(server, client, tokenizer):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0)
    choice = reply.choices[0]
    prompt_text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens <= 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert choice.finish_reason in {"stop", "length"}
    # The same greedy generation as raw text, split by the library, gives the chat fields.
    raw = client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=24, temperature=0)
    reasoning, content = split_reasoning(raw.choices[0].text)
    message = choice.message.model_dump()
    assert (message["reasoning_content"] or "") == reasoning
    assert message["reasoning"] == message["reasoning_content"]
    assert (choice.message.content or "") == content
    # The reasoning's tokens, as OpenAI's and DeepSeek's APIs report them for reasoning models.
    counted = reply.usage.completion_tokens_details.reasoning_tokens
    assert counted == len(tokenizer.encode(reasoning, add_special_tokens=False)) and 0 < counted <= 24


def test_streaming_chat_equals_non_streaming(client):
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    reasoning, content, finish, usage, roles = "", "", None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta.model_dump()
            roles.append(delta.get("role"))
            reasoning += delta.get("reasoning_content") or ""
            content += delta.get("content") or ""
            finish = choice.finish_reason or finish
    assert roles[0] == "assistant"
    assert reasoning == (full.choices[0].message.model_dump()["reasoning_content"] or "")
    assert content == (full.choices[0].message.content or "")
    assert finish == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens
    assert usage.completion_tokens_details.reasoning_tokens == full.usage.completion_tokens_details.reasoning_tokens > 0


def test_a_chats_later_turns_are_served_where_its_history_is_cached(client):
    # The main app runs two LLM-server replicas, each with its own prefix cache; the ingress routes a
    # chat to the replica its opening belongs to (llm_routing: prefix_affinity), so every later turn
    # finds the earlier ones' tokens cached there: usage.prompt_tokens_details.cached_tokens, as
    # OpenAI and vLLM report them. Routed by load alone, each later turn would find them on the
    # other replica about half the time.
    later = []
    for chat in range(6):
        messages = [{"role": "system", "content": f"Chat {chat}: answer arithmetic questions; think first."},
                    {"role": "user", "content": f"Mia has {20 + chat} apples and buys 45 more. How many apples?"}]
        for turn in range(3):
            reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
            cached = reply.usage.prompt_tokens_details.cached_tokens
            assert 0 <= cached < reply.usage.prompt_tokens and cached % 16 == 0  # whole 16-token blocks
            if turn == 0:
                assert cached == 0  # nothing of this chat was computed before
            else:
                later.append(cached)
            messages += [{"role": "assistant", "content": reply.choices[0].message.content or "ok"},
                         {"role": "user", "content": f"And {turn + 2} more?"}]
    # One turn may miss: the LLM server autoscales, and a replica added meanwhile takes some chats.
    assert sum(cached > 0 for cached in later) >= len(later) - 1, later
    # The streamed usage says the same.
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
    assert usage.prompt_tokens_details.cached_tokens > 0


def test_a_continued_responses_conversation_reports_its_cached_input(client):
    # (No `instructions`: a continued response does not repeat them, so its prompt would start otherwise.)
    first = client.responses.create(model=MODEL, input="Tom has 5 pens and buys 3 more pens at the shop on the "
                                    "corner. How many pens does he have now?", max_output_tokens=12, temperature=0)
    assert first.usage.input_tokens_details.cached_tokens == 0
    second = client.responses.create(model=MODEL, previous_response_id=first.id, input="And 2 more?",
                                     max_output_tokens=12, temperature=0)
    assert 0 < second.usage.input_tokens_details.cached_tokens < second.usage.input_tokens


def test_completions_stream_and_not(client):
    full = client.completions.create(model=MODEL, prompt="12 + 7 =", max_tokens=10, temperature=0)
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="12 + 7 =", max_tokens=10, temperature=0, stream=True) if c.choices)
    assert text == full.choices[0].text
    assert full.usage.completion_tokens == 10 or full.choices[0].finish_reason == "stop"


def test_batched_completion_prompts_answer_as_one_request_each(client, tokenizer):
    # A batch of prompts, n choices each: choice i * n + j is choice j of a request holding prompt i
    # alone (seeded sampling makes them comparable); usage counts each prompt once.
    prompts = ["12 + 7 =", "3 + 4 ="]
    sampling = {"max_tokens": 6, "temperature": 1.0, "seed": 11, "n": 2}
    singles = [client.completions.create(model=MODEL, prompt=prompt, **sampling) for prompt in prompts]
    batch = client.completions.create(model=MODEL, prompt=prompts, **sampling)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    expected = [(c.text, c.finish_reason) for single in singles for c in single.choices]
    assert [(c.text, c.finish_reason) for c in batch.choices] == expected
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert batch.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    streamed: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(model=MODEL, prompt=prompts, stream=True,
                                           stream_options={"include_usage": True}, **sampling):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
        usage = chunk.usage or usage
    assert [streamed[i] for i in range(4)] == [text for text, _ in expected]
    assert usage.prompt_tokens == batch.usage.prompt_tokens
    # Token-id prompts batch the same way.
    ids = [tokenizer.encode(prompt, add_special_tokens=False) for prompt in prompts]
    greedy = {"max_tokens": 6, "temperature": 0}
    by_ids = client.completions.create(model=MODEL, prompt=ids, **greedy)
    assert [c.text for c in by_ids.choices] == [client.completions.create(model=MODEL, prompt=p, **greedy).choices[0].text
                                                for p in ids]


def test_frequency_and_presence_penalties_reach_the_engine(client, tiny):
    from r1.engine import TransformersEngine

    prompt = "Reason step by step: 12 + 7 - 3"
    model, tokenizer = tiny
    engine = TransformersEngine(model, tokenizer)
    try:
        def in_process(**penalties) -> str:
            sampling = SamplingConfig(temperature=0, max_new_tokens=16, **penalties)
            return engine.generate_batch([prompt], sampling)[0].text

        for penalties in ({"frequency_penalty": 1.5}, {"presence_penalty": 2.0}):
            reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, **penalties)
            assert reply.choices[0].text == in_process(**penalties) != in_process()
    finally:
        engine.shutdown()


def test_logit_bias_over_http(server, client, tokenizer):
    token = tokenizer.encode(" 7", add_special_tokens=False)[-1]
    reply = client.completions.create(model=MODEL, prompt="1 + 1 =", max_tokens=3, temperature=0,
                                      logit_bias={str(token): 100})
    assert reply.choices[0].text == tokenizer.decode([token] * 3)
    response = _post(server, "/v1/completions", {"model": MODEL, "prompt": "1 +", "max_tokens": 2,
                                                 "logit_bias": {str(len(tokenizer) + 10): 5}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "logit_bias", response.text
    assert "vocabulary" in response.json()["error"]["message"]


def _in_process_logprobs(tiny, prompt, tokens: int, top: int):
    from r1.engine import TransformersEngine

    engine = TransformersEngine(*tiny)
    try:
        sampling = SamplingConfig(temperature=0, max_new_tokens=tokens, logprobs=top)
        return engine.generate_batch([prompt], sampling)[0].logprobs
    finally:
        engine.shutdown()


def _same_entries(token_texts: list[str], values: list[float], tops: list[list[str]], expected, tokenizer) -> None:
    """The wire's tokens, logprobs and alternatives equal the in-process engine's entries."""
    assert token_texts == [tokenizer.decode([e.token_id]) for e in expected]
    assert values == pytest.approx([e.logprob for e in expected], abs=1e-3)
    assert tops == [[tokenizer.decode([i]) for i, _ in e.top] for e in expected]


def test_logprobs_over_http(server, client, tiny, tokenizer):
    # Chat (top_logprobs) and completions (logprobs: k), streamed and not, on the whole model and on
    # the two-stage pipeline: the entries are the in-process engine's, one per generated token.
    expected = _in_process_logprobs(tiny, MESSAGES, 12, 3)
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == len(expected)
    _same_entries([e.token for e in content], [e.logprob for e in content],
                  [[t.token for t in e.top_logprobs] for e in content], expected, tokenizer)
    assert all(e.bytes == list(e.token.encode()) for e in content)
    streamed = [e for chunk in client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3, stream=True)
        for choice in chunk.choices if choice.logprobs for e in choice.logprobs.content]
    assert [(e.token, e.top_logprobs) for e in streamed] == [(e.token, e.top_logprobs) for e in content]
    # Without top_logprobs: the chosen tokens only; without logprobs: none.
    bare = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, logprobs=True)
    assert [e.token for e in bare.choices[0].logprobs.content] == [e.token for e in content]
    assert all(e.top_logprobs == [] for e in bare.choices[0].logprobs.content)
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2).choices[0].logprobs is None

    prompt = "12 + 7 ="
    expected = _in_process_logprobs(tiny, prompt, 8, 2)
    for base in ("", "/sharded"):
        sharded = openai.OpenAI(base_url=f"{server}{base}/v1", api_key=KEY, max_retries=0, timeout=120)
        choice = sharded.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=2).choices[0]
        logprobs = choice.logprobs
        # top_logprobs: the two alternatives and the chosen token (one of them, greedy)
        _same_entries(logprobs.tokens, logprobs.token_logprobs, [list(top) for top in logprobs.top_logprobs],
                      expected, tokenizer)
        assert "".join(logprobs.tokens) == choice.text
        assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    tokens, offsets = [], []
    for chunk in client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=2,
                                           stream=True):
        for choice in chunk.choices:
            if choice.logprobs:
                tokens += choice.logprobs.tokens
                offsets += choice.logprobs.text_offset
    assert tokens == logprobs.tokens and offsets == logprobs.text_offset
    # vLLM's return_tokens_as_token_ids: the same entries, each token named "token_id:N" by its id
    # (streamed too), the offsets still those of the text.
    named = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=2,
                                      extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs
    assert named.tokens == [f"token_id:{e.token_id}" for e in expected] and named.text_offset == logprobs.text_offset
    assert all(f"token_id:{e.token_id}" in top for e, top in zip(expected, named.top_logprobs))
    streamed = [e.token for chunk in client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, logprobs=True, stream=True,
        extra_body={"return_tokens_as_token_ids": True}) for choice in chunk.choices if choice.logprobs
        for e in choice.logprobs.content]
    assert streamed == [f"token_id:{e.token_id}" for e in _in_process_logprobs(tiny, MESSAGES, 12, 0)]
    # n choices and a batch of prompts: each choice has its own tokens' entries.
    batch = client.completions.create(model=MODEL, prompt=[prompt, "3 + 4 ="], max_tokens=5, temperature=1.0, seed=3,
                                      n=2, logprobs=0)
    for choice in batch.choices:
        assert "".join(choice.logprobs.tokens) == choice.text and len(choice.logprobs.tokens) == 5
        assert all(len(top) == 1 for top in choice.logprobs.top_logprobs)  # the chosen token only


def test_echo_with_logprobs_scores_the_prompt(server, client, tiny, tokenizer):
    # lm-eval's loglikelihood request: token-id prompts (a batch), echo, logprobs=1, max_tokens=1,
    # greedy. Each choice lists every prompt token (the first with null) and then the generated one,
    # with the in-process engine's values.
    from r1.engine import TransformersEngine

    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in ("12 + 7 = 19", "Mia has 23 apples.")]
    engine = TransformersEngine(*tiny)
    try:
        expected = engine.generate_batch(prompts, SamplingConfig(temperature=0, max_new_tokens=1, logprobs=1,
                                                                 prompt_logprobs=1))
    finally:
        engine.shutdown()
    reply = client.completions.create(model=MODEL, prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0)
    for choice, prompt, want in zip(reply.choices, prompts, expected):
        entries = want.prompt_logprobs + want.logprobs
        logprobs = choice.logprobs
        assert logprobs.tokens == [tokenizer.decode([e.token_id]) for e in entries]
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        assert logprobs.token_logprobs[1:] == pytest.approx([e.logprob for e in entries[1:]], abs=1e-3)
        assert [max(top, key=top.get) for top in logprobs.top_logprobs[1:]] == \
            [tokenizer.decode([e.top[0][0]]) for e in entries[1:]]
        # The text is the listed tokens' (an end-of-sequence token listed by name has none).
        assert choice.text == tokenizer.decode(prompt) + want.text == \
            "".join(t for t in logprobs.tokens if t not in tokenizer.all_special_tokens)
        assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
        # What lm-eval reads: the continuation's summed logprob (here the prompt's last 3 tokens).
        assert sum(logprobs.token_logprobs[-4:-1]) == pytest.approx(sum(e.logprob for e in want.prompt_logprobs[-3:]),
                                                                    abs=1e-3)
    # A text prompt, streamed: the same entries, the echoed prompt's first.
    streamed = []
    for chunk in client.completions.create(model=MODEL, prompt="12 + 7 = 19", echo=True, logprobs=1, max_tokens=1,
                                           temperature=0, stream=True):
        for choice in chunk.choices:
            streamed += choice.logprobs.tokens if choice.logprobs else []
    assert streamed == reply.choices[0].logprobs.tokens


def test_echo_with_logprobs_leaves_out_redacted_prompt_tokens(server):
    # The strict app's output screening redacts the echoed prompt's letters: their tokens have no entry.
    import re

    body = {"model": MODEL, "prompt": "ab 23 + 45 =", "echo": True, "logprobs": 0, "max_tokens": 2, "temperature": 0}
    response = _post(server, "/strict/v1/completions", body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert not choice["text"].startswith("ab")
    tokens = choice["logprobs"]["tokens"]
    assert tokens and not any(re.search("[a-z]", token) for token in tokens)
    assert "".join(tokens) in choice["text"] and "23" in "".join(tokens)


def test_vllm_sampling_extensions_over_http(server, client, tiny, tokenizer):
    # What vLLM's benchmark clients send for fixed-length replies: ignore_eos (and min_tokens).
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "What is 2 + 3?"}], "temperature": 0}
    short = client.chat.completions.create(**chat, max_tokens=96)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 90  # ends early by itself
    assert short.choices[0].model_dump()["stop_reason"] is None  # vLLM's stop_reason: none for end-of-sequence
    fixed = client.chat.completions.create(**chat, max_tokens=90, extra_body={"ignore_eos": True})
    assert fixed.usage.completion_tokens == 90 and fixed.choices[0].finish_reason == "length"
    held = client.chat.completions.create(**chat, max_tokens=96,
                                          extra_body={"min_tokens": short.usage.completion_tokens + 3})
    assert held.usage.completion_tokens >= short.usage.completion_tokens + 4  # min_tokens, then end-of-sequence
    # A stop token id ends the reply at its first occurrence, its text kept.
    ids = [e.token_id for e in _in_process_logprobs(tiny, "12 + 7 =", 8, 0)]
    at = next(i for i in range(1, 8) if ids[i] not in ids[:i])
    stopped = client.completions.create(model=MODEL, prompt="12 + 7 =", max_tokens=8, temperature=0,
                                        extra_body={"stop_token_ids": [ids[at]]})
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == at + 1
    assert stopped.choices[0].text == tokenizer.decode(ids[: at + 1])
    assert stopped.choices[0].model_dump()["stop_reason"] == ids[at]  # the id that stopped it
    # include_stop_str_in_output keeps a stop string at the end of the text, streamed and not.
    text = client.completions.create(model=MODEL, prompt="12 + 7 =", max_tokens=8, temperature=0).choices[0].text
    stop = text.strip()[1:3]
    assert stop and stop in text
    kept = {"model": MODEL, "prompt": "12 + 7 =", "max_tokens": 8, "temperature": 0, "stop": [stop],
            "extra_body": {"include_stop_str_in_output": True}}
    expected = text[: text.index(stop) + len(stop)]
    answer = client.completions.create(**kept).choices[0].model_dump()
    assert (answer["text"], answer["stop_reason"]) == (expected, stop)
    chunks = [c.choices[0].model_dump() for c in client.completions.create(**kept, stream=True) if c.choices]
    assert "".join(c["text"] for c in chunks) == expected and chunks[-1]["stop_reason"] == stop
    chat_stop = client.chat.completions.create(**chat, max_tokens=96, stop=["="], stream=True)
    last = [c.choices[0].model_dump() for c in chat_stop if c.choices][-1]
    assert (last["finish_reason"], last["stop_reason"]) == ("stop", "=")
    # continuous_usage_stats: every chunk carries its choice's usage so far, ending at the final usage.
    for create in (client.completions.create, client.chat.completions.create):
        body = {"prompt": "12 + 7 ="} if create == client.completions.create else {"messages": chat["messages"]}
        chunks = list(create(model=MODEL, **body, max_tokens=12, temperature=0, stream=True, n=2, extra_body={
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}))
        final = chunks[-1].usage
        for index in (0, 1):
            counts = [c.usage.completion_tokens for c in chunks if c.choices and c.choices[0].index == index and c.usage]
            prompts = {c.usage.prompt_tokens for c in chunks if c.choices and c.choices[0].index == index and c.usage}
            assert counts == sorted(counts) and counts[-1] == 12 and prompts == {final.prompt_tokens}, create
        assert final.completion_tokens == 24 and not chunks[-1].choices
    # allowed_token_ids: digits only; bad_words: the plain reply's word is not written.
    digits = [tokenizer.convert_tokens_to_ids(d) for d in "0123456789"]
    only = client.completions.create(model=MODEL, prompt="12 + 7 =", max_tokens=8, temperature=0,
                                     extra_body={"allowed_token_ids": digits, "ignore_eos": True})
    assert only.choices[0].text.isdigit() and only.usage.completion_tokens == 8
    answer = client.chat.completions.create(**chat, max_tokens=96).choices[0].message.model_dump()
    word = next(w for w in answer["reasoning_content"].split() if w.isdigit() and len(w) >= 2)
    banned = client.chat.completions.create(**chat, max_tokens=96, extra_body={"bad_words": [word]})
    assert word not in (banned.choices[0].message.model_dump()["reasoning_content"] or "")
    for extra, param in (({"min_tokens": 9}, "min_tokens"), ({"include_stop_str_in_output": "yes"},
                                                             "include_stop_str_in_output"),
                         ({"allowed_token_ids": [len(tokenizer) + 3]}, "allowed_token_ids"),
                         ({"allowed_token_ids": []}, "allowed_token_ids"), ({"bad_words": [""]}, "bad_words.0"),
                         ({"priority": 1}, "priority"),  # this app serves in arrival order (scheduling_policy fcfs)
                         ({"allowed_token_ids": digits, "guided_regex": "[0-9]+"}, "allowed_token_ids"), ({"stop_token_ids": [len(tokenizer) + 3]}, "stop_token_ids")):
        response = _post(server, "/v1/completions", {"model": MODEL, "prompt": "1 +", "max_tokens": 8, **extra})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_responses_api_answers_as_chat_does(server, client):
    # OpenAI's Responses API with the stock client: the same greedy generation as a chat completion,
    # its reasoning in a reasoning item and its answer in a message item; streamed, the events add
    # up to the same response.
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, temperature=0)
    message = chat.choices[0].message.model_dump()
    response = client.responses.create(model=MODEL, input=MESSAGES[0]["content"], max_output_tokens=40, temperature=0)
    assert response.output_text == (message["content"] or "")
    assert [item.type for item in response.output] == (["reasoning"] if message["reasoning_content"] else []) + ["message"]
    if message["reasoning_content"]:
        assert response.output[0].content[0].text == message["reasoning_content"]
    assert (response.usage.input_tokens, response.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert response.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"
    assert 0 < response.usage.output_tokens_details.reasoning_tokens <= response.usage.output_tokens
    # instructions and a list of messages with text parts read as the chat messages they stand for
    system = "Answer with a number."
    listed = client.responses.create(
        model=MODEL, instructions=system, max_output_tokens=12, temperature=0,
        input=[{"role": "user", "content": [{"type": "input_text", "text": MESSAGES[0]["content"]}]}])
    as_chat = client.chat.completions.create(model=MODEL, max_tokens=12, temperature=0,
                                             messages=[{"role": "system", "content": system}, *MESSAGES])
    assert listed.output_text == (as_chat.choices[0].message.content or "")
    assert listed.usage.input_tokens == as_chat.usage.prompt_tokens and listed.instructions == system
    # streamed: created, in_progress, the items' events, completed; numbered in order
    events = list(client.responses.create(model=MODEL, input=MESSAGES[0]["content"], max_output_tokens=40,
                                          temperature=0, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1].type == f"response.{response.status}"
    final = events[-1].response
    assert final.output_text == response.output_text and final.usage.output_tokens == response.usage.output_tokens
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert text == response.output_text and reasoning == (message["reasoning_content"] or "")
    done = [e for e in events if e.type == "response.output_item.done"]
    assert [e.item.type for e in done] == [item.type for item in response.output]


def test_responses_api_function_calls(server, client, tokenizer):
    # Function tools in the Responses shape: the call chat makes, as a function_call output item;
    # streamed as events; sent back with its output, the conversation goes on.
    tools = [{"type": "function", "name": "add", "description": "Add two numbers",
              "parameters": ADD_TOOL["function"]["parameters"]}]
    ask = {"model": MODEL, "input": "What is 23 + 45?", "tools": tools, "max_output_tokens": 96, "temperature": 0,
           "tool_choice": {"type": "function", "name": "add"}, "extra_body": {"logit_bias": answer_at_once(tokenizer)}}
    response = client.responses.create(**ask)
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "add" and calls[0].call_id.startswith("call_")
    assert response.status == "completed" and "message" not in [item.type for item in response.output]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ask["input"]}],
                                          tools=[ADD_TOOL], tool_choice=ADD_CHOICE, max_tokens=96, temperature=0,
                                          logit_bias=answer_at_once(tokenizer))
    assert calls[0].arguments == chat.choices[0].message.tool_calls[0].function.arguments
    assert response.tools[0].name == "add" and response.tool_choice.name == "add"
    events = list(client.responses.create(**ask, stream=True))
    final = events[-1].response
    assert [(i.type, getattr(i, "arguments", None)) for i in final.output] == \
        [(i.type, getattr(i, "arguments", None)) for i in response.output]
    assert [e.arguments for e in events if e.type == "response.function_call_arguments.done"] == [calls[0].arguments]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # The client sends the output back with the call's result (reasoning items included: dropped).
    history = [{"role": "user", "content": ask["input"]}, *[item.model_dump(exclude_none=True) for item in response.output],
               {"type": "function_call_output", "call_id": calls[0].call_id, "output": "68"}]
    follow = client.responses.create(model=MODEL, input=history, tools=tools, max_output_tokens=4)
    assert follow.status == "incomplete" and follow.usage.input_tokens > response.usage.input_tokens
    # A result answering no call is named as sent: its position in the input and `call_id`.
    wrong = _post(server, "/v1/responses", {"model": MODEL, "tools": tools, "input": [
        *history[:-1], {"type": "function_call_output", "call_id": "call_nope", "output": "68"}]})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == f"input.{len(history) - 1}.call_id", wrong.text


@pytest.mark.parametrize("body, status, param", [
    ({"input": "hi", "tools": [{"type": "web_search"}]}, 400, "tools.0"),
    ({"input": "hi", "tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}},
     400, "tool_choice.name"),
    ({"input": "hi", "tool_choice": "required", "tools": [{"type": "function", "name": "f", "parameters": {
        "type": "nonsense"}}]}, 400, "tools.0.parameters"),
    ({"input": "hi", "previous_response_id": "resp_1"}, 404, "previous_response_id"),  # never stored
    ({"input": "hi", "text": {"format": {"type": "yaml"}}}, 400, "text.format.type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400, "input.0.content.0"),
    ({"input": [{"role": "wizard", "content": "hi"}]}, 400, "input.0.role"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "4"}]}, 400, "input.0.call_id"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, 400, "input.0.arguments"),
    ({"input": [{"type": "file_search_call", "id": "x"}]}, 400, "input.0"),
    ({"input": []}, 400, "input"),
    ({"input": "hi", "max_output_tokens": 10**6}, 400, "max_output_tokens"),
    ({"input": "hi", "temperature": 9}, 400, "temperature"),
    ({"input": "1 " * 1100}, 400, "input"),  # beyond the context
    ({"model": "gpt-17", "input": "hi"}, 404, "model"),
    # chat's session extension: refused, not ignored (previous_response_id continues a conversation here)
    ({"input": "hi", "session_id": "a" * 20}, 400, "session_id"),
])
def test_responses_api_bad_input_names_the_responses_field(server, body, status, param):
    response = _post(server, "/v1/responses", {"model": MODEL, **body})
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param, response.text


def test_responses_api_screens_input_and_output(server):
    # The strict app: a keyword in the input is a 400 naming where it was; output letters are redacted.
    for body, param in (({"input": "我的密码是 123456"}, "input"),
                        ({"instructions": "密码 123456", "input": "hi"}, "instructions"),
                        ({"input": [{"role": "user", "content": "hi"}, {"role": "user", "content": "密码 123456"}]},
                         "input.1.content")):
        response = _post(server, "/strict/v1/responses", {"model": MODEL, "max_output_tokens": 4, **body})
        assert response.status_code == 400 and response.json()["error"]["code"] == "sensitive_content", response.text
        assert response.json()["error"]["param"] == param
    response = _post(server, "/strict/v1/responses", {"model": MODEL, "input": MESSAGES[0]["content"],
                                                      "max_output_tokens": 40, "temperature": 0})
    assert response.status_code == 200, response.text
    texts = [part["text"] for item in response.json()["output"] for part in item["content"]]
    assert texts and not any(__import__("re").search("[a-z]{2}", t.replace("[已隐藏]", "")) for t in texts)


YES_NO = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
          "additionalProperties": False}


def test_structured_output_over_http(server, client, tokenizer):
    # response_format json_schema on chat (the answer after the reasoning, streamed and not), on
    # completions (json_object) and on the Responses API (text.format); a bad schema is a 400.
    schema_format = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": YES_NO, "strict": True}}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Is 2 + 3 = 5?"}], "max_tokens": 64, "temperature": 0}
    reply = client.chat.completions.create(**chat, response_format=schema_format)
    message = reply.choices[0].message.model_dump()
    assert json.loads(message["content"]) in ({"answer": "yes"}, {"answer": "no"}) and message["reasoning_content"]
    assert reply.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        **chat, response_format=schema_format, stream=True) if c.choices)
    assert streamed == message["content"]
    close = tokenizer.convert_tokens_to_ids("}")
    empty = client.completions.create(model=MODEL, prompt="Is 12 + 7 = 19?", max_tokens=8, temperature=0,
                                      logit_bias={str(close): 100},
                                      extra_body={"response_format": {"type": "json_object"}})  # vLLM's extension
    assert empty.choices[0].text == "{}" and empty.choices[0].finish_reason == "stop"
    answer = client.responses.create(model=MODEL, input="Is 2 + 3 = 5?", max_output_tokens=64, temperature=0,
                                     text={"format": {"type": "json_schema", "name": "verdict", "schema": YES_NO}})
    assert json.loads(answer.output_text) == json.loads(message["content"])
    for path, body, param in (
        ("/v1/chat/completions", {**chat, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "nonsense"}}}}, "response_format"),
        ("/v1/responses", {"model": MODEL, "input": "hi", "text": {"format": {"type": "json_schema", "name": "x",
                                                                               "schema": {"type": "nonsense"}}}},
         "text.format"),
        ("/v1/responses", {"model": MODEL, "input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}},
         "text.format.schema"),
        ("/v1/chat/completions", {**chat, "code_validation": True, "response_format": {"type": "json_object"}},
         "response_format"),
    ):
        response = _post(server, path, body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_guided_decoding_over_http(server, client):
    # vLLM's guided decoding through the stock client's extra_body: guided_choice on chat (the answer
    # after the reasoning, streamed and not), guided_regex on completions, structured_outputs (vLLM's
    # newer spelling) and guided_json; bad guides and two constraints are 400s naming the field.
    import re

    choices = ["正确", "错误"]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Is 2 + 3 = 5?"}], "max_tokens": 64, "temperature": 0}
    reply = client.chat.completions.create(**chat, extra_body={"guided_choice": choices})
    message = reply.choices[0].message.model_dump()
    assert message["content"] in choices and message["reasoning_content"] and reply.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        **chat, stream=True, extra_body={"structured_outputs": {"choice": choices}}) if c.choices)
    assert streamed == message["content"]
    regex = r"(yes|no), [0-9]{1,3}\."
    plain = client.completions.create(model=MODEL, prompt="Is 12 + 7 = 19?", max_tokens=24, temperature=0)
    guided = client.completions.create(model=MODEL, prompt="Is 12 + 7 = 19?", max_tokens=24, temperature=0,
                                       extra_body={"guided_regex": regex})
    assert not re.fullmatch(regex, plain.choices[0].text) and re.fullmatch(regex, guided.choices[0].text)
    as_text = client.completions.create(model=MODEL, prompt="Is 12 + 7 = 19?", max_tokens=24, temperature=0,
                                        extra_body={"guided_json": json.dumps(YES_NO)})
    assert json.loads(as_text.choices[0].text) in ({"answer": "yes"}, {"answer": "no"})
    completion = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
    for body, param, words in (
        ({**completion, "guided_regex": "[0-"}, "guided_regex", "Unclosed"),
        ({**completion, "guided_grammar": "root ::= missing"}, "guided_grammar", "not defined"),
        ({**completion, "guided_choice": []}, "guided_choice", "non-empty list"),
        ({**completion, "guided_json": "{not json"}, "guided_json", "must be JSON"),
        ({**completion, "guided_choice": ["a"], "response_format": {"type": "json_object"}}, "guided_choice",
         "each constrain the reply"),
        ({**completion, "structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag",
         "not supported"),
        ({**completion, "guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "not supported"),
        ({**chat, "guided_choice": ["a"], "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
         "guided_choice", "cannot be combined with tools"),
        ({**chat, "guided_regex": "def .*", "code_validation": True}, "guided_regex", "omit guided_regex"),
        ({**completion, "guided_choice": ["a"], "min_tokens": 2}, "min_tokens", "cannot be combined with structured"),
    ):
        response = _post(server, "/v1/chat/completions" if "messages" in body else "/v1/completions", body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param and words in error["message"], error


def test_reasoning_budgets_over_http(server, client, tiny):
    # thinking_token_budget (vLLM), thinking_budget (SGLang), reasoning_effort (OpenAI's chat, through
    # the server's levels) and the Responses API's reasoning.effort: the reply is the in-process
    # engine's with that budget, its reasoning cut and an answer after it.
    from r1.engine import TransformersEngine
    from r1.reasoning import split_reasoning

    question = [{"role": "user", "content": "Tom has 5 pens. He buys 17 more. How many pens does he have now?"}]
    engine = TransformersEngine(*tiny)
    try:
        expected = {budget: split_reasoning(engine.generate_batch([question], SamplingConfig(
            temperature=0, max_new_tokens=96, thinking_token_budget=budget))[0].text) for budget in (0, 4)}
    finally:
        engine.shutdown()
    ask = {"model": MODEL, "messages": question, "max_tokens": 96, "temperature": 0}
    for extra, budget in (({"thinking_token_budget": 4}, 4), ({"thinking_budget": 4}, 4),
                          ({"reasoning_effort": "none"}, 0)):
        message = client.chat.completions.create(**ask, extra_body=extra).choices[0].message.model_dump()
        assert ((message["reasoning_content"] or "").strip(), message["content"].strip()) == tuple(
            part.strip() for part in expected[budget]), extra
        assert message["content"].strip()  # an answer follows the cut reasoning
    answered = client.responses.create(model=MODEL, input=question[0]["content"], max_output_tokens=96, temperature=0,
                                       reasoning={"effort": "none"})
    assert answered.output_text.strip() == expected[0][1].strip()
    assert answered.usage.output_tokens_details.reasoning_tokens == 0
    for path, body, param in (
        ("/v1/chat/completions", {**ask, "reasoning_effort": "extreme"}, "reasoning_effort"),
        ("/v1/chat/completions", {**ask, "reasoning_effort": "low", "thinking_token_budget": 3}, "reasoning_effort"),
        ("/v1/chat/completions", {**ask, "thinking_budget": -1}, "thinking_budget"),
        ("/v1/responses", {"model": MODEL, "input": "hi", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ):
        response = _post(server, path, body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_a_prefix_message_is_continued_over_http(server, client, tokenizer):
    # DeepSeek's prefix completion ("prefix": true on the last assistant message; reasoning_content
    # continues the reasoning) and vLLM's continue_final_message: the reply continues the rendered
    # start as a raw completion of that rendering does; the session stores the start and the
    # continuation as one message; /tokenize counts the same prompt; misuse is a 400 naming the field.
    from r1.chat_template import render_chat

    question = {"role": "user", "content": "What is 2 + 3?"}
    ask = {"model": MODEL, "temperature": 0, "max_tokens": 48}
    start = "The answer is"
    raw = client.completions.create(**ask, prompt=render_chat(tokenizer, [question, {
        "role": "assistant", "content": start, "prefix": True}])).choices[0].text
    assert raw[:1].isspace()  # kept as it is: the continuation's leading space joins it to the start
    reply = client.chat.completions.with_raw_response.create(
        **ask, messages=[question, {"role": "assistant", "content": start}],
        extra_body={"continue_final_message": True, "add_generation_prompt": False})
    message = reply.parse().choices[0].message.model_dump()
    assert (message["content"], message["reasoning_content"]) == (raw, None)
    stored = httpx.get(f"{server}/v1/sessions/{reply.headers['x-session-id']}", headers={"Authorization": f"Bearer {KEY}"},
                       timeout=30).json()["messages"]
    assert stored == [question, {"role": "assistant", "content": start + raw}]
    # A start of the reasoning (DeepSeek's reasoning_content on the prefix): the reply reasons on.
    thinking = render_chat(tokenizer, [question, {"role": "assistant", "content": "<think>\nFirst, 2", "prefix": True}])
    raw = client.completions.create(**ask, prompt=thinking).choices[0].text
    streamed = list(client.chat.completions.create(**ask, stream=True, messages=[question, {
        "role": "assistant", "content": "", "reasoning_content": "First, 2", "prefix": True}]))
    reasoning = "".join(c.choices[0].delta.model_dump().get("reasoning_content") or "" for c in streamed if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert raw.startswith(reasoning) and reasoning.strip() and raw.endswith(content)
    # The start is the output screening's context: digits after "密码是" are a password, redacted
    # (the same digits without that start pass).
    digits = [tokenizer.convert_tokens_to_ids(d) for d in "0123456789"]
    forced = {**ask, "max_tokens": 6, "extra_body": {"allowed_token_ids": digits, "ignore_eos": True}}
    plain = client.chat.completions.create(**forced, messages=[question, {"role": "assistant", "content": "好的，",
                                                                         "prefix": True}])
    assert plain.choices[0].message.content.isdigit()
    secret = client.chat.completions.create(**forced, messages=[question, {"role": "assistant", "content": "好的，我的密码是",
                                                                          "prefix": True}])
    assert not any(ch.isdigit() for ch in secret.choices[0].message.content), secret.choices[0].message.content
    counted = httpx.post(f"{server}/tokenize", headers={"Authorization": f"Bearer {KEY}"}, timeout=30, json={
        "model": MODEL, "messages": [question, {"role": "assistant", "content": start}], "continue_final_message": True,
        "add_generation_prompt": False}).json()["tokens"]
    assert counted == tokenizer.encode(render_chat(tokenizer, [question, {"role": "assistant", "content": start,
                                                                          "prefix": True}]), add_special_tokens=False)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for extra, param in (
        ({"continue_final_message": True, "add_generation_prompt": True}, "add_generation_prompt"),
        ({"add_generation_prompt": False}, "add_generation_prompt"),
        ({"continue_final_message": True, "tools": tools}, "tools"),
        ({"messages": [question], "continue_final_message": True}, "continue_final_message"),
        ({"messages": [question, {"role": "assistant", "content": "<think>a</think>b", "prefix": True}]},
         "messages.1.content"),
        ({"messages": [{**question, "prefix": True}, {"role": "assistant", "content": "x"}]}, "messages.0.prefix"),
    ):
        body = {**ask, "messages": [question, {"role": "assistant", "content": start}], **extra}
        response = _post(server, "/v1/chat/completions", body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_tokenize_counts_what_the_engine_sees_and_detokenize_inverts_it(server, client, tokenizer):
    headers = {"Authorization": f"Bearer {KEY}"}

    def post(path: str, body: dict) -> dict:
        response = httpx.post(f"{server}{path}", json={"model": MODEL, **body}, headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    prompt = "12 + 7 ="
    tokens = post("/tokenize", {"prompt": prompt})
    assert tokens["tokens"] == tokenizer.encode(prompt, add_special_tokens=True) and tokens["count"] == len(tokens["tokens"])
    from actors.session_store import token_counting

    assert tokens["max_model_len"] == token_counting(ModelConfig(), tokenizer)[1] > 0
    assert post("/tokenize", {"prompt": prompt, "add_special_tokens": False})["tokens"] == \
        tokenizer.encode(prompt, add_special_tokens=False)
    assert post("/detokenize", {"tokens": tokenizer.encode(prompt, add_special_tokens=False)}) == {"prompt": prompt}
    # Chat messages through the chat template: the count the completion's usage reports (the
    # /strict app keeps no sessions, so its prompt is the messages alone).
    counted = post("/tokenize", {"messages": MESSAGES})["count"]
    reply = httpx.post(f"{server}/strict/v1/chat/completions", headers=headers, timeout=120,
                       json={"model": MODEL, "messages": MESSAGES, "max_tokens": 1}).json()
    assert counted == reply["usage"]["prompt_tokens"]
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1)
    assert completion.usage.prompt_tokens == tokens["count"]


def test_n_choices_with_seed_differ_and_count_usage(client):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=1.0, n=3, seed=5)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage.completion_tokens == sum(8 if c.finish_reason == "length" else 0 for c in reply.choices) or \
        reply.usage.completion_tokens <= 24


def test_sharded_greedy_equals_unsharded(server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 24, "temperature": 0}
    headers = {"Authorization": f"Bearer {KEY}"}
    whole = httpx.post(f"{server}/v1/chat/completions", json=body, headers=headers, timeout=120).json()
    sharded = httpx.post(f"{server}/sharded/v1/chat/completions", json=body, headers=headers, timeout=120).json()
    assert sharded["choices"][0]["message"] == whole["choices"][0]["message"]
    # The same counts; of the prompt, the unsharded engine may have had some cached (its prefix
    # cache), the sharded one none (its shards keep no prefix cache).
    assert sharded["usage"].pop("prompt_tokens_details") == {"cached_tokens": 0}
    whole["usage"].pop("prompt_tokens_details")
    assert sharded["usage"] == whole["usage"]


@pytest.mark.parametrize(
    "headers",
    [
        {},  # no key at all
        {"Authorization": "Bearer wrong-key"},  # a key that is not configured
        {"Authorization": KEY},  # the key without the Bearer scheme
    ],
)
def test_auth_required_on_every_model_route(server, headers):
    for method, path, body in [("GET", "/v1/models", None), ("POST", "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES}),
                               ("POST", "/v1/completions", {"model": MODEL, "prompt": "1"}),
                               ("POST", "/v1/responses", {"model": MODEL, "input": "1"}),
                               ("POST", "/tokenize", {"model": MODEL, "prompt": "1"}),
                               ("POST", "/detokenize", {"model": MODEL, "tokens": [1]})]:
        response = httpx.request(method, f"{server}{path}", json=body, headers=headers, timeout=30)
        assert response.status_code == 401, path
        assert response.json()["error"]["type"] == "authentication_error"


BAD_REQUESTS = [
    # body over max_request_bytes (4096 in this app)
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]}, 413, None),
    # max_tokens beyond the server limit
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 100000}, 400, "max_tokens"),
    # n beyond max_n
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "n": 9}, 400, "n"),
    # prompt + max_tokens beyond the model's 1024-token context
    ("/v1/completions", {"model": MODEL, "prompt": "1", "max_tokens": 1100}, 400, "max_tokens"),
    # a prompt (token ids) longer than the context
    ("/v1/completions", {"model": MODEL, "prompt": [5] * 1030}, 400, "prompt"),
    # wrong types
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    # out-of-range sampling values
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "top_p": 0}, 400, "top_p"),
    # unknown model
    ("/v1/chat/completions", {"model": "gpt-17", "messages": MESSAGES}, 404, "model"),
    # a tool message answering no call of the request
    ("/v1/chat/completions", {"model": MODEL, "messages": [*MESSAGES, {"role": "tool", "content": "4",
                                                                      "tool_call_id": "call_1"}]},
     400, "messages.1.tool_call_id"),
    # a seed beyond 64 bits (torch's generator would overflow)
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "seed": 2**70}, 400, "seed"),
    # negative token ids; a batch of prompts mixing strings and token ids, or making more choices
    # (prompts × n) than max_n; a prompt of a batch beyond the context, named by its position
    ("/v1/completions", {"model": MODEL, "prompt": [5, -1]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [[5, 6], [7, -1]]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["1 + 1 =", [5, 6]]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["1 + 1 ="] * 5, "n": 2}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["1 + 1 =", "1 " * 2000]}, 400, "prompt.1"),
    # token ids outside the vocabulary, refused before the screening decodes them (an id past 2**32
    # overflowed the tokenizer: a 500), a batch's by its position
    ("/v1/completions", {"model": MODEL, "prompt": [5, 10**12]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [[5, 6], [7, 4096]]}, 400, "prompt.1"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "top_k": -2}, 400, "top_k"),
    # /tokenize and /detokenize: one of prompt and messages; token ids in the vocabulary; the model
    ("/tokenize", {"model": MODEL}, 400, None),
    ("/tokenize", {"model": MODEL, "prompt": "1", "messages": MESSAGES}, 400, None),
    ("/tokenize", {"model": MODEL, "messages": [{"role": "tool", "content": "4"}]}, 400, "messages.0"),
    ("/tokenize", {"model": MODEL, "messages": MESSAGES, "tool_choice": "required"}, 400, "tool_choice"),
    ("/tokenize", {"model": "gpt-17", "prompt": "1"}, 404, "model"),
    ("/detokenize", {"model": MODEL, "tokens": [5, -1]}, 400, "tokens.1"),
    ("/detokenize", {"model": MODEL, "tokens": [10**9]}, 400, "tokens"),
    # logprobs: at most 20 alternatives, top_logprobs only with logprobs: true
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs"),
    # tools: a choice of a function not offered, a schema that cannot constrain, tools with logprobs
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "tools": [ADD_TOOL],
                              "tool_choice": {"type": "function", "function": {"name": "sub"}}}, 400,
     "tool_choice.function.name"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]}, 400,
     "tools.0.function.parameters"),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "tools": [ADD_TOOL], "logprobs": True}, 400,
     "logprobs"),
    # an OpenAI feature r1 does not implement is refused, not silently ignored
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "best_of": 2}, 400, "best_of"),
    ("/v1/completions", {"model": MODEL, "prompt": "1", "suffix": "x"}, 400, "suffix"),
]


@pytest.mark.parametrize("path, body, status, param", BAD_REQUESTS)
def test_bad_input_gets_4xx_naming_the_field(server, client, path, body, status, param):
    response = httpx.post(f"{server}{path}", content=json.dumps(body), timeout=60,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    # the server keeps serving afterwards
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2).choices


# Valid requests of each route; the test below breaks one or two of their fields at a time.
FUZZ_BODIES = [
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "system", "content": "be brief"}, *MESSAGES],
                              "max_tokens": 4, "stop": ["\n"], "temperature": 0.7, "top_p": 0.9, "seed": 3,
                              "logit_bias": {"5": 2}, "presence_penalty": 0.5}),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True, "n": 2,
                              "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "2+2"}]},
                                                           {"role": "assistant", "content": None, "tool_calls": [
                                                               {"id": "call_1", "type": "function",
                                                                "function": {"name": "add", "arguments": "{}"}}]},
                                                           {"role": "tool", "tool_call_id": "call_1", "content": "4"}],
                              "tools": [ADD_TOOL], "tool_choice": ADD_CHOICE, "max_tokens": 4}),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}}),
    ("/v1/completions", {"model": MODEL, "prompt": ["1 + 1 =", "2 + 2 ="], "max_tokens": 4, "echo": True, "logprobs": 2,
                         "stream": True, "min_tokens": 1, "top_k": 3, "min_p": 0.1, "stop_token_ids": [1]}),
    ("/v1/completions", {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 4, "stop": "x", "ignore_eos": True}),
    ("/v1/completions", {"model": MODEL, "prompt": "2 + 2 =", "max_tokens": 4, "guided_choice": ["4", "四"]}),
    ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True,
                              "structured_outputs": {"regex": "[0-9]{1,3}", "disable_fallback": True}}),
    ("/v1/responses", {"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_text", "text": "2+2"}]},
                                                 {"type": "function_call", "call_id": "c1", "name": "add", "arguments": "{}"},
                                                 {"type": "function_call_output", "call_id": "c1", "output": "4"}],
                       "instructions": "be brief", "max_output_tokens": 4, "stream": True, "store": False,
                       "tools": [{"type": "function", **ADD_TOOL["function"]}], "text": {"format": {"type": "json_object"}}}),
    ("/tokenize", {"model": MODEL, "messages": MESSAGES, "add_generation_prompt": True, "tools": [ADD_TOOL]}),
    ("/detokenize", {"model": MODEL, "tokens": [5, 6, 7]}),
]
FUZZ_VALUES = [None, True, 0, -1, 1, 10**30, 1e308, -0.5, "", "x", MODEL, "\x00", [], [None], [1, "a"], {}, {"a": 1},
               {"type": "x"}, [{}], [{"role": "user"}]]
FUZZ_FIELDS = ["n", "best_of", "stream", "logprobs", "echo", "session_id", "previous_response_id", "tool_choice",
               "parallel_tool_calls", "max_completion_tokens", "functions", "store", "guided_json",
               "guided_grammar", "continue_final_message", "add_generation_prompt", "allowed_token_ids", "bad_words",
               "include_stop_str_in_output"]


def _mutated(body: dict, rng: random.Random) -> tuple[dict, str]:
    """`body` with one field, at any depth, removed, replaced by a value of another type or range, or
    an OpenAI field added with such a value; and a description of the change."""
    body = copy.deepcopy(body)
    paths, stack = [], [((), body)]
    while stack:
        path, value = stack.pop()
        if path:
            paths.append(path)
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        stack.extend((path + (key,), item) for key, item in items)
    path = rng.choice(sorted(paths, key=repr))
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    roll = rng.random()
    if roll < 0.15:
        parent.pop(path[-1])
        return body, f"without {path}"
    if roll < 0.25 and isinstance(parent, dict):
        path = path[:-1] + (rng.choice(FUZZ_FIELDS),)
    value = rng.choice(FUZZ_VALUES)
    parent[path[-1]] = value
    return body, f"{path} = {value!r:.40}"


def test_requests_with_broken_fields_get_an_answer_or_a_4xx_never_a_500(server, client):
    """"Never a 500 or a hang" on input nobody listed: valid requests of every route with one or two
    fields broken at random (a fixed seed, so a failure reproduces). Each gets a 2xx whose stream
    ends without an error event, or a 4xx with an OpenAI error body."""
    rng = random.Random(20261201)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    answered = refused = 0
    with httpx.Client(timeout=60, headers=headers) as http:
        for _ in range(150):
            path, body = rng.choice(FUZZ_BODIES)
            body, change = _mutated(body, rng)
            if rng.random() < 0.3:
                body, second = _mutated(body, rng)
                change = f"{change}; {second}"
            response = http.post(f"{server}{path}", content=json.dumps(body))
            where = f"{path} with {change}: {response.status_code} {response.text[:300]}"
            assert response.status_code < 500, where
            if response.status_code >= 400:
                refused += 1
                assert response.json()["error"]["message"], where
                continue
            answered += 1
            events = [line[5:].strip() for line in response.text.splitlines() if line.startswith("data:")]
            for event in events:
                if event != "[DONE]":
                    parsed = json.loads(event)
                    assert not parsed.get("error") and parsed.get("type") not in ("error", "response.failed"), where
    assert answered > 20 and refused > 20  # both kinds of outcome were exercised
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2).choices


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", "\udcff".encode("utf-8", "surrogatepass")])
def test_malformed_json_is_400(server, raw):
    response = httpx.post(f"{server}/v1/chat/completions", content=raw, timeout=30,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_a_lone_surrogate_escape_is_400_naming_the_field(server, client):
    # JSON allows "\ud800"; no text encoding can carry it (the tokenizer would fail on it).
    raw = b'{"model": "%s", "messages": [{"role": "user", "content": "ab\\ud800c"}]}' % MODEL.encode()
    response = httpx.post(f"{server}/v1/chat/completions", content=raw, timeout=30,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages.0.content"
    # a surrogate pair is one character (an emoji) and is served
    pair = raw.replace(b"\\ud800", b"\\ud83d\\ude00")
    response = httpx.post(f"{server}/v1/chat/completions", content=pair.replace(b"}]}", b"}], \"max_tokens\": 2}"),
                          timeout=60, headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 200, response.text


def test_tool_calls_over_http(server, client, tokenizer):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "What is 23 + 45?"}], "max_tokens": 96,
            "temperature": 0, "logit_bias": answer_at_once(tokenizer), "tools": [ADD_TOOL, WEATHER_TOOL]}
    # A named function: its arguments, valid against its schema; no content; "stop" as OpenAI's.
    named = client.chat.completions.create(**chat, tool_choice=ADD_CHOICE)
    choice = named.choices[0]
    call = choice.message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "add" and call.type == "function" and call.id.startswith("call_")
    assert set(arguments) == {"a", "b"} and all(0 <= value <= 99 for value in arguments.values())
    assert choice.finish_reason == "stop" and choice.message.content is None and len(choice.message.tool_calls) == 1
    # Streamed: the same call, whole, in one delta; no content.
    deltas = [c.choices[0].delta for c in client.chat.completions.create(**chat, tool_choice=ADD_CHOICE, stream=True)
              if c.choices]
    streamed = [(t.index, t.function.name, t.function.arguments) for d in deltas for t in d.tool_calls or []]
    assert streamed == [(0, "add", call.function.arguments)] and not any(d.content for d in deltas)
    # "required" with one call allowed: finish_reason "tool_calls", the call valid for its function.
    required = client.chat.completions.create(**chat, tool_choice="required", parallel_tool_calls=False).choices[0]
    assert required.finish_reason == "tool_calls" and len(required.message.tool_calls) == 1
    made = required.message.tool_calls[0].function
    assert (made.name, set(json.loads(made.arguments))) in [("add", {"a", "b"}), ("weather", {"city"})]
    # The client runs the call and sends it back with its result: the conversation goes on, and the
    # prompt holds the offered functions, the call and the result (what /tokenize shows).
    history = [*chat["messages"], {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "68"}]
    follow = client.chat.completions.create(model=MODEL, messages=history, tools=[ADD_TOOL], max_tokens=4)
    headers = {"Authorization": f"Bearer {KEY}"}
    tokens = httpx.post(f"{server}/tokenize", json={"model": MODEL, "messages": history, "tools": [ADD_TOOL]},
                        headers=headers, timeout=60).json()["tokens"]
    prompt = tokenizer.decode(tokens)
    assert follow.usage.prompt_tokens == len(tokens)
    assert '<tools>\n{"type": "function", "function": {"name": "add"' in prompt
    assert f'<tool_call>\n{{"name": "add", "arguments": {json.dumps(arguments)}}}\n</tool_call>' in prompt
    assert "<tool_response>\n68\n</tool_response>" in prompt
    # "auto" (the default with tools): offered in the prompt; r1-tiny answers in text.
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0)
    auto = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, tools=[ADD_TOOL])
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens + 50
    assert auto.choices[0].message.tool_calls is None and auto.choices[0].finish_reason == "length"


def test_tool_calls_and_results_are_screened(server, tokenizer):
    # A call's arguments are output like any other: a card number in them comes redacted (the
    # default profile), still JSON here, as the number was inside a string.
    card = "4111 1111 1111 1111"  # a Luhn-valid test number
    pay = {"type": "function", "function": {"name": "pay", "parameters": {
        "type": "object", "properties": {"card": {"enum": [card]}}, "required": ["card"], "additionalProperties": False}}}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Pay."}], "max_tokens": 48, "temperature": 0,
            "logit_bias": answer_at_once(tokenizer), "tools": [pay],
            "tool_choice": {"type": "function", "function": {"name": "pay"}}}
    for stream in (False, True):
        if stream:
            text = _streamed_text(server, "/v1/chat/completions", {**body, "stream": True}, lambda choice: "".join(
                call["function"]["arguments"] for call in choice["delta"].get("tool_calls") or []))
        else:
            response = _post(server, "/v1/chat/completions", body)
            assert response.status_code == 200, response.text
            text = response.json()["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
        assert json.loads(text) == {"card": "[已隐藏]"}, text
    # A secret after its key (the default profile's secret rule reads JSON keys too).
    login = {"type": "function", "function": {"name": "login", "parameters": {
        "type": "object", "properties": {"password": {"enum": ["hunter42"]}}, "required": ["password"],
        "additionalProperties": False}}}
    response = _post(server, "/v1/chat/completions", {**body, "tools": [login], "tool_choice": {
        "type": "function", "function": {"name": "login"}}})
    arguments = response.json()["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert json.loads(arguments) == {"password": "[已隐藏]"}, arguments
    # Input: a tool's result and the offered functions are screened like messages (strict blocks
    # the guide's keywords), each named in the error.
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"paris\"}"}}
    history = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "你的密码是 hunter2"}]
    secret = {"type": "function", "function": {"name": "reset", "description": "忘记密码时重置", "parameters": {}}}
    for extra, param in (({"messages": history, "tools": [WEATHER_TOOL]}, "messages.2.content"),
                         ({"messages": history[:1], "tools": [secret]}, "tools")):
        response = _post(server, "/strict/v1/chat/completions", {"model": MODEL, "max_tokens": 2, **extra})
        assert response.status_code == 400, response.text
        assert (response.json()["error"]["code"], response.json()["error"]["param"]) == ("sensitive_content", param)


def test_neutral_values_of_unimplemented_features_are_served(client):
    # Clients that send the defaults of features r1 does not implement keep working.
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=2, logprobs=False, frequency_penalty=0, presence_penalty=0,
        tool_choice="none", tools=[{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}],
        response_format={"type": "text"},
    )
    assert reply.choices[0].finish_reason in {"stop", "length"}
    # n > 1 with the largest seed: the second choice's seed wraps instead of overflowing
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, n=2, seed=2**63 - 1,
                                           temperature=1.0)
    assert len(reply.choices) == 2


LORA_PROMPTS = ["Mia has 23 apples. She buys 45 more. How many apples does she have now?", "What is 12 + 7?"]


@pytest.fixture(scope="module")
def lora_expected(tokenizer, lora_adapter):
    """{model: greedy 12-token completions of LORA_PROMPTS}: the merged model's for ADAPTER, the plain
    model's for MODEL, generated in-process."""
    from r1.config import SamplingConfig
    from r1.engine import TransformersEngine
    from r1.model import load_model

    sampling = SamplingConfig(temperature=0, max_new_tokens=12, ignore_eos=True)
    plain, _ = load_model(ModelConfig(model=MODEL, device="cpu", dtype="fp32"))
    expected = {model: [c.text for c in TransformersEngine(weights, tokenizer).generate_batch(LORA_PROMPTS, sampling)]
                for model, weights in ((ADAPTER, lora_adapter[1]), (MODEL, plain))}
    assert expected[ADAPTER][0] != expected[MODEL][0]
    return expected


@pytest.mark.parametrize("stream", [False, True])
def test_a_lora_adapter_answers_as_its_merged_model_and_the_base_as_before(server, client, lora_expected, stream):
    """`model` picks the adapter; its greedy answer is the merged model's (generated in-process),
    the base model's is the plain model's, and each answer names the model asked for."""
    prompt = LORA_PROMPTS[0]
    expected = {model: texts[0] for model, texts in lora_expected.items()}
    for model in (ADAPTER, MODEL):
        kwargs = dict(model=model, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        if stream:
            chunks = list(client.completions.create(**kwargs, stream=True))
            text, named = "".join(c.choices[0].text for c in chunks if c.choices), {c.model for c in chunks}
        else:
            reply = client.completions.create(**kwargs)
            text, named = reply.choices[0].text, {reply.model}
        assert (text, named) == (expected[model], {model})
    chat = client.chat.completions.create(model=ADAPTER, messages=MESSAGES, max_tokens=4)
    assert chat.model == ADAPTER and chat.usage.completion_tokens == 4
    response = httpx.post(f"{server}/v1/responses", json={"model": ADAPTER, "input": "1 + 1 =", "max_output_tokens": 4,
                                                          "store": False},
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert response.status_code == 200 and response.json()["model"] == ADAPTER


def test_adapter_and_base_requests_sent_at_once_answer_as_each_alone(server, lora_expected):
    """Six greedy completions at once, half for the adapter and half for the base model, over the
    LLM server replicas (whose batches then mix adapters): each is what its model answers alone.
    (Six: what one replica's engine takes, 4 running and 2 queued, should they all go to one.)"""
    sent = [(ADAPTER, 0), (MODEL, 0), (ADAPTER, 1), (MODEL, 1), (ADAPTER, 0), (MODEL, 1)]

    async def main():
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as http:
            return await asyncio.gather(*(http.post(f"{server}/v1/completions", json={
                "model": model, "prompt": LORA_PROMPTS[prompt], "max_tokens": 12, "temperature": 0, "ignore_eos": True})
                for model, prompt in sent))

    responses = asyncio.run(asyncio.wait_for(main(), timeout=300))
    assert [r.status_code for r in responses] == [200] * len(sent), [r.text for r in responses]
    assert [(r.json()["model"], r.json()["choices"][0]["text"]) for r in responses] == [
        (model, lora_expected[model][prompt]) for model, prompt in sent]


def test_model_retrieve_and_unknown_routes_answer_openai_style(server, client):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-17")
    assert missing.value.body["code"] == "model_not_found"
    auth = {"Authorization": f"Bearer {KEY}"}
    for method, path, status in (("POST", "/v1/embeddings", 404), ("GET", "/v1/chat/completions", 405)):
        response = httpx.request(method, f"{server}{path}", headers=auth, timeout=30)
        assert response.status_code == status
        assert response.json()["error"]["message"]
    # retrieving a model needs a key like every model route
    assert httpx.get(f"{server}/v1/models/{MODEL}", timeout=30).status_code == 401


def test_overload_is_a_fast_503_not_a_hang(server):
    # 2 replicas x (4 running + 2 queued) engine slots; 24 long requests at once overflow them.
    async def main():
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as http:
            body = {"model": MODEL, "prompt": "1", "max_tokens": 200, "temperature": 0}
            return await asyncio.gather(*(http.post(f"{server}/v1/completions", json=body) for _ in range(24)))

    responses = asyncio.run(asyncio.wait_for(main(), timeout=300))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429, 503}, codes
    assert codes.count(200) >= 2
    assert any(c in (429, 503) for c in codes), codes
    refused = [r for r in responses if r.status_code != 200]
    assert all(r.json()["error"]["code"] for r in refused)


def _llm_totals() -> dict[str, int]:
    """The main app's LLM servers' engine counts ("running", "aborted"), summed over every replica.
    The stats calls go out together until each running replica has answered: sent one after another
    they would mostly reach the same replica (Serve routes to the one with fewer calls in progress,
    and a streaming request counts as one), and could miss the replica holding a request."""
    handle = serve.get_deployment_handle("LLMServer", app_name="main")
    replicas = serve.status().applications["main"].deployments["LLMServer"].replica_states.get("RUNNING", 0)
    by_replica: dict[str, dict] = {}
    deadline = time.monotonic() + 30
    while len(by_replica) < replicas and time.monotonic() < deadline:
        for response in [handle.stats.remote() for _ in range(4 * replicas)]:
            stats = response.result(timeout_s=30)
            by_replica[stats["replica"]] = stats
    assert len(by_replica) >= replicas > 0, f"heard from {len(by_replica)} of {replicas} LLMServer replicas"
    return {key: sum(stats[key] for stats in by_replica.values()) for key in ("running", "aborted")}


def replica_pids(title: str) -> list[int]:
    """Processes on this machine whose title (Ray sets it to ray::<actor>) is `title`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:  # the process ended meanwhile
                continue
            rest = command.strip()[len(title):] if command.startswith(title) else None
            if rest == "" or (rest and rest.startswith(".")):  # idle, or running one of its methods
                pids.append(int(entry.name))
    return pids


def test_ingress_single_loop_reaches_only_the_ingress_replicas(server):
    # The setting must arrive in the replica process's environment (Serve reads it at start-up),
    # for the ingress only: the LLM server keeps Serve's separate user-code thread.
    def environment(app: str, deployment: str) -> dict[str, str]:
        [pid] = replica_pids(f"ray::ServeReplica:{app}:{deployment}")  # one replica each in these apps
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)

    flag, router = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"
    assert environment("failclosed", "OpenAIIngress").get(flag) == "0"  # the default: on
    assert environment("failclosed", "OpenAIIngress").get(router) == "0"
    assert flag not in environment("failclosed", "LLMServer")
    assert flag not in environment("strict", "OpenAIIngress")  # ingress_single_loop: false


def test_llm_server_cpu_threads_warm_up_and_packed_layers(server, tiny):
    # Ray sets a fractional-CPU replica's OMP_NUM_THREADS to 1; engine.cpu_threads overrides it.
    def stats(app: str) -> dict:
        return serve.get_deployment_handle("LLMServer", app_name=app).stats.remote().result(timeout_s=30)

    assert stats("main")["cpu_threads"] == 1
    assert stats("strict")["cpu_threads"] == 2
    # Each replica ran the engine's warm-up before it took requests (the time it took, measured).
    assert all(stats(app)["warmup_s"] > 0 for app in ("main", "strict"))
    # engine.prepack: auto packed every Linear layer of the CPU model, the LM head included, and left
    # the sharded engine's shards alone.
    linears = sum(isinstance(module, torch.nn.Linear) for module in tiny[0].modules())
    assert stats("main")["packed_linears"] == stats("strict")["packed_linears"] == linears > 1
    assert stats("sharded")["packed_linears"] == 0


def test_llm_server_stream_starts_with_the_first_delta(server):
    # The start item (prompt size, template flag) carries the first token's delta: a 1-token
    # generation is one item, a longer one has its remaining tokens in delta items after it.
    handle = serve.get_deployment_handle("LLMServer", app_name="main").options(stream=True)

    def items(max_tokens: int) -> list[dict]:
        sampling = SamplingConfig(temperature=0.0, max_new_tokens=max_tokens, ignore_eos=True).model_dump()
        body = {"prompt": "1 + 1 =", "chat": False, "sampling": sampling, "request_id": f"probe-{max_tokens}"}

        async def collect() -> list[dict]:
            return [item async for item in handle.stream.remote(body)]

        return asyncio.run(asyncio.wait_for(collect(), timeout=60))

    (only,) = items(1)
    assert only["type"] == "start" and only["num_tokens"] == 1 and only["finish_reason"] == "length"
    assert only["prompt_tokens"] > 0 and isinstance(only["think_prefilled"], bool) and only["text"]
    first, *rest = items(6)
    assert first["type"] == "start" and first["num_tokens"] == 1 and first["finish_reason"] is None
    assert rest and [item["type"] for item in rest] == ["delta"] * len(rest) and rest[-1]["finish_reason"] == "length"
    assert sum(item["num_tokens"] for item in [first, *rest]) == 6


def test_client_disconnect_cancels_generation(server):
    body = {"model": MODEL, "prompt": "1", "max_tokens": 900, "temperature": 0, "stream": True}
    deadline = time.monotonic() + 60
    while (before := _llm_totals())["running"] and time.monotonic() < deadline:  # earlier tests' requests
        time.sleep(0.5)
    aborted = before["aborted"]
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as http:
        with http.stream("POST", f"{server}/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            for _ in range(3):
                next(lines)
            assert _llm_totals()["running"] >= 1
    deadline = time.monotonic() + 60
    while _llm_totals()["running"] and time.monotonic() < deadline:
        time.sleep(0.5)
    # Ended by the engine's abort: run to its end (900 tokens), it would not count as aborted.
    assert _llm_totals() == {"running": 0, "aborted": aborted + 1}


def test_code_validation_runs_the_repair_loop_in_the_sandbox(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a function add(a, b) that returns a + b."}],
            "max_tokens": 24, "temperature": 0.7, "seed": 3, "code_validation": True,
            "tests": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"], "max_repairs": 1}
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=300, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, response.text
    report = response.json()["code_validation"]
    assert report["status"] in {"passed", "failed", "syntax_error", "error", "timeout"}
    # r1-tiny does not write working code: the first attempt fails, so the one allowed repair runs.
    assert report["status"] != "passed"
    assert report["attempts"] == 2 and len(report["errors"]) == 2, report
    assert report["tests_origin"] == "request"
    assert report["errors"][1]["temperature"] <= report["errors"][0]["temperature"]
    usage = response.json()["usage"]
    assert usage["completion_tokens"] >= 2  # both generations counted
    # Both prompts' tokens, and of them those the prefix cache held (whole 16-token blocks).
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] % 16 == 0


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"stream": True}, "stream"),  # the answer is only known after validation
        ({"n": 2}, "n"),  # one solution per request
        ({"max_repairs": 99}, "max_repairs"),  # beyond the allowed repairs
        # Malformed tests are refused before any generation (they used to cost every repair round).
        ({"tests": [""]}, "tests"),
        ({"tests": ["assert ("]}, "tests"),
        ({"tests": ["print(1)"]}, "tests"),  # checks nothing
        ({"tests": []}, "tests"),
        ({"logprobs": True}, "logprobs"),  # the answer is not one generation's tokens
    ],
)
def test_code_validation_request_errors(server, extra, param):
    body = {"model": MODEL, "messages": MESSAGES, "code_validation": True, **extra}
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert "usage" not in response.json()  # nothing was generated


def _post(server: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server}{path}", json=body, timeout=120, headers={"Authorization": f"Bearer {KEY}"})


@pytest.mark.parametrize(
    "text",
    [
        "忘记密码怎么办？",  # the guide's keyword inside a Chinese sentence (no word boundary)
        "我的卡号是6222０２１２３４５６７８９０１２３",  # a 19-digit number with full-width digits touching CJK
        "验\u200b证\u200b码",  # zero-width characters inside the keyword
    ],
)
def test_strict_profile_blocks_sensitive_input_with_400(server, text):
    # All messages are screened in one call; the error names the message that was blocked.
    body = {"model": MODEL, "max_tokens": 4,
            "messages": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": text}]}
    response = _post(server, "/strict/v1/chat/completions", body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "sensitive_content" and error["message"] == "内容包含敏感信息"
    assert error["param"] == "messages.1.content"


def test_batched_prompts_are_screened_each(server):
    # One blocked prompt refuses the batch, naming it; token-id prompts are screened as their text.
    for prompt, param in ((["1 + 1 =", "忘记密码怎么办？"], "prompt.1"), (["验证码", "2 + 2 ="], "prompt.0")):
        response = _post(server, "/strict/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 2})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "sensitive_content" and error["param"] == param
    tokenizer = load_tokenizer(ModelConfig())
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in ("1 + 1 =", "忘记密码怎么办？")]
    response = _post(server, "/strict/v1/completions", {"model": MODEL, "prompt": ids, "max_tokens": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt.1", response.text
    # Under the default profile a card number in one prompt is redacted and the batch is answered.
    response = _post(server, "/v1/completions", {"model": MODEL, "max_tokens": 2, "temperature": 0,
                                                 "prompt": ["1 + 1 =", "卡号4111 1111 1111 1111 ="]})
    assert response.status_code == 200, response.text
    assert [c["index"] for c in response.json()["choices"]] == [0, 1]


def test_default_profile_redacts_input_before_the_model_and_the_session_store(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "我的卡号是4111 1111 1111 1111，帮我查一下"}],
            "max_tokens": 4}
    response = _post(server, "/v1/chat/completions", body)
    assert response.status_code == 200
    session_id = response.json()["session_id"]
    stored = httpx.get(f"{server}/v1/sessions/{session_id}", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    user = stored["messages"][0]["content"]
    assert "4111" not in user and "[已隐藏]" in user
    # Harmless mentions pass unchanged under the default profile.
    assert _post(server, "/v1/chat/completions", {"model": MODEL, "max_tokens": 2,
                 "messages": [{"role": "user", "content": "忘记密码怎么办？"}]}).status_code == 200


def test_streamed_output_is_screened(server, tiny):
    import re

    from r1.engine import TransformersEngine

    messages = [{"role": "user", "content": "Tom has 5 pens. He buys 17 more. How many pens does he have now?"}]
    model, tokenizer = tiny
    unscreened = TransformersEngine(model, tokenizer).generate_batch([messages], SamplingConfig(temperature=0, max_new_tokens=40))[0].text
    body = {"model": MODEL, "messages": messages, "max_tokens": 40, "temperature": 0, "stream": True}
    text = _streamed_text(server, "/strict/v1/chat/completions", body,
                          lambda choice: (choice["delta"].get("reasoning_content") or "") + (choice["delta"].get("content") or ""))
    assert not re.search("[a-z]{2}", text.replace("[已隐藏]", ""))
    if re.search("[a-z]{2}", unscreened):
        assert "[已隐藏]" in text


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_leave_out_the_tokens_of_redacted_text(server, tiny, stream):
    # The strict app redacts any two lowercase letters in the output: the tokens of redacted text
    # have no logprob entry (their names would show what was redacted), the others keep theirs.
    import re

    messages = [{"role": "user", "content": "Tom has 5 pens. He buys 17 more. How many pens does he have now?"}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 40, "temperature": 0, "stream": stream,
            "logprobs": True, "top_logprobs": 2}
    entries, visible = [], ""
    if stream:
        with httpx.stream("POST", f"{server}/strict/v1/chat/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {KEY}"}) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        delta = choice["delta"]
                        visible += (delta.get("reasoning_content") or "") + (delta.get("content") or "")
                        entries += (choice["logprobs"] or {"content": []})["content"]
    else:
        response = _post(server, "/strict/v1/chat/completions", body)
        assert response.status_code == 200, response.text
        message = response.json()["choices"][0]["message"]
        visible = (message["reasoning_content"] or "") + (message["content"] or "")
        entries = response.json()["choices"][0]["logprobs"]["content"]
    from r1.config import SafetyConfig
    from r1.safety import SafetyFilter

    tokenizer = load_tokenizer(ModelConfig())
    generated = _in_process_logprobs(tiny, messages, 40, 2)
    # Where each token's text lies in the unscreened reply, and what the app's rules find in it.
    verdict = SafetyFilter(SafetyConfig(profile="strict", rules=[LETTERS_RULE, EQUALS_RULE])).check(
        tokenizer.decode([e.token_id for e in generated], skip_special_tokens=True), "output")
    assert verdict.action == "redact" and "[已隐藏]" in visible  # the case this test is about
    kept, start = [], 0
    for entry in generated:
        end = start + entry.chars
        if not any(f.start < max(end, start + 1) and start < f.end for f in verdict.findings):
            kept.append(tokenizer.decode([entry.token_id]))
        start = end
    tokens = [e["token"] for e in entries]
    assert 0 < len(tokens) < len(generated)
    assert not any(re.search("[a-z]{2}", t) for t in tokens if t not in tokenizer.all_special_tokens), (tokens, visible)
    # Exactly the tokens of text the filter passed unchanged are listed, in order.
    assert tokens == kept, (tokens, visible)


@pytest.mark.parametrize("stream", [False, True])
def test_completion_output_is_screened_with_the_end_of_its_prompt(server, tiny, stream):
    from r1.config import SafetyConfig
    from r1.engine import TransformersEngine
    from r1.safety import SafetyFilter

    prompt = "23 + 45 ="
    model, tokenizer = tiny
    unscreened = TransformersEngine(model, tokenizer).generate_batch([prompt], SamplingConfig(temperature=0, max_new_tokens=6))[0].text
    rules = SafetyFilter(SafetyConfig(profile="strict", rules=[LETTERS_RULE, EQUALS_RULE]))
    expected = "".join(_screened(rules.stream("output", context=prompt), unscreened))
    # The case this test is about: the prompt's "=" and the output's digit make the finding.
    assert expected != "".join(_screened(rules.stream("output"), unscreened)), unscreened
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": stream}
    if stream:
        text = _streamed_text(server, "/strict/v1/completions", body, lambda choice: choice["text"])
    else:
        response = _post(server, "/strict/v1/completions", body)
        assert response.status_code == 200, response.text
        text = response.json()["choices"][0]["text"]
    assert text == expected and text.startswith(rules.redaction_text)


@pytest.mark.parametrize("stream", [False, True])
def test_echo_opens_the_completion_with_its_prompt_screened_as_output(server, client, tiny, stream):
    from r1.config import SafetyConfig
    from r1.engine import TransformersEngine
    from r1.safety import SafetyFilter

    model, tokenizer = tiny
    greedy = {"max_tokens": 6, "temperature": 0}

    def text_of(path_prefix: str, prompt) -> str:
        body = {"model": MODEL, "prompt": prompt, "echo": True, "stream": stream, **greedy}
        if stream:
            return _streamed_text(server, f"{path_prefix}/v1/completions", body, lambda choice: choice["text"])
        response = _post(server, f"{path_prefix}/v1/completions", body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    prompt = "12 + 7 ="
    plain = client.completions.create(model=MODEL, prompt=prompt, **greedy).choices[0].text
    assert text_of("", prompt) == prompt + plain
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    plain_ids = client.completions.create(model=MODEL, prompt=ids, **greedy).choices[0].text
    assert text_of("", ids) == tokenizer.decode(ids) + plain_ids
    # Output-only rules see the echoed prompt too: the strict app's letters rule (input: off) redacts
    # "ab" in the echo as it would in generated text.
    prompt = "ab 23 + 45 ="
    engine = TransformersEngine(model, tokenizer)
    try:
        unscreened = engine.generate_batch([prompt], SamplingConfig(temperature=0, max_new_tokens=6))[0].text
    finally:
        engine.shutdown()
    rules = SafetyFilter(SafetyConfig(profile="strict", rules=[LETTERS_RULE, EQUALS_RULE]))
    expected = "".join(_screened(rules.stream("output"), prompt + unscreened))
    assert not expected.startswith("ab") and text_of("/strict", prompt) == expected


def _screened(stream, text: str) -> list[str]:
    return [stream.feed(text), stream.flush()]


def _streamed_text(server: str, path: str, body: dict, text_of) -> str:
    """POST a streaming request; the concatenated `text_of(choice)` of every chunk's choices."""
    text = ""
    with httpx.stream("POST", f"{server}{path}", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                text += "".join(text_of(choice) for choice in json.loads(line[6:])["choices"])
    return text


@pytest.mark.parametrize("stream", [False, True])
def test_safety_filter_that_cannot_answer_fails_closed(server, stream):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "stream": stream}
    response = _post(server, "/failclosed/v1/chat/completions", body)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "safety_unavailable"
    assert "choices" not in response.text


def test_a_prompt_beyond_the_context_is_refused_before_it_is_screened(server):
    # ~1900 tokens of digits against r1-tiny's 1024: a 400 from the ingress, not the 503 of the
    # fail-closed app's filter (screening such text costs time in proportion to it, for nothing).
    body = {"model": MODEL, "prompt": "1 " * 1900, "max_tokens": 1}
    response = _post(server, "/failclosed/v1/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "prompt")
    assert "more than the model's context of 1024 tokens" in error["message"]


def test_a_chunked_body_over_the_limit_is_413_without_reading_it_all(server):
    # No Content-Length: the ingress stops reading once the body passes max_request_bytes (4096 here).
    def chunks():
        yield b'{"model": "r1-tiny", "prompt": "'
        for _ in range(200):
            yield b"x" * 1000
    response = httpx.post(f"{server}/v1/completions", content=chunks(), timeout=60,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert _post(server, "/v1/completions", {"model": MODEL, "prompt": "1 + 1 =", "max_tokens": 2}).status_code == 200


TRACEPARENT_TRACE_ID, TRACEPARENT_SPAN_ID = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


def spans_of(trace_file, trace_id: str, expected: set[str], timeout_s: float = 60.0) -> list[dict]:
    """The trace's spans once all `expected` names are in the file (spans are written as they end)."""
    deadline = time.monotonic() + timeout_s
    while True:
        spans = [s for s in read_spans(trace_file) if s["trace_id"] == trace_id] if trace_file.exists() else []
        missing = expected - {s["name"] for s in spans}
        if not missing:
            return spans
        assert time.monotonic() < deadline, f"spans never written: {sorted(missing)}; have {sorted({s['name'] for s in spans})}"
        time.sleep(0.5)


def test_one_chat_request_is_one_trace_across_processes(server, trace_file):
    # The sharded app: ingress, input/output safety, session store, LLM server and two model shards.
    # The request names a session (a new one of the client's), so the session is opened as well as
    # stored; a request that names none meets the store only to store its turn.
    traceparent = f"00-{TRACEPARENT_TRACE_ID}-{TRACEPARENT_SPAN_ID}-01"
    response = httpx.post(f"{server}/sharded/v1/chat/completions", timeout=120,
                          headers={"Authorization": f"Bearer {KEY}", "traceparent": traceparent},
                          json={"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "temperature": 0,
                                "session_id": f"traced-{uuid.uuid4().hex}"})
    assert response.status_code == 200, response.text
    assert response.headers["x-trace-id"] == TRACEPARENT_TRACE_ID  # the caller's trace is continued
    expected = {"request", "safety.check", "session.open", "session_store.open", "llm.generate",
                "model_shard.generate", "session.append", "session_store.append"}
    spans = spans_of(trace_file, TRACEPARENT_TRACE_ID, expected)
    by_id = {s["span_id"]: s for s in spans}
    named = lambda name: [s for s in spans if s["name"] == name]  # noqa: E731
    (request,) = named("request")
    assert request["parent_id"] == TRACEPARENT_SPAN_ID
    # Every other span hangs off a span of this trace: one tree, no orphans.
    assert all(s["parent_id"] in by_id for s in spans if s is not request), [
        (s["name"], s["parent_id"]) for s in spans if s is not request and s["parent_id"] not in by_id]
    (generate,) = named("llm.generate")
    assert generate["parent_id"] == request["span_id"]
    shards = named("model_shard.generate")
    assert sorted(s["attributes"]["stage_index"] for s in shards) == [0, 1]
    assert all(s["parent_id"] == generate["span_id"] for s in shards)
    assert by_id[named("session_store.append")[0]["parent_id"]]["name"] == "session.append"
    assert {s["attributes"]["direction"] for s in named("safety.check")} >= {"input"}
    # At least ingress, safety filter, session store, LLM server and both shards: six processes.
    pids = {s["pid"] for s in spans}
    assert len(pids) >= 6, sorted((s["name"], s["pid"]) for s in spans)
    assert len({generate["pid"], *(s["pid"] for s in shards), request["pid"]}) == 4
    # No prompt or completion text in the spans by default.
    assert "apples" not in trace_file.read_text()


def test_a_request_without_traceparent_starts_its_own_trace(server, client, trace_file):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0)
    trace_id = raw.headers["x-trace-id"]
    assert len(trace_id) == 32 and trace_id != TRACEPARENT_TRACE_ID
    spans = spans_of(trace_file, trace_id, {"request", "llm.generate", "session_store.append"})
    (request,) = [s for s in spans if s["name"] == "request"]
    assert request["parent_id"] is None and request["attributes"]["route"] == "chat"
    # No session named: none is opened; the turn's append creates it.
    assert "session.open" not in {s["name"] for s in spans}
    (append,) = [s for s in spans if s["name"] == "session_store.append"]
    assert append["attributes"]["create"] is True and append["attributes"]["stored"] is True


def test_other_routes_continue_the_callers_trace(server, trace_file):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    response = httpx.get(f"{server}/v1/models", timeout=60,
                         headers={"Authorization": f"Bearer {KEY}", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    assert response.status_code == 200 and response.headers["x-trace-id"] == trace_id
    (request,) = spans_of(trace_file, trace_id, {"request"})
    assert request["attributes"] == {"route": "models", "http.status_code": 200}
    # An unsampled caller: nothing is recorded for its request, by any hop (each hop used to start
    # a trace of its own). A sampled request sent right after it shows when the writes are in.
    hops = {"safety.check", "llm.generate", "session.append"}
    roots_before = {s["span_id"] for s in read_spans(trace_file) if s["parent_id"] is None}
    unsampled, marker = "5bf92f3577b34da6a3ce929d0e0e4736", "6bf92f3577b34da6a3ce929d0e0e4736"
    for trace, flags in ((unsampled, "00"), (marker, "01")):
        response = httpx.post(f"{server}/v1/chat/completions", timeout=120,
                              headers={"Authorization": f"Bearer {KEY}", "traceparent": f"00-{trace}-00f067aa0ba902b7-{flags}"},
                              json={"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "temperature": 0})
        assert response.status_code == 200 and response.headers["x-trace-id"] == trace
    spans_of(trace_file, marker, hops)
    assert unsampled not in trace_file.read_text()
    new_roots = [s["name"] for s in read_spans(trace_file) if s["parent_id"] is None and s["span_id"] not in roots_before]
    assert not hops & set(new_roots), new_roots


def scrape(port: int) -> dict[str, list[tuple[dict, float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    found: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def total(series: dict, name: str, **labels: str) -> float:
    return sum(v for found, v in series.get(name, []) if all(found.get(k) == w for k, w in labels.items()))


def test_real_requests_show_up_in_the_prometheus_export(server, client, metrics_port):
    # The tests above sent chat, completion, streaming, session, safety and code-validation requests.
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0)
    checks = {
        "chat requests": lambda s: total(s, "ray_r1_requests_total", route="chat", status="200") >= 1,
        "4xx counted by status": lambda s: total(s, "ray_r1_requests_total", status="400") >= 1,
        "e2e latency": lambda s: total(s, "ray_r1_e2e_seconds_count", route="chat") >= 1,
        "ttft": lambda s: total(s, "ray_r1_ttft_seconds_count", route="chat") >= 1,
        "tpot": lambda s: total(s, "ray_r1_tpot_seconds_count") >= 1,
        "tokens out": lambda s: total(s, "ray_r1_tokens_total", direction="out") > 0,
        "tokens in": lambda s: total(s, "ray_r1_tokens_total", direction="in") > 0,
        # test_a_lora_adapter_answers_as_its_merged_model… asked the adapter: its tokens under its name
        "tokens by model": lambda s: total(s, "ray_r1_tokens_total", direction="out", model=ADAPTER) > 0
                                     and total(s, "ray_r1_tokens_total", direction="out", model=MODEL) > 0,
        "queue gauge": lambda s: "ray_r1_queue_depth" in s and "ray_r1_running_requests" in s,
        "safety findings by rule id": lambda s: total(s, "ray_r1_safety_findings_total", rule_id="test_letters") >= 1,
        "sandbox runs": lambda s: total(s, "ray_r1_sandbox_runs_total") >= 1,
        "stored session turns": lambda s: total(s, "ray_r1_sessions_turns_total", outcome="stored") >= 1,
        "llm memory ratio": lambda s: 0 < total(s, "ray_r1_memory_utilization_ratio", component="llm_server") < 10,
        "models route": lambda s: total(s, "ray_r1_requests_total", route="models", status="200") >= 1,
        # test_tool_calls_over_http made calls with a named function and with "required"
        "tool calls by mode": lambda s: total(s, "ray_r1_tool_calls_total", route="chat", mode="named") >= 2
                                        and total(s, "ray_r1_tool_calls_total", route="chat", mode="required") >= 1,
        # test_client_disconnect_cancels_generation left a stream early: not counted as a success
        "a client that left a stream": lambda s: total(s, "ray_r1_requests_total", route="completions",
                                                       status="499") >= 1,
    }
    deadline = time.monotonic() + 120  # workers push their metrics to the node's exporter every few seconds
    while True:
        series = scrape(metrics_port)
        failing = [name for name, check in checks.items() if not check(series)]
        if not failing:
            break
        assert time.monotonic() < deadline, f"not in the export after 120 s: {failing}"
        time.sleep(2)
    # Sane values: latencies are positive and no larger than the test's own timeouts.
    e2e_sum = total(series, "ray_r1_e2e_seconds_sum", route="chat")
    assert 0 < e2e_sum / total(series, "ray_r1_e2e_seconds_count", route="chat") < 300


def test_a_dead_model_shard_fails_requests_fast_and_marks_its_replica_unhealthy(server):
    # Last in the module: it breaks the sharded app. A killed ModelShard used to leave its requests
    # in the scheduler, which failed on them at every step (a busy loop logging each failure) while
    # new requests waited for their slots until the ingress timed them out.
    import os
    import signal

    import ray

    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "prompt": "1 + 1 =", "max_tokens": 4, "temperature": 0}
    assert httpx.post(f"{server}/sharded/v1/completions", json=body, headers=headers, timeout=120).status_code == 200
    shards = replica_pids("ray::ModelShard")  # only the sharded app has shards
    assert len(shards) == 2
    os.kill(shards[1], signal.SIGKILL)
    handle = serve.get_deployment_handle("LLMServer", app_name="sharded")
    deadline = time.monotonic() + 60
    while True:  # the replica notices the shard is gone on its next call to it
        try:
            handle.check_health.remote().result(timeout_s=30)
        except (ray.exceptions.RayError, RuntimeError) as error:
            assert "ModelShard" in str(error) or "actor" in str(error).lower(), error
            break
        assert time.monotonic() < deadline, "the replica still reports healthy with a dead shard"
        time.sleep(0.5)
    # Refused, again and again, within the client's deadline: not queued behind requests that can
    # never finish (those used to wait for the ingress's 300 s request timeout).
    for _ in range(3):
        response = httpx.post(f"{server}/sharded/v1/completions", json=body, headers=headers, timeout=30)
        assert response.status_code == 503, response.text
    # Streamed too: the generation fails at its first token, before any body, so the status says so
    # (not a 200 whose stream then carries the error).
    response = httpx.post(f"{server}/sharded/v1/completions", json={**body, "stream": True}, headers=headers, timeout=30)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "unavailable", response.text
    assert serve.get_deployment_handle("LLMServer", app_name="sharded").stats.remote().result(timeout_s=30)["running"] == 0
