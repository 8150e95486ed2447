"""Dialog sessions, the library (no Ray): ids, partitions, the window, and both storage backends.

The Redis cases run against a real `redis-server` started for this module on a free port.
"""

from __future__ import annotations

import json
import subprocess
import threading

import pytest

from r1.config import SessionConfig
from r1.sessions import (
    Session,
    build_window,
    chat_token_counter,
    check_session_id,
    new_session_id,
    open_backend,
    parse_backend_url,
    partition_for,
    plan_turn,
    prompt_token_budget,
    resolve_session_id,
)
from r1.sessions.redis import RedisBackend
from r1.sessions.sqlite import SQLiteBackend
from tests.serve_helpers import redis_server

SID = "session-0123456789abcdef"
OTHER_SID = "session-fedcba9876543210"
TTL_S = 100.0


def user(i: int) -> dict[str, str]:
    return {"role": "user", "content": f"question {i}"}


def assistant(i: int) -> dict[str, str]:
    return {"role": "assistant", "content": f"answer {i}"}


def exchanges(first: int, last: int) -> list[dict[str, str]]:
    return [m for i in range(first, last + 1) for m in (user(i), assistant(i))]


class FakeClock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- a real redis-server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url():
    with redis_server("--appendonly", "no") as url:
        yield url


# -- ids, partitions, urls -------------------------------------------------------------------------


@pytest.mark.parametrize("session_id, valid", [
    pytest.param(new_session_id(), True, id="server-made"),  # what the server makes (a fixed id: xdist workers collect alike)
    ("a" * 16, True),  # shortest allowed
    ("a" * 128, True),  # longest allowed
    ("a" * 15, False),  # too short to be unguessable by accident
    ("a" * 129, False),  # too long: bounds storage keys
    ("abc/def-ghi-jklmn", False),  # a slash would escape the URL path segment
    ("abcdefgh ijklmnop", False),  # whitespace
    ("abcdefgh{ijklmnop}", False),  # braces would break the Redis hash tag
    ("äbcdefghijklmnopq", False),  # non-ASCII
    ("a" * 16 + "\n", False),  # a final newline ("$" matches before it): would break the X-Session-Id header
    (12345678901234567, False),  # not a string
    (None, False),  # not a string
])
def test_session_id_rules(session_id, valid):
    if valid:
        assert check_session_id(session_id) == session_id
    else:
        with pytest.raises(ValueError, match="session_id"):
            check_session_id(session_id)


def test_new_session_ids_are_unique_and_valid():
    ids = {new_session_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(len(i) == 32 and check_session_id(i) for i in ids)


def test_partition_is_stable_and_spread():
    # Pinned values (sha256 of the id, first 8 bytes big-endian, mod N): during a rolling upgrade old
    # and new replicas must send a session to the same actor, so a change here must be deliberate.
    assert [partition_for(f"session-{i:016d}", 7) for i in range(8)] == [3, 4, 5, 6, 3, 6, 1, 4]
    counts = [0] * 4
    for _ in range(400):
        counts[partition_for(new_session_id(), 4)] += 1
    assert all(c > 50 for c in counts), counts
    assert partition_for(SID, 1) == 0
    with pytest.raises(ValueError, match="num_partitions"):
        partition_for(SID, 0)


def test_partition_is_the_same_in_another_process():
    # Python's hash() differs per process; the routing must not.
    import sys

    code = f"from r1.sessions import partition_for; print(partition_for({SID!r}, 1000))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert int(out.stdout) == partition_for(SID, 1000)


@pytest.mark.parametrize("url, expected", [
    ("sqlite:///~/.cache/r1-cluster/sessions.db", ("sqlite", "~/.cache/r1-cluster/sessions.db")),  # the default
    ("sqlite:////var/lib/r1/sessions.db", ("sqlite", "/var/lib/r1/sessions.db")),  # absolute path
    ("redis://10.0.0.5:6379/2", ("redis", "redis://10.0.0.5:6379/2")),  # multi-node
    ("rediss://redis.example:6380/0", ("redis", "rediss://redis.example:6380/0")),  # TLS
    ("sqlite:///sessions.db", "relative path"),  # would differ per actor working directory
    ("sqlite:///:memory:", "not durable"),  # each actor would have its own empty store
    ("postgres://db/sessions", "not supported"),  # unknown scheme
    ("redis://10.0.0.5:6379", ("redis", "redis://10.0.0.5:6379")),  # no database: redis-py's 0
    ("unix:///run/redis.sock?db=3", ("redis", "unix:///run/redis.sock?db=3")),  # the path is the socket
    ("redis://10.0.0.5:6379/abc", "database number"),  # redis-py would silently use database 0
    ("redis://10.0.0.5:6379/3/extra", "database number"),
])
def test_backend_urls(url, expected):
    if isinstance(expected, tuple):
        assert parse_backend_url(url) == expected
    else:
        with pytest.raises(ValueError, match=expected):
            parse_backend_url(url)
        with pytest.raises(ValueError, match=expected):
            SessionConfig(backend_url=url)


@pytest.mark.parametrize("body, header, expected", [
    (None, None, None),  # no session named: the server makes one
    (SID, None, SID),  # body field
    (None, SID, SID),  # X-Session-Id header
    (SID, SID, SID),  # both, agreeing
    (SID, OTHER_SID, "differ"),  # both, disagreeing: ambiguous
    ("short", None, "not valid"),  # malformed id
    (12, None, "not valid"),  # JSON number instead of a string
])
def test_resolve_session_id(body, header, expected):
    if expected is None or expected == SID:
        assert resolve_session_id(body, header) == expected
    else:
        with pytest.raises(ValueError, match=expected):
            resolve_session_id(body, header)


# -- the window ------------------------------------------------------------------------------------


def chars(messages):
    """A token counter for tests: one token per character of content, plus 2 per message."""
    return sum(len(m["content"]) + 2 for m in messages)


SYSTEM = {"role": "system", "content": "be brief"}


@pytest.mark.parametrize("history, new, kwargs, expected", [
    # The guide's window: 11 stored exchanges, the 12th question sees exchanges 7-11.
    (exchanges(1, 11), [user(12)], {}, exchanges(7, 11) + [user(12)]),
    # Fewer stored than the window: everything.
    (exchanges(1, 2), [user(3)], {}, exchanges(1, 2) + [user(3)]),
    # A fresh session: just the request.
    ([], [user(1)], {}, [user(1)]),
    # window 0: stateless prompt.
    (exchanges(1, 3), [user(4)], {"max_messages": 0}, [user(4)]),
    # Odd window: keeps the newest 3 messages, starting with an assistant message.
    (exchanges(1, 3), [user(4)], {"max_messages": 3}, [assistant(2)] + exchanges(3, 3) + [user(4)]),
    # The request's system message goes first and is not counted against the window.
    (exchanges(1, 6), [SYSTEM, user(7)], {}, [SYSTEM] + exchanges(2, 6) + [user(7)]),
    # Token budget (chars: a question counts 12, an answer 10): drop the oldest first, whole budget used.
    (exchanges(1, 3), [user(4)], {"token_budget": 12 + 10 + 12, "count_tokens": chars}, exchanges(3, 3) + [user(4)]),
    # One token less: the window may start with an assistant message rather than waste the budget.
    (exchanges(1, 3), [user(4)], {"token_budget": 12 + 10 + 11, "count_tokens": chars}, [assistant(3), user(4)]),
    # A budget the new message alone exceeds: keep the new message (the engine then answers 400).
    (exchanges(1, 3), [user(4)], {"token_budget": 5, "count_tokens": chars}, [user(4)]),
])
def test_build_window(history, new, kwargs, expected):
    window = build_window(history, new, **kwargs)
    assert window.messages == expected
    if "count_tokens" in kwargs and len(expected) > 1:
        assert chars(window.messages) <= kwargs["token_budget"]
    assert window.num_history_messages + len(new) == len(expected)


def test_window_budget_drops_the_fewest_messages():
    # Exactly the largest suffix of the history that fits, for every budget.
    history = exchanges(1, 8)
    new = [user(9)]
    for budget in range(chars(new), chars(history + new) + 2):
        window = build_window(history, new, max_messages=16, token_budget=budget, count_tokens=chars)
        kept = window.num_history_messages
        assert chars(window.messages) <= budget
        if kept < len(history):
            assert chars(history[-(kept + 1):] + new) > budget


def test_window_with_the_real_tokenizer():
    from actors.session_store import token_counting
    from r1.config import ModelConfig
    from r1.model import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(model="r1-tiny"))
    count, context_tokens = token_counting(ModelConfig(model="r1-tiny"))  # what the ingress uses
    assert context_tokens == 1024
    assert count([user(1)]) == chat_token_counter(tokenizer)([user(1)])
    history = exchanges(1, 11)
    new = [user(12)]
    full = count(history[-10:] + new)
    assert full == len(tokenizer.encode(tokenizer.apply_chat_template(history[-10:] + new, add_generation_prompt=True,
                                                                       tokenize=False), add_special_tokens=False))
    assert build_window(history, new, token_budget=full, count_tokens=count).messages == history[-10:] + new
    window = build_window(history, new, token_budget=full - 1, count_tokens=count)
    assert window.messages == history[-9:] + new  # one token short: the oldest message goes
    assert count(window.messages) <= full - 1


@pytest.mark.parametrize("context, max_new, kwargs, expected", [
    (4096, 256, {"reply_reserve_tokens": 1024}, 3840),  # the request says how much room the reply needs
    (4096, None, {"reply_reserve_tokens": 1024}, 3072),  # default room for the reply
    (1024, None, {"reply_reserve_tokens": 1024}, 512),  # small model: room capped at half the context
    (4096, None, {"reply_reserve_tokens": 1024, "window_tokens": 2000}, 2000),  # operator's extra cap
    (1024, 2000, {"reply_reserve_tokens": 10}, 1),  # reply larger than the context: nothing fits (engine says 400)
])
def test_prompt_token_budget(context, max_new, kwargs, expected):
    assert prompt_token_budget(context, max_new, **kwargs) == expected


def test_plan_turn():
    session = Session(SID, "key-a", 1.0, 2.0, 22, exchanges(2, 11))
    turn = plan_turn(session, [SYSTEM, user(12)], window_messages=10)
    assert turn.prompt == [SYSTEM] + exchanges(7, 11) + [user(12)]
    assert turn.new_messages == [user(12)]  # the system message is not stored
    assert turn.exchange("answer 12") == [user(12), assistant(12)]
    assert turn.num_history_messages == 10 and not turn.created
    with pytest.raises(ValueError, match="non-system message"):
        plan_turn(session, [SYSTEM], window_messages=10)
    with pytest.raises(ValueError, match="role"):
        plan_turn(session, [{"role": "robot", "content": "x"}], window_messages=10)


def test_a_continued_message_is_stored_as_one_with_its_reply():
    # A final assistant message the reply continues (prefix) goes to the prompt marked, and is stored
    # as one assistant message with the reply; a start inside the reasoning is not stored (nor is
    # any reasoning).
    session = Session(SID, "key-a", 1.0, 2.0, 2, exchanges(11, 11))
    start = {"role": "assistant", "content": "The answer is", "prefix": True}
    turn = plan_turn(session, [user(12), start], window_messages=10)
    assert turn.prompt == exchanges(11, 11) + [user(12), start]
    assert turn.exchange(" 5.") == [user(12), {"role": "assistant", "content": "The answer is 5."}]
    thinking = {"role": "assistant", "content": "<think>\nFirst,", "prefix": True}
    assert plan_turn(session, [user(12), thinking], window_messages=10).exchange("5.") == [
        user(12), {"role": "assistant", "content": "5."}]


@pytest.mark.parametrize("messages", [
    [{"role": ["user"], "content": "x"}],  # unhashable role: a ValueError, not a TypeError
    [{"role": "user", "content": [{"type": "text", "text": "x"}]}],  # content parts: the ingress joins them first
    [],
])
def test_stored_messages_are_checked(messages):
    from r1.sessions.store import check_messages

    with pytest.raises(ValueError, match="messages"):
        check_messages(messages)


# -- the backends ----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
def make_backend(request, tmp_path):
    """make_backend(clock=..., **options) -> a backend; all made in one test share the same storage."""
    made = []
    if request.param == "sqlite":
        def make(**options):
            made.append(SQLiteBackend(tmp_path / "sessions.db", idle_ttl_s=options.pop("idle_ttl_s", TTL_S), **options))
            return made[-1]
    else:
        url = request.getfixturevalue("redis_url")
        import redis

        redis.Redis.from_url(url).flushdb()

        def make(**options):
            made.append(RedisBackend(url, idle_ttl_s=options.pop("idle_ttl_s", TTL_S), **options))
            return made[-1]
    make.kind = request.param
    yield make
    for backend in made:
        backend.close()


def test_open_creates_once_and_checks_the_owner(make_backend):
    backend = make_backend(clock=FakeClock())
    first = backend.open(SID, "key-a")
    assert first.created and first.messages == [] and first.num_messages == 0
    again = backend.open(SID, "key-a")
    assert not again.created and again.created_at == first.created_at
    assert backend.open(SID, "key-b") is None  # another key: looks missing
    assert backend.get(SID, "key-b") is None
    assert backend.create(SID, "key-a") is False
    assert backend.create(OTHER_SID, "key-b") is True


def test_append_keeps_order_and_reads_tails(make_backend):
    backend = make_backend(clock=FakeClock())
    backend.open(SID, "key-a")
    for i in range(1, 13):
        assert backend.append(SID, "key-a", [user(i), assistant(i)])
    full = backend.get(SID, "key-a")
    assert full.messages == exchanges(1, 12) and full.num_messages == 24
    assert backend.get(SID, "key-a", last=10).messages == exchanges(8, 12)
    assert backend.open(SID, "key-a", last=3).messages == [assistant(11), user(12), assistant(12)]
    assert backend.get(SID, "key-a", last=0).messages == []
    assert backend.get(SID, "key-a", last=100).messages == exchanges(1, 12)


@pytest.mark.parametrize("operation", [
    "append",  # writing into someone else's session
    "delete",  # deleting someone else's session
])
def test_other_owner_cannot_touch_a_session(make_backend, operation):
    backend = make_backend(clock=FakeClock())
    backend.open(SID, "key-a")
    backend.append(SID, "key-a", [user(1), assistant(1)])
    if operation == "append":
        assert backend.append(SID, "key-b", [user(2)]) is False
    else:
        assert backend.delete(SID, "key-b") is False
    assert backend.get(SID, "key-a").messages == exchanges(1, 1)


def test_delete(make_backend):
    backend = make_backend(clock=FakeClock())
    backend.open(SID, "key-a")
    backend.append(SID, "key-a", [user(1), assistant(1)])
    assert backend.delete(SID, "key-a") is True
    assert backend.get(SID, "key-a") is None
    assert backend.delete(SID, "key-a") is False
    assert backend.append(SID, "key-a", [user(2)]) is False  # a turn that ends after the delete stores nothing
    reopened = backend.open(SID, "key-b")  # the id is free again
    assert reopened.created and reopened.num_messages == 0


def test_idle_ttl(make_backend):
    clock = FakeClock()
    backend = make_backend(clock=clock)
    backend.open(SID, "key-a")
    backend.append(SID, "key-a", [user(1), assistant(1)])
    clock.now += TTL_S - 1
    assert backend.get(SID, "key-a") is not None  # idle, but not long enough
    assert backend.append(SID, "key-a", [user(2), assistant(2)])  # a turn refreshes the TTL
    clock.now += TTL_S - 1
    assert backend.get(SID, "key-a").num_messages == 4
    clock.now += 2
    assert backend.get(SID, "key-a") is None  # expired reads as missing at once
    assert backend.append(SID, "key-a", [user(3)]) is False
    assert backend.delete(SID, "key-a") is False
    assert backend.expire_idle() == 1  # and is physically removed by the sweep
    assert backend.expire_idle() == 0
    fresh = backend.open(SID, "key-b")
    assert fresh.created and fresh.messages == []


def test_opening_a_session_counts_as_activity(make_backend):
    # A turn opens the session, then generates; the session must not expire in between and lose
    # the turn (append would find it gone). A session idle for over half its TTL is refreshed by
    # the open; a more recent one is not written (each write is a durable commit).
    clock = FakeClock()
    backend = make_backend(clock=clock)
    backend.open(SID, "key-a")
    backend.append(SID, "key-a", [user(1), assistant(1)])
    stored_at = clock.now
    clock.now += TTL_S / 2 - 1
    assert backend.open(SID, "key-a").updated_at == stored_at  # recent: left as it is
    clock.now += TTL_S / 2  # idle for TTL - 1: over half the TTL
    opened = backend.open(SID, "key-a", last=10)
    assert opened.messages == exchanges(1, 1) and opened.updated_at == clock.now
    clock.now += 2  # generating the reply
    assert backend.append(SID, "key-a", [user(2), assistant(2)])
    assert backend.get(SID, "key-a").num_messages == 4
    clock.now += TTL_S - 1
    assert backend.get(SID, "key-a") is not None  # a read (GET /v1/sessions) is not activity...
    clock.now += 2
    assert backend.get(SID, "key-a") is None  # ...so the session expires a TTL after the last turn
    if make_backend.kind == "redis":
        import redis

        raw = redis.Redis.from_url(backend.url, decode_responses=True)
        backend.open(OTHER_SID, "key-a")
        backend.append(OTHER_SID, "key-a", [user(1)])
        raw.pexpire(f"r1:session:{{{OTHER_SID}}}:meta", 3000)  # Redis's own expiry is refreshed by open too
        clock.now += TTL_S / 2 + 1
        assert not backend.open(OTHER_SID, "key-a").created
        assert raw.pttl(f"r1:session:{{{OTHER_SID}}}:meta") > 50_000
        raw.close()


def test_open_replaces_an_expired_session(make_backend):
    clock = FakeClock()
    backend = make_backend(clock=clock)
    backend.open(SID, "key-a")
    backend.append(SID, "key-a", [user(1), assistant(1)])
    clock.now += TTL_S + 1
    fresh = backend.open(SID, "key-b")  # no sweep ran; open must not resurrect old messages
    assert fresh.created and fresh.owner == "key-b"
    assert backend.get(SID, "key-b").messages == []


def test_append_with_create_stores_a_pending_session_with_its_first_exchange(make_backend):
    clock = FakeClock()
    backend = make_backend(clock=clock)
    assert backend.append(SID, "key-a", [user(1), assistant(1)]) is False  # without create: missing
    assert backend.get(SID, "key-a") is None
    assert backend.append(SID, "key-a", [user(1), assistant(1)], turn_id="t1", create=True) is True
    stored = backend.get(SID, "key-a")
    assert stored.messages == exchanges(1, 1) and stored.created_at == clock.now
    assert backend.get(SID, "key-b") is None  # created for its owner only
    # Retried after a crash: stored once.
    assert backend.append(SID, "key-a", [user(1), assistant(1)], turn_id="t1", create=True) is True
    # A turn that was given the id and opened the session meanwhile: both exchanges are kept.
    clock.now += 1
    assert backend.append(SID, "key-a", [user(2), assistant(2)], turn_id="t2", create=True) is True
    assert backend.get(SID, "key-a").messages == exchanges(1, 2)
    assert backend.get(SID, "key-a").created_at == stored.created_at
    # Another owner's session is never joined or replaced.
    assert backend.append(SID, "key-b", [user(9)], create=True) is False
    assert backend.get(SID, "key-a").num_messages == 4
    # An expired session is replaced, not resurrected.
    clock.now += TTL_S + 1
    assert backend.append(SID, "key-b", [user(3), assistant(3)], turn_id="t1", create=True) is True
    assert backend.get(SID, "key-b").messages == exchanges(3, 3)
    assert backend.get(SID, "key-a") is None


def test_data_is_stored_with_an_append_and_kept_by_later_ones(make_backend):
    """A stored response's object rides along with its exchange: one transaction, read back by get
    and open, replaced only by an append that brings new data, gone with the session."""
    clock = FakeClock()
    backend = make_backend(clock=clock)
    data = json.dumps({"id": "resp-1", "output": [{"text": "密码 ✓"}]}, ensure_ascii=False)
    assert backend.append(SID, "key-a", [user(1), assistant(1)], create=True, data=data)
    assert backend.get(SID, "key-a").data == data and backend.open(SID, "key-a").data == data
    assert backend.get(SID, "key-b") is None  # another key sees nothing of it
    assert backend.append(SID, "key-a", [user(2)])  # no data: kept
    assert backend.get(SID, "key-a").data == data
    assert backend.append(SID, "key-a", [user(3)], data="{}")
    assert backend.get(SID, "key-a").data == "{}"
    backend.open(OTHER_SID, "key-a")
    assert backend.get(OTHER_SID, "key-a").data is None  # never given any
    assert backend.delete(SID, "key-a") and backend.get(SID, "key-a") is None
    clock.now += TTL_S + 1  # an expired session is replaced without its data
    assert backend.append(OTHER_SID, "key-a", [user(1)], create=True) and backend.get(OTHER_SID, "key-a").data is None
    with pytest.raises(ValueError, match="data must be"):
        backend.append(SID, "key-a", [user(1)], data=b"{}")


def test_sqlite_opens_a_version_1_file_and_adds_the_data_column(tmp_path):
    """A database written before sessions.data: its sessions and messages are kept."""
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE sessions (id TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at REAL NOT NULL,
                               updated_at REAL NOT NULL, next_seq INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE messages (session_id TEXT NOT NULL, seq INTEGER NOT NULL, role TEXT NOT NULL,
                               content TEXT NOT NULL, turn_id TEXT, PRIMARY KEY (session_id, seq)) WITHOUT ROWID;
        PRAGMA user_version=1;
    """)
    db.execute("INSERT INTO sessions VALUES (?, 'key-a', 1.0, 1.0, 1)", (SID,))
    db.execute("INSERT INTO messages VALUES (?, 0, 'user', 'old', NULL)", (SID,))
    db.commit()
    db.close()
    backend = SQLiteBackend(path, clock=lambda: 2.0)
    assert backend.get(SID, "key-a").messages == [{"role": "user", "content": "old"}]
    assert backend.append(SID, "key-a", [user(1)], data="{}") and backend.get(SID, "key-a").data == "{}"
    assert backend._db.execute("PRAGMA user_version").fetchone()[0] == 2
    backend.close()
    assert SQLiteBackend(path, clock=lambda: 2.0).get(SID, "key-a").num_messages == 2  # opens again as version 2


def test_pending_session_and_its_turn():
    from r1.sessions import pending_session

    session = pending_session("key-a", clock=lambda: 5.0)
    assert check_session_id(session.session_id) and session.session_id != pending_session("key-a").session_id
    assert session.created and session.pending and session.messages == [] and session.created_at == 5.0
    turn = plan_turn(session, [SYSTEM, user(1)], window_messages=10)
    assert turn.pending and turn.created and turn.prompt == [SYSTEM, user(1)]
    stored = Session(SID, "key-a", 1.0, 2.0, 0, [], created=True)  # created by `open`: already stored
    assert not plan_turn(stored, [user(1)], window_messages=10).pending
    with pytest.raises(ValueError, match="owner"):
        pending_session(None)


def test_retried_append_is_stored_once(make_backend):
    backend = make_backend(clock=FakeClock())
    backend.open(SID, "key-a")
    assert backend.append(SID, "key-a", [user(1), assistant(1)], turn_id="turn-1")
    assert backend.append(SID, "key-a", [user(1), assistant(1)], turn_id="turn-1")  # retry after a crash
    assert backend.append(SID, "key-a", [user(2), assistant(2)], turn_id="turn-2")
    assert backend.get(SID, "key-a").messages == exchanges(1, 2)


def test_max_stored_messages(make_backend):
    backend = make_backend(clock=FakeClock(), max_stored_messages=6)
    backend.open(SID, "key-a")
    for i in range(1, 6):
        backend.append(SID, "key-a", [user(i), assistant(i)])
    session = backend.get(SID, "key-a")
    assert session.messages == exchanges(3, 5) and session.num_messages == 6


def test_sessions_survive_reopening_the_storage(make_backend):
    backend = make_backend()
    backend.open(SID, "key-a")
    backend.append(SID, "key-a", exchanges(1, 3))
    backend.close()
    assert make_backend().get(SID, "key-a").messages == exchanges(1, 3)


@pytest.mark.parametrize("call, match", [
    (lambda b: b.open("bad id", "key-a"), "session_id"),  # malformed id
    (lambda b: b.append(SID, "key-a", []), "non-empty"),  # nothing to append
    (lambda b: b.append(SID, "key-a", [{"role": "user"}]), "content"),  # missing content
    (lambda b: b.append(SID, "key-a", [{"role": "user", "content": 3}]), "content"),  # content not a string
    (lambda b: b.append(SID, "key-a", [user(1)], turn_id="a b"), "turn_id"),  # malformed turn id
    (lambda b: b.get(SID, "key-a", last=-1), "last"),  # negative tail
    (lambda b: b.open(SID, None), "owner"),  # owner must be a string ('' for anonymous)
])
def test_bad_arguments(make_backend, call, match):
    backend = make_backend()
    with pytest.raises(ValueError, match=match):
        call(backend)


def run_threads(targets):
    errors = []

    def guarded(target):
        try:
            target()
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors


def test_concurrent_creates_make_one_session(make_backend):
    # Separate backends = separate connections, as separate actors would have.
    backends = [make_backend() for _ in range(8)]
    barrier = threading.Barrier(len(backends))
    results = []

    def create(backend):
        barrier.wait(timeout=30)
        results.append(backend.open(SID, "key-a"))

    run_threads([lambda b=b: create(b) for b in backends])
    assert sum(r.created for r in results) == 1
    assert len({r.created_at for r in results}) == 1


def test_concurrent_appends_are_all_kept_whole(make_backend):
    backends = [make_backend() for _ in range(4)]
    backends[0].open(SID, "key-a")
    barrier = threading.Barrier(len(backends))

    def turns(worker, backend):
        barrier.wait(timeout=30)
        for i in range(10):
            number = worker * 100 + i
            assert backend.append(SID, "key-a", [user(number), assistant(number)], turn_id=f"t{number}")

    run_threads([lambda w=w, b=b: turns(w, b) for w, b in enumerate(backends)])
    messages = backends[0].get(SID, "key-a").messages
    assert len(messages) == 80
    pairs = [(messages[i], messages[i + 1]) for i in range(0, 80, 2)]
    numbers = []
    for question, reply in pairs:  # every exchange is contiguous: no interleaving inside a turn
        number = int(question["content"].split()[1])
        assert question == user(number) and reply == assistant(number)
        numbers.append(number)
    assert sorted(numbers) == sorted(w * 100 + i for w in range(4) for i in range(10))
    for worker in range(4):  # each writer's turns stay in its order
        mine = [n for n in numbers if n // 100 == worker]
        assert mine == sorted(mine)


def test_sqlite_is_in_wal_mode_with_the_chosen_sync(tmp_path):
    backend = SQLiteBackend(tmp_path / "s.db", synchronous="normal")
    assert backend._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert backend._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    backend.close()
    backend = open_backend(f"sqlite:///{tmp_path}/s.db", idle_ttl_s=10, max_stored_messages=10)
    assert backend._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL, the default
    backend.close()


def test_sqlite_sweeps_expired_sessions_periodically(tmp_path):
    clock = FakeClock()
    backend = SQLiteBackend(tmp_path / "s.db", idle_ttl_s=TTL_S, clock=clock, sweep_interval_s=50)
    backend.open(SID, "key-a")
    backend.append(SID, "key-a", exchanges(1, 2))
    clock.now += TTL_S + 60
    backend.open(OTHER_SID, "key-a")  # any write runs the sweep when it is due
    rows = backend._db.execute("SELECT COUNT(*) FROM messages WHERE session_id=?", (SID,)).fetchone()[0]
    assert rows == 0
    assert backend._db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 1
    backend.close()


def test_redis_keys_expire_in_redis(redis_url):
    import redis

    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    backend = RedisBackend(redis_url, idle_ttl_s=TTL_S)
    backend.open(OTHER_SID, "key-a")
    backend.append(OTHER_SID, "key-a", exchanges(1, 1), turn_id="t1")
    keys = raw.keys(f"r1:session:{{{OTHER_SID}}}:*")
    assert len(keys) == 3
    assert all(0 < raw.pttl(key) <= TTL_S * 1000 for key in keys)  # Redis frees idle sessions itself
    backend.close()
    raw.close()


def test_sqlite_database_is_private(tmp_path):
    backend = SQLiteBackend(tmp_path / "private" / "s.db")
    backend.open(SID, "key-a")
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o700  # a folder it creates
    for name in ("s.db", "s.db-wal"):
        assert (tmp_path / "private" / name).stat().st_mode & 0o077 == 0, name  # no access for group/others
    backend.close()


@pytest.mark.parametrize("make_path, reason", [
    (lambda d: (d / "notadb.db").write_text("hello" * 100) and d / "notadb.db", "not a database"),
    (lambda d: "/dev/null", "disk I/O error"),
    (lambda d: "~no-such-user-r1/s.db", "home directory"),
])
def test_sqlite_bad_files_are_clear_errors_without_leaks(tmp_path, make_path, reason):
    import os

    def open_files():  # fd -> what it points at; other threads of this worker may close theirs meanwhile
        found = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                found[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # closed while listing
                pass
        return found

    path = make_path(tmp_path)
    before = open_files()
    for _ in range(5):
        with pytest.raises(ValueError, match="cannot open the session database") as error:
            SQLiteBackend(path)
        assert str(path) in str(error.value) and reason in str(error.value)
    opened = {fd: target for fd, target in open_files().items() if before.get(fd) != target}
    assert not opened  # each failed open closed its connection


def test_sqlite_failed_write_raises_its_own_error(tmp_path):
    import sqlite3

    backend = SQLiteBackend(tmp_path / "s.db")
    backend.open(SID, "key-a")
    backend._db.execute("PRAGMA max_page_count=20")  # a full disk
    with pytest.raises(sqlite3.OperationalError, match="full"):  # SQLite rolled back itself; no "cannot rollback"
        backend.append(SID, "key-a", [{"role": "user", "content": "x" * 200_000}])
    backend._db.execute("PRAGMA max_page_count=1000000")
    assert backend.append(SID, "key-a", [user(1)]) and backend.get(SID, "key-a").messages == [user(1)]
    backend.close()


def test_sqlite_refuses_a_newer_schema(tmp_path):
    backend = SQLiteBackend(tmp_path / "s.db")
    backend._db.execute("PRAGMA user_version=99")
    backend.close()
    with pytest.raises(ValueError, match="schema version 99"):
        SQLiteBackend(tmp_path / "s.db")


def test_sqlite_unwritable_path_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot open the session database"):
        SQLiteBackend(blocker / "sub" / "sessions.db")
