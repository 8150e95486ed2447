"""SessionStore actors on a real local Ray: windowed multi-turn dialogs, failures, ownership, concurrency.

Every wait is bounded (the client's call deadline, thread joins). Redis cases use a real
`redis-server` started for this module. The last test shuts Ray down and starts it again.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import ray

from actors.session_store import SessionClient, actor_name, actor_options, stop_session_actors
from cluster.ray_start import init_ray
from r1.config import SessionConfig
from r1.serving.protocol import APIError
from tests.serve_helpers import free_port, redis_server

KEY_A, KEY_B = "key-id-a", "key-id-b"
CALL_TIMEOUT_S = 60.0  # generous: actor processes start slowly on a loaded 2-core machine


def user(i: int) -> dict[str, str]:
    return {"role": "user", "content": f"question {i}"}


def assistant(i: int) -> dict[str, str]:
    return {"role": "assistant", "content": f"answer {i}"}


def exchanges(first: int, last: int) -> list[dict[str, str]]:
    return [m for i in range(first, last + 1) for m in (user(i), assistant(i))]


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.fixture(scope="module")
def redis_url():
    with redis_server("--appendonly", "no") as url:
        yield url


@pytest.fixture(scope="module")
def ray_cluster():
    init_ray(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def configs(ray_cluster, redis_url, tmp_path_factory):
    """One SQLite and one Redis session store for the module, each in its own namespace."""
    path = tmp_path_factory.mktemp("sessions") / "sessions.db"
    made = {
        "sqlite": SessionConfig(backend_url=f"sqlite:///{path}", num_partitions=2, call_timeout_s=CALL_TIMEOUT_S,
                                namespace=f"r1-test-{uuid.uuid4().hex[:8]}"),
        "redis": SessionConfig(backend_url=redis_url, num_partitions=2, call_timeout_s=CALL_TIMEOUT_S,
                               namespace=f"r1-test-{uuid.uuid4().hex[:8]}"),
    }
    yield made
    if ray.is_initialized():
        for config in made.values():
            stop_session_actors(config.namespace)


@pytest.mark.parametrize("change, new_actors", [
    ({"backend_url": "redis://10.0.0.1:6379/0"}, True),  # other storage: must not reuse actors bound to the old one
    ({"idle_ttl_s": 60.0}, True),  # the actors enforce the TTL
    ({"num_cpus": 0.1}, True),  # resources are fixed when an actor is created
    ({"window_messages": 4}, False),  # ingress-side: the same actors serve it
    ({"call_timeout_s": 3.0}, True),  # also the actors' SQLite busy timeout and Redis socket timeouts
])
def test_actor_names_follow_the_storage_settings(change, new_actors):
    base = SessionConfig()
    changed = base.model_copy(update=change)
    assert (actor_name(base, 0) != actor_name(changed, 0)) == new_actors
    assert actor_name(base, 0) != actor_name(base, 1)
    options = actor_options(base, 0)
    assert options["lifetime"] == "detached" and options["max_restarts"] == -1 and options["get_if_exists"]
    assert options["resources"] == {"node:__internal_head__": 0.001}  # SQLite: the file is on the head node
    assert "resources" not in actor_options(SessionConfig(backend_url="redis://r:6379/0"), 0)


async def dialog(client: SessionClient, session_id: str | None, owner: str, first: int, last: int):
    """Turns first..last on one session; returns (session id, the turns)."""
    turns = []
    for i in range(first, last + 1):
        turn = await client.begin_turn(session_id, None, owner, [user(i)])
        session_id = turn.session_id
        assert await client.finish_turn(turn, assistant(i)["content"])
        turns.append(turn)
    return session_id, turns


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_twelve_turns_window_and_history(configs, kind):
    client = SessionClient(configs[kind])
    session_id, turns = run(dialog(client, None, KEY_A, 1, 12))
    assert turns[0].created and not any(t.created for t in turns[1:])
    assert len(session_id) == 32  # made by the server
    # The 12th question carries exactly the 10 messages before it (exchanges 7-11), then itself.
    assert turns[11].prompt == exchanges(7, 11) + [user(12)]
    assert turns[2].prompt == exchanges(1, 2) + [user(3)]
    history = run(client.history(session_id, KEY_A))
    assert history["messages"] == exchanges(1, 12) and history["num_messages"] == 24
    # The header works like the body field, and the system message shapes only this prompt.
    system = {"role": "system", "content": "be brief"}
    turn = run(client.begin_turn(None, session_id, KEY_A, [system, user(13)]))
    assert turn.prompt == [system] + exchanges(8, 12) + [user(13)]


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_new_session_is_stored_with_its_first_exchange(configs, kind):
    client = SessionClient(configs[kind])

    def missing(session_id):
        with pytest.raises(APIError) as caught:
            run(client.history(session_id, KEY_A))
        return caught.value.status == 404

    # A turn that names no session gets a new id at once, with no call to the store...
    turn = run(client.begin_turn(None, None, KEY_A, [user(1)]))
    assert turn.created and turn.pending and turn.prompt == [user(1)] and len(turn.session_id) == 32
    assert missing(turn.session_id)
    # ...and its append creates the session, owned by the turn's key.
    assert run(client.finish_turn(turn, assistant(1)["content"]))
    assert run(client.history(turn.session_id, KEY_A))["messages"] == exchanges(1, 1)
    with pytest.raises(APIError):
        run(client.history(turn.session_id, KEY_B))
    # A first turn that fails stores nothing: abandoning it neither writes nor deletes.
    failed = run(client.begin_turn(None, None, KEY_A, [user(2)]))
    run(client.abandon(failed))
    assert missing(failed.session_id)
    # A client that continues with the id before the first turn has ended (a streamed reply hands
    # the id out in its first chunk): its turn opens the session, the first turn's append joins it.
    first = run(client.begin_turn(None, None, KEY_A, [user(3)]))
    second = run(client.begin_turn(first.session_id, None, KEY_A, [user(4)]))
    assert second.created and not second.pending
    assert run(client.finish_turn(second, assistant(4)["content"]))
    assert run(client.finish_turn(first, assistant(3)["content"]))
    assert run(client.history(first.session_id, KEY_A))["messages"] == exchanges(4, 4) + exchanges(3, 3)


def test_killed_actor_loses_nothing(configs):
    client = SessionClient(configs["sqlite"])
    session_id, _ = run(dialog(client, None, KEY_A, 1, 5))
    actor = client.actor_for(session_id)
    ray.kill(actor, no_restart=False)  # crash: Ray restarts it, it reopens the database
    run(dialog(client, session_id, KEY_A, 6, 6))
    assert run(client.history(session_id, KEY_A))["messages"] == exchanges(1, 6)

    # Killed for good: the client creates the actor again by name and retries.
    ray.kill(client.actor_for(session_id), no_restart=True)
    run(dialog(client, session_id, KEY_A, 7, 7))

    # Killed while an append is in flight: the retried append is stored exactly once.
    async def kill_during_append():
        turn = await client.begin_turn(session_id, None, KEY_A, [user(8)])
        pending = asyncio.ensure_future(client.finish_turn(turn, assistant(8)["content"]))
        await asyncio.sleep(0)
        ray.kill(client.actor_for(session_id), no_restart=False)
        return await pending

    assert run(kill_during_append())
    assert run(client.history(session_id, KEY_A))["messages"] == exchanges(1, 8)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_other_key_gets_404(configs, kind):
    client = SessionClient(configs[kind])
    session_id, _ = run(dialog(client, None, KEY_A, 1, 1))
    for call in (
        client.begin_turn(session_id, None, KEY_B, [user(2)]),  # continuing someone else's dialog
        client.history(session_id, KEY_B),  # reading it
        client.delete(session_id, KEY_B),  # deleting it
        client.begin_turn(session_id, None, None, [user(2)]),  # no key at all
    ):
        with pytest.raises(APIError) as caught:
            run(call)
        assert caught.value.status == 404 and caught.value.code == "session_not_found"
    assert run(client.history(session_id, KEY_A))["messages"] == exchanges(1, 1)
    assert run(client.delete(session_id, KEY_A)) == {"id": session_id, "object": "session.deleted", "deleted": True}
    with pytest.raises(APIError) as caught:
        run(client.history(session_id, KEY_A))
    assert caught.value.status == 404


@pytest.mark.parametrize("body, header, messages, param", [
    ("too-short", None, [user(1)], "session_id"),  # malformed id
    ("a" * 20, "b" * 20, [user(1)], "session_id"),  # body and header disagree
    (None, None, [{"role": "system", "content": "hi"}], "messages"),  # nothing to store as the user's turn
])
def test_bad_turns_are_400(configs, body, header, messages, param):
    client = SessionClient(configs["sqlite"])
    with pytest.raises(APIError) as caught:
        run(client.begin_turn(body, header, KEY_A, messages))
    assert caught.value.status == 400 and caught.value.param == param


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_concurrent_turns_are_all_stored_in_order(configs, kind):
    # Two clients, as two ingress replicas would be, each sending turns concurrently.
    replicas = [SessionClient(configs[kind]), SessionClient(configs[kind])]
    session_id = run(dialog(replicas[0], None, KEY_A, 0, 0))[0]

    async def many():
        async def one(client, number):
            turn = await client.begin_turn(session_id, None, KEY_A, [user(number)])
            assert await client.finish_turn(turn, assistant(number)["content"])

        await asyncio.gather(*(one(replicas[n % 2], n) for n in range(1, 11)))

    run(many())
    messages = run(replicas[1].history(session_id, KEY_A))["messages"]
    assert len(messages) == 22
    numbers = []
    for index in range(0, 22, 2):  # each exchange whole, never interleaved with another turn
        number = int(messages[index]["content"].split()[1])
        assert messages[index:index + 2] == [user(number), assistant(number)]
        numbers.append(number)
    assert sorted(numbers) == list(range(0, 11))


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_concurrent_creates_of_one_id_make_one_session(configs, kind):
    replicas = [SessionClient(configs[kind]) for _ in range(4)]
    session_id = f"client-chosen-{uuid.uuid4().hex}"

    async def race():
        return await asyncio.gather(*(c.begin_turn(session_id, None, KEY_A, [user(1)]) for c in replicas))

    turns = run(race())
    assert sum(t.created for t in turns) == 1
    assert all(t.session_id == session_id for t in turns)


def test_idle_sessions_expire(ray_cluster, tmp_path):
    config = SessionConfig(backend_url=f"sqlite:///{tmp_path}/ttl.db", num_partitions=1, idle_ttl_s=1.0,
                           call_timeout_s=CALL_TIMEOUT_S, namespace=f"r1-test-{uuid.uuid4().hex[:8]}")
    client = SessionClient(config)
    try:
        session_id, _ = run(dialog(client, None, KEY_A, 1, 1))
        assert run(client.history(session_id, KEY_A))["num_messages"] == 2
        time.sleep(1.5)
        with pytest.raises(APIError) as caught:
            run(client.history(session_id, KEY_A))
        assert caught.value.status == 404
        turn = run(client.begin_turn(session_id, None, KEY_A, [user(2)]))  # the id starts a new, empty session
        assert turn.created and turn.prompt == [user(2)]
    finally:
        stop_session_actors(config.namespace)


def test_unreachable_store_is_503_not_a_hang(ray_cluster):
    config = SessionConfig(backend_url=f"redis://127.0.0.1:{free_port()}/0", num_partitions=1, call_timeout_s=20,
                           namespace=f"r1-test-{uuid.uuid4().hex[:8]}")
    client = SessionClient(config)
    try:
        # A new session meets the store at its first append; a named one when it is opened.
        turn = run(client.begin_turn(None, None, KEY_A, [user(1)]))
        for call in (client.finish_turn(turn, "answer"), client.begin_turn(turn.session_id, None, KEY_A, [user(1)])):
            with pytest.raises(APIError) as caught:
                run(call)
            assert caught.value.status == 503 and caught.value.code == "session_store_unavailable"
    finally:
        stop_session_actors(config.namespace)


def test_sessions_survive_restarting_everything(configs):
    # Keep this test last: it shuts the whole Ray cluster down (actors, their processes) and starts a new one.
    kinds = ("sqlite", "redis")
    session_ids = {kind: run(dialog(SessionClient(configs[kind]), None, KEY_A, 1, 3))[0] for kind in kinds}
    ray.shutdown()
    init_ray(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    for kind in kinds:
        fresh = SessionClient(configs[kind])
        assert run(fresh.history(session_ids[kind], KEY_A))["messages"] == exchanges(1, 3), kind
        _, turns = run(dialog(fresh, session_ids[kind], KEY_A, 4, 4))
        assert turns[0].prompt == exchanges(1, 3) + [user(4)], kind
