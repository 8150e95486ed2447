"""Dialog sessions over real HTTP: the 10-message window, history, ownership, failures, restarts."""

from __future__ import annotations

import asyncio
import json
import itertools
import time
import uuid

import httpx
import openai
import pytest
import ray
from ray import serve

from actors.session_store import ACTOR_NAME_PREFIX, SessionClient, stop_session_actors
from cluster.serve.app import build_app
from r1.config import ModelConfig, SessionConfig
from r1.model import load_tokenizer
from tests.serve_helpers import (
    answer_at_once, free_port, ray_serve, redis_server, small_deployment, wait_for, wait_http_ok,
)

KEY, OTHER_KEY = "session-key-a", "session-key-b"
BLOCKED_WORD = "forbidden-word"
MODEL = "r1-tiny"


def app_config(keys_file, backend_url: str) -> dict:
    return {
        "api_keys_file": str(keys_file),
        "ingress": small_deployment(min_replicas=1, max_replicas=1),
        "llm": small_deployment(min_replicas=1, max_replicas=1, num_cpus=0.1),
        "sessions": {"backend_url": backend_url, "num_partitions": 2, "call_timeout_s": 120},
        # One filter replica and no sandbox: fewer processes to start on each of this module's deploys.
        "safety": {"deployment": small_deployment(min_replicas=1, max_replicas=1, num_cpus=0.02),
                   # input screening that refuses a turn (the default profile only redacts)
                   "rules": [{"id": "test_refusal", "kind": "keyword", "keywords": [BLOCKED_WORD],
                              "input": "block", "output": "redact"}]},
        "code_validator": None,
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sessions")
    keys = tmp / "keys.txt"
    keys.write_text(f"{KEY}\n{OTHER_KEY}\n")
    port = free_port()
    with ray_serve(port):
        yield {"tmp": tmp, "keys": keys, "base": f"http://127.0.0.1:{port}"}


def deploy(env, backend_url: str) -> str:
    """The app on `backend_url`; tests on the same backend share one deployment (each takes seconds)."""
    if env.get("backend") != backend_url:
        serve.run(build_app(app_config(env["keys"], backend_url)), name="sessions", route_prefix="/")
        env["backend"] = backend_url
    wait_http_ok(f"{env['base']}/health")
    return env["base"]


def restart(env, backend_url: str) -> str:
    """Take the whole app down (Serve app and the detached SessionStore actors) and deploy again."""
    serve.delete("sessions")
    assert stop_session_actors(SessionConfig().namespace) >= 1
    env.pop("backend", None)
    return deploy(env, backend_url)


def shared_backend(env) -> str:
    """One SQLite store for the tests that need no fresh app; each uses its own sessions."""
    return f"sqlite:///{env['tmp']}/shared.db"


def session_actor_names() -> list[str]:
    return [entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
            if entry["name"].startswith(ACTOR_NAME_PREFIX)]


def client(base: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def turn(api: openai.OpenAI, text: str, session_id: str | None):
    extra = {"session_id": session_id} if session_id else {}
    raw = api.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=6, temperature=0, extra_body=extra
    )
    return raw.headers.get("x-session-id"), raw.parse()


def history(base: str, session_id: str, key: str = KEY) -> httpx.Response:
    return httpx.get(f"{base}/v1/sessions/{session_id}", headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_window_of_ten_history_and_ownership(env):
    base = deploy(env, shared_backend(env))
    api = client(base)
    tokenizer = load_tokenizer(ModelConfig())
    session_id, reply = turn(api, "user message 1", None)
    assert session_id and reply.model_dump()["session_id"] == session_id
    for i in range(2, 12):
        header_id, _ = turn(api, f"user message {i}", session_id)
        assert header_id == session_id
    stored = history(base, session_id).json()["messages"]
    assert len(stored) == 22
    # The 12th user message's prompt: exactly the 10 stored messages before it (exchanges 7-11) + itself.
    expected = [{"role": m["role"], "content": m["content"]} for m in stored[-10:]]
    assert expected[0] == {"role": "user", "content": "user message 7"}
    expected.append({"role": "user", "content": "user message 12"})
    prompt = tokenizer.apply_chat_template(expected, add_generation_prompt=True, tokenize=False)
    _, reply = turn(api, "user message 12", session_id)
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    assert len(history(base, session_id).json()["messages"]) == 24
    # Another key sees nothing of it, not even that it exists.
    assert history(base, session_id, key=OTHER_KEY).status_code == 404
    with pytest.raises(openai.NotFoundError):
        turn(client(base, OTHER_KEY), "hello", session_id)
    # The owner deletes it; then it is gone.
    deleted = httpx.delete(f"{base}/v1/sessions/{session_id}", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert history(base, session_id).status_code == 404


def test_bad_session_ids_are_400(env):
    base = deploy(env, shared_backend(env))
    for bad_id in ["../etc/passwd", "x" * 300, "has space", ""]:
        response = httpx.post(f"{base}/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "session_id": bad_id})
        assert response.status_code == 400, (bad_id, response.text)
        assert response.json()["error"]["param"] == "session_id", bad_id


def test_refused_turns_leave_no_session_and_streams_carry_the_new_id(env):
    import sqlite3

    base = deploy(env, shared_backend(env))
    database = env["tmp"] / "shared.db"

    def session_count() -> int:
        with sqlite3.connect(database) as connection:
            return connection.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]

    api = client(base)
    before = session_count()
    # Refused before the session is opened: a tool message naming no call. Refused after it was
    # opened: by the context (max_tokens beyond it). Refused while it is being opened (the open runs
    # alongside these checks): by the prompt's length and by the input screening. No id was handed
    # out, so nothing may stay: neither a new session of the server's (it is stored with its first
    # exchange only) nor one that the open created for a new id the client chose.
    refused = [
        ({"messages": [{"role": "tool", "content": "x"}]}, "invalid_value"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1020}, None),
        ({"messages": [{"role": "user", "content": "1 " * 2000}]}, "context_length_exceeded"),
        ({"messages": [{"role": "user", "content": f"say {BLOCKED_WORD}"}]}, "sensitive_content"),
    ]
    for (extra, code), named in itertools.product(refused, (False, True)):
        if named:
            extra = {**extra, "session_id": f"client-chosen-{uuid.uuid4().hex}"}
        response = httpx.post(f"{base}/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": MODEL, **extra})
        assert response.status_code == 400, response.text
        assert code is None or response.json()["error"]["code"] == code, response.text
    wait_for(lambda: session_count() == before, 30, "the refused turns' sessions to be removed")
    # A streamed turn that creates its session says its id in the stream too, not only in the header.
    stream = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                         stream=True, stream_options={"include_usage": True})
    ids = {chunk.model_dump().get("session_id") for chunk in stream} - {None}
    assert len(ids) == 1
    session_id = ids.pop()
    stored = history(base, session_id).json()["messages"]
    assert session_count() == before + 1
    # A refused turn on an existing session leaves it as it was: not removed, nothing stored.
    for extra in ({"content": f"say {BLOCKED_WORD}"}, {"content": "1 " * 2000}):
        response = httpx.post(f"{base}/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": MODEL, "session_id": session_id, "messages": [{"role": "user", **extra}]})
        assert response.status_code == 400, response.text
    time.sleep(1)  # a wrongful removal would run in the background after the answer
    assert history(base, session_id).json()["messages"] == stored
    assert session_count() == before + 1
    # The open's own errors still come after the checks': someone else's session is 404, but a
    # refused input on it is the refusal, as when the session was opened after the screening.
    def as_other(text: str) -> httpx.Response:
        return httpx.post(f"{base}/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {OTHER_KEY}"},
                          json={"model": MODEL, "session_id": session_id, "messages": [{"role": "user", "content": text}]})

    assert as_other("hi").status_code == 404
    response = as_other(f"say {BLOCKED_WORD}")
    assert response.status_code == 400 and response.json()["error"]["code"] == "sensitive_content", response.text


def test_concurrent_turns_on_one_session_are_all_stored(env):
    base = deploy(env, shared_backend(env))
    session_id, _ = turn(client(base), "first", None)

    async def main():
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as http:
            bodies = [{"model": MODEL, "messages": [{"role": "user", "content": f"parallel {i}"}], "max_tokens": 4,
                       "session_id": session_id} for i in range(4)]
            return await asyncio.gather(*(http.post(f"{base}/v1/chat/completions", json=b) for b in bodies))

    responses = asyncio.run(asyncio.wait_for(main(), timeout=300))
    assert [r.status_code for r in responses] == [200] * 4
    messages = history(base, session_id).json()["messages"]
    assert len(messages) == 2 + 4 * 2
    users = [m["content"] for m in messages if m["role"] == "user"]
    assert sorted(users[1:]) == [f"parallel {i}" for i in range(4)]
    # Each exchange is stored together: a user message is always followed by its reply.
    assert [m["role"] for m in messages] == ["user", "assistant"] * 5


def test_killed_session_actor_loses_nothing(env):
    backend = shared_backend(env)
    base = deploy(env, backend)
    api = client(base)
    session_id, _ = turn(api, "before the kill 1", None)
    turn(api, "before the kill 2", session_id)
    store = SessionClient(SessionConfig(backend_url=backend, num_partitions=2))
    ray.kill(store.actor_for(session_id), no_restart=False)
    turn(api, "after the kill", session_id)
    users = [m["content"] for m in history(base, session_id).json()["messages"] if m["role"] == "user"]
    assert users == ["before the kill 1", "before the kill 2", "after the kill"]


def test_sessions_survive_an_app_restart_sqlite(env):
    backend = shared_backend(env)
    base = deploy(env, backend)
    session_id, _ = turn(client(base), "remember me", None)
    base = restart(env, backend)
    # The new ingress started every partition's actor before serving a session request (a partition
    # first started by a request would cost that request seconds).
    wait_for(lambda: len(session_actor_names()) == 2, 60, "both SessionStore partition actors")
    messages = history(base, session_id).json()["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["remember me"]
    turn(client(base), "still here", session_id)
    assert len(history(base, session_id).json()["messages"]) == 4


@pytest.fixture
def redis_url(tmp_path):
    with redis_server("--appendonly", "yes", "--appendfsync", "always", "--dir", str(tmp_path)) as url:
        yield url


def test_sessions_survive_an_app_restart_redis(env, redis_url):
    base = deploy(env, redis_url)
    session_id, _ = turn(client(base), "stored in redis", None)
    base = restart(env, redis_url)
    messages = history(base, session_id).json()["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["stored in redis"]


def _prompt_tokens(tokenizer, messages: list[dict]) -> int:
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer.encode(prompt, add_special_tokens=False))


def test_stored_responses_continue_branch_and_survive_a_killed_store(env):
    # A Responses request is stored (store defaults to true) as a session named by its id: the whole
    # conversation with its answer. previous_response_id continues it: the model sees the earlier
    # input and answer (not the earlier instructions), and any stored response can be continued
    # again (a branch). The store's actor is killed in between: nothing is lost.
    backend = shared_backend(env)
    base = deploy(env, backend)
    api = client(base)
    tokenizer = load_tokenizer(ModelConfig())
    ask = {"model": MODEL, "max_output_tokens": 6, "temperature": 0}
    first = api.responses.create(**ask, input="What is 2 + 3?", instructions="Be brief.")
    assert first.store is True and first.previous_response_id is None
    ray.kill(SessionClient(SessionConfig(backend_url=backend, num_partitions=2)).actor_for(first.id), no_restart=False)
    asked = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": first.output_text}]
    second = api.responses.create(**ask, input="And 4 + 4?", previous_response_id=first.id)
    assert second.previous_response_id == first.id and second.store is True
    assert second.usage.input_tokens == _prompt_tokens(tokenizer, [*asked, {"role": "user", "content": "And 4 + 4?"}])
    # A branch from the first (streamed), and the chain from the second.
    branch = list(api.responses.create(**ask, input="And 5 + 5?", previous_response_id=first.id, stream=True))[-1].response
    assert branch.usage.input_tokens == _prompt_tokens(tokenizer, [*asked, {"role": "user", "content": "And 5 + 5?"}])
    chain = [*asked, {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": second.output_text}]
    chained = api.responses.create(**ask, input="And 1 + 1?", previous_response_id=second.id)
    assert chained.usage.input_tokens == _prompt_tokens(tokenizer, [*chain, {"role": "user", "content": "And 1 + 1?"}])
    # A stored conversation is a session: the owner can read it.
    assert history(base, second.id).json()["messages"] == chain
    assert history(base, branch.id).json()["messages"][-1] == {"role": "assistant", "content": branch.output_text}
    # The response objects are stored with them, as they were answered, streamed or not.
    for answered in (first, second, branch, chained):
        assert api.responses.retrieve(answered.id).model_dump() == answered.model_dump()
    # store: false keeps nothing; another key's response is not found, nor an id never given out.
    unsaved = api.responses.create(**ask, input="hi", store=False)
    assert unsaved.store is False
    for key, response_id in ((KEY, unsaved.id), (OTHER_KEY, first.id), (KEY, "resp-never-given-out")):
        with pytest.raises(openai.NotFoundError) as missing:
            client(base, key).responses.create(**ask, input="x", previous_response_id=response_id)
        assert missing.value.body["param"] == "previous_response_id"
        with pytest.raises(openai.NotFoundError) as missing:
            client(base, key).responses.retrieve(response_id)
        assert missing.value.body["param"] == "response_id"
    # A chat session is no response, whatever its id.
    session_id, _ = turn(api, "a chat turn", None)
    assert httpx.get(f"{base}/v1/responses/{session_id}", headers={"Authorization": f"Bearer {KEY}"},
                     timeout=30).status_code == 404
    # The owner deletes one: then it cannot be continued; its branches stay.
    headers = {"Authorization": f"Bearer {KEY}"}
    deleted = httpx.delete(f"{base}/v1/responses/{first.id}", headers=headers, timeout=30)
    assert deleted.status_code == 200 and deleted.json() == {"id": first.id, "object": "response", "deleted": True}
    assert httpx.delete(f"{base}/v1/responses/{first.id}", headers=headers, timeout=30).status_code == 404
    with pytest.raises(openai.NotFoundError):
        api.responses.create(**ask, input="x", previous_response_id=first.id)
    with pytest.raises(openai.NotFoundError):
        api.responses.retrieve(first.id)
    assert api.responses.create(**ask, input="x", previous_response_id=second.id).status == "incomplete"


def test_input_items_list_the_screened_input_a_page_at_a_time(env):
    # GET /v1/responses/{id}/input_items (the stock client's input_items.list): the request's own
    # input as items (not the instructions), newest first by default, pages by limit and after
    # (the client follows them); as the input screening let it through (a password redacted in the
    # store too); function_call and function_call_output items keep their call ids.
    base = deploy(env, shared_backend(env))
    api = client(base)
    arguments = '{"a": 2, "b": 3}'
    sent = [{"role": "user", "content": "What is 2 + 3? 我的密码是hunter2"},
            {"type": "function_call", "call_id": "call_7", "name": "add", "arguments": arguments},
            {"type": "function_call_output", "call_id": "call_7", "output": "5"},
            {"role": "assistant", "content": "It is 5."},
            {"role": "developer", "content": [{"type": "input_text", "text": "Answer in words."}]}]
    tools = [{"type": "function", "name": "add", "parameters": {"type": "object"}}]
    response = api.responses.create(model=MODEL, input=sent, instructions="Be brief.", tools=tools, max_output_tokens=4,
                                    temperature=0)
    listed = [item.model_dump() for item in api.responses.input_items.list(response.id, order="asc", limit=2)]
    assert [item["type"] for item in listed] == ["message", "function_call", "function_call_output", "message",
                                                 "message"]
    user, call, output, assistant, developer = listed
    assert "hunter2" not in user["content"][0]["text"] and user["content"][0]["text"].startswith("What is 2 + 3? 我的密码是")
    assert (user["role"], user["content"][0]["type"]) == ("user", "input_text")
    assert (call["call_id"], call["name"], json.loads(call["arguments"])) == ("call_7", "add", json.loads(arguments))
    assert (output["call_id"], output["output"]) == ("call_7", "5")
    assert (assistant["role"], assistant["content"][0]["type"], assistant["content"][0]["text"]) == (
        "assistant", "output_text", "It is 5.")
    assert (developer["role"], developer["content"][0]["text"]) == ("developer", "Answer in words.")
    assert len({item["id"] for item in listed}) == 5
    # The default order is newest first; a page says where it ends and whether more follow.
    headers = {"Authorization": f"Bearer {KEY}"}
    page = httpx.get(f"{base}/v1/responses/{response.id}/input_items", params={"limit": 2}, headers=headers,
                     timeout=30).json()
    assert [item["id"] for item in page["data"]] == [listed[4]["id"], listed[3]["id"]]
    assert (page["object"], page["first_id"], page["last_id"], page["has_more"]) == (
        "list", listed[4]["id"], listed[3]["id"], True)
    rest = httpx.get(f"{base}/v1/responses/{response.id}/input_items", params={"after": page["last_id"], "limit": 5},
                     headers=headers, timeout=30).json()
    assert [item["id"] for item in rest["data"]] == [item["id"] for item in listed[2::-1]] and not rest["has_more"]
    # A plain string input is one user message; a continued response lists its own input only.
    first = api.responses.create(model=MODEL, input="What is 4 + 4?", max_output_tokens=2)
    second = api.responses.create(model=MODEL, input="And 1 + 1?", previous_response_id=first.id, max_output_tokens=2)
    assert [item.content[0].text for item in api.responses.input_items.list(second.id)] == ["And 1 + 1?"]
    # Bad query parameters are 400s naming them; store: false, another key's and unknown ids are 404s.
    for params, param in (({"limit": 0}, "limit"), ({"limit": "x"}, "limit"), ({"order": "up"}, "order"),
                          ({"after": "msg-nope"}, "after"), ({"include": "x"}, "include")):
        answer = httpx.get(f"{base}/v1/responses/{response.id}/input_items", params=params, headers=headers, timeout=30)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text
    unsaved = api.responses.create(model=MODEL, input="hi", store=False, max_output_tokens=2)
    for key, response_id in ((KEY, unsaved.id), (OTHER_KEY, response.id), (KEY, "resp-never-given-out")):
        with pytest.raises(openai.NotFoundError) as missing:
            list(client(base, key).responses.input_items.list(response_id))
        assert missing.value.body["param"] == "response_id"


def test_a_long_chain_of_responses_stores_the_window_it_shows(env):
    # Each stored response keeps the window a continuation shows the model (the last 10 messages of
    # the conversation before it) and its own exchange: a chain's storage per response is bounded,
    # and what the model sees is unchanged by it.
    base = deploy(env, shared_backend(env))
    api = client(base)
    tokenizer = load_tokenizer(ModelConfig())
    conversation, previous = [], None
    for number in range(7):
        question = {"role": "user", "content": f"What is {number} + 1?"}
        response = api.responses.create(model=MODEL, input=question["content"], max_output_tokens=2, temperature=0,
                                        previous_response_id=previous)
        assert response.usage.input_tokens == _prompt_tokens(tokenizer, [*conversation[-10:], question])
        conversation += [question, {"role": "assistant", "content": response.output_text}]
        previous = response.id
    assert history(base, previous).json()["messages"] == conversation[-12:]


def test_a_stored_response_with_calls_is_continued_with_their_outputs(env):
    # The answer's calls are stored as the model writes them; the next request sends only the
    # function_call_output, which answers a call of the stored response (its id is not in this request).
    from r1.serving.tools import call_text, result_text, tool_plan, tools_prompt, with_tools_prompt

    base = deploy(env, shared_backend(env))
    api = client(base)
    tokenizer = load_tokenizer(ModelConfig())
    parameters = {"type": "object", "properties": {"a": {"enum": [23]}, "b": {"enum": [45]}}, "required": ["a", "b"],
                  "additionalProperties": False}
    tools = [{"type": "function", "name": "add", "parameters": parameters}]
    # Streamed, as agent loops ask: the stream's final response is stored with its call.
    called = list(api.responses.create(model=MODEL, input="What is 23 + 45?", tools=tools, max_output_tokens=48,
                                       temperature=0, tool_choice={"type": "function", "name": "add"}, stream=True,
                                       extra_body={"logit_bias": answer_at_once(tokenizer)}))[-1].response
    assert called.store is True
    call = next(item for item in called.output if item.type == "function_call")
    assert call.arguments == '{"a": 23, "b": 45}'
    assert api.responses.retrieve(called.id).model_dump() == called.model_dump()  # with its call
    answered = api.responses.create(model=MODEL, previous_response_id=called.id, tools=tools, max_output_tokens=4,
                                    input=[{"type": "function_call_output", "call_id": call.call_id, "output": "68"}])
    offered = tools_prompt(tool_plan([{"type": "function", "function": {"name": "add", "parameters": parameters}}],
                                     None, None))
    expected = with_tools_prompt([{"role": "user", "content": "What is 23 + 45?"},
                                  {"role": "assistant", "content": call_text("add", call.arguments)},
                                  {"role": "user", "content": result_text("68")}], offered)
    assert answered.usage.input_tokens == _prompt_tokens(tokenizer, expected)


def test_tool_calls_in_a_session(env):
    # A session keeps an agent's conversation: the answer's calls are stored as the model writes
    # them, the next turn sends only the tool's result (answering a call the session holds), and the
    # model sees the functions (sent again: system text is not stored), the history and the result.
    from r1.serving.tools import call_text, result_text, tool_plan, tools_prompt, with_tools_prompt

    base = deploy(env, shared_backend(env))
    api = client(base)
    tokenizer = load_tokenizer(ModelConfig())
    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"enum": [23]}, "b": {"enum": [45]}}, "required": ["a", "b"],
        "additionalProperties": False}}}]
    question = {"role": "user", "content": "What is 23 + 45?"}
    raw = api.chat.completions.with_raw_response.create(
        model=MODEL, messages=[question], tools=tools, tool_choice={"type": "function", "function": {"name": "add"}},
        max_tokens=48, temperature=0, logit_bias=answer_at_once(tokenizer))
    session_id, called = raw.headers.get("x-session-id"), raw.parse()
    call = called.choices[0].message.tool_calls[0]
    assert session_id and call.function.arguments == '{"a": 23, "b": 45}'
    assert history(base, session_id).json()["messages"] == [
        question, {"role": "assistant", "content": call_text("add", call.function.arguments)}]
    answered = api.chat.completions.create(model=MODEL, tools=tools, max_tokens=4, extra_body={"session_id": session_id},
                                           messages=[{"role": "tool", "tool_call_id": call.id, "content": "68"}])
    expected = with_tools_prompt([question, {"role": "assistant", "content": call_text("add", call.function.arguments)},
                                  {"role": "user", "content": result_text("68")}], tools_prompt(tool_plan(tools, None, None)))
    assert answered.usage.prompt_tokens == _prompt_tokens(tokenizer, expected)
    assert [m["role"] for m in history(base, session_id).json()["messages"]] == ["user", "assistant"] * 2
