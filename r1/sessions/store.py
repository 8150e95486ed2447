"""Dialog sessions: the stored data, the id rules and the storage-backend protocol.

A session is an owner (the API key id that created it) and an ordered list of chat messages
(`{"role", "content"}`). Backends (`SQLiteBackend`, `RedisBackend`) store sessions durably: every
write is committed to storage before the call returns. Sessions expire after an idle TTL measured
from the last write; an expired session reads as missing at once and is physically removed later
(SQLite: a periodic sweep; Redis: key expiry).

This module does not route sessions to processes (`r1.sessions.partition`), choose what the model
sees (`r1.sessions.window`) or talk HTTP.
"""

from __future__ import annotations

import math
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol
from urllib.parse import urlsplit

# Server-made ids are 32 characters from secrets.token_urlsafe (192 random bits). Client-chosen ids
# are allowed when they look the same: URL-safe characters, long enough not to be guessed by accident.
SESSION_ID_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")  # used with fullmatch: "$" would let a final "\n" through
TURN_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
STORED_ROLES = frozenset({"system", "user", "assistant", "tool"})

Clock = Callable[[], float]


def new_session_id() -> str:
    """An unguessable session id (192 bits from the OS's CSPRNG)."""
    return secrets.token_urlsafe(24)


def check_session_id(session_id: Any) -> str:
    if not isinstance(session_id, str) or not SESSION_ID_RE.fullmatch(session_id):
        shown = session_id if isinstance(session_id, str) and len(session_id) <= 40 else f"{str(session_id)[:40]}..."
        raise ValueError(
            f"session_id {shown!r} is not valid: use 16-128 characters from A-Z a-z 0-9 _ - "
            "(or send none and the server makes one)"
        )
    return session_id


def check_owner(owner: Any) -> str:
    if not isinstance(owner, str) or len(owner) > 256:
        raise ValueError("owner must be a string of at most 256 characters ('' when the server has no API keys)")
    return owner


def check_turn_id(turn_id: Any) -> str | None:
    if turn_id is not None and (not isinstance(turn_id, str) or not TURN_ID_RE.fullmatch(turn_id)):
        raise ValueError("turn_id must be 1-128 characters from A-Z a-z 0-9 _ -")
    return turn_id


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Messages to store: a non-empty list of {"role", "content"} with string content."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} objects")
    clean = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or message["role"] not in STORED_ROLES:
            raise ValueError(f"messages[{index}] needs a role in {sorted(STORED_ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{index}].content must be a string")
        clean.append({"role": message["role"], "content": message["content"]})
    return clean


@dataclass(frozen=True)
class Session:
    """One session as read from storage.

    `messages` holds the newest `last` messages when the read asked for a tail, else all of them;
    `num_messages` always counts everything stored.
    """

    session_id: str
    owner: str
    created_at: float
    updated_at: float
    num_messages: int
    messages: list[dict[str, str]] = field(default_factory=list)
    # True only on the `open` call that created the session, and on a `pending_session`.
    created: bool = False
    # Not in storage yet (`pending_session`): the first append creates it.
    pending: bool = False
    # A JSON text stored with the session, which the store does not read (a stored response's
    # object, for GET /v1/responses/{id}); None when no append gave one.
    data: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The body of `GET /v1/sessions/{id}`."""
        return {
            "id": self.session_id,
            "object": "session",
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "num_messages": self.num_messages,
            "messages": [dict(m) for m in self.messages],
        }


def pending_session(owner: str, clock: Clock = time.time) -> Session:
    """A new session with a server-made id for a turn that named none, not yet stored: nothing is
    written until its first exchange is appended with `create=True`. A request without a session
    costs the store one write (the exchange) instead of two, and a turn that fails stores nothing.
    (The id is unguessable, so no other turn can have stored it meanwhile, except one that was
    given the id by this turn's response and used it: its `open` created the session, and this
    turn's append then joins it.)"""
    now = clock()
    return Session(new_session_id(), check_owner(owner), now, now, 0, [], created=True, pending=True)


class SessionBackend(Protocol):
    """Durable session storage. Every method commits before it returns.

    Wrong owner and expired read exactly like missing (None / False), so a caller cannot tell a
    session of another API key from one that does not exist.
    """

    def open(self, session_id: str, owner: str, *, last: int | None = None) -> Session | None:
        """Get or create atomically: the session (created=True if this call made it), None if another owner has it."""

    def create(self, session_id: str, owner: str) -> bool:
        """True if this call created the session; False if it already existed (any owner)."""

    def get(self, session_id: str, owner: str, *, last: int | None = None) -> Session | None: ...

    def append(self, session_id: str, owner: str, messages: list[dict[str, str]], *, turn_id: str | None = None,
               create: bool = False, data: str | None = None) -> bool:
        """Append messages as one unit and refresh the idle TTL; False if the session is missing
        (or another owner's). With `create`, a missing (or expired) session is created for `owner`
        first, in the same transaction: the first append of a `pending_session`. `data` (a JSON
        text) replaces the session's `data` in the same transaction.

        With a `turn_id`, a repeated call (a retry after a crash) appends nothing and returns True."""

    def delete(self, session_id: str, owner: str) -> bool: ...

    def expire_idle(self, now: float | None = None) -> int:
        """Physically remove sessions idle longer than the TTL; the number removed."""

    def close(self) -> None: ...


class BackendBase:
    """What both backends share: TTL arithmetic, the clock, limits and the periodic sweep."""

    def __init__(self, *, idle_ttl_s: float, max_stored_messages: int, clock: Clock = time.time,
                 sweep_interval_s: float | None = None):
        if not idle_ttl_s > 0:
            raise ValueError(f"idle_ttl_s={idle_ttl_s} must be > 0")
        if max_stored_messages < 2:
            raise ValueError(f"max_stored_messages={max_stored_messages} must be >= 2 (one exchange)")
        self.idle_ttl_s = float(idle_ttl_s)
        self.max_stored_messages = int(max_stored_messages)
        self.clock = clock
        self.sweep_interval_s = sweep_interval_s
        self._last_sweep = -math.inf

    def is_expired(self, updated_at: float, now: float) -> bool:
        return updated_at + self.idle_ttl_s < now

    def needs_refresh(self, updated_at: float, now: float) -> bool:
        """A turn opening this session refreshes its TTL: it has been idle for over half the TTL."""
        return updated_at + self.idle_ttl_s / 2 < now

    def create(self, session_id: str, owner: str) -> bool:
        session = self.open(session_id, owner, last=0)  # type: ignore[attr-defined]
        return session is not None and session.created

    def maybe_sweep(self, now: float) -> None:
        """Run `expire_idle` when `sweep_interval_s` has passed since the last sweep."""
        if self.sweep_interval_s is not None and now - self._last_sweep >= self.sweep_interval_s:
            self._last_sweep = now
            self.expire_idle(now)  # type: ignore[attr-defined]


MAX_DATA_CHARS = 4_000_000  # a response object with its whole answer, far above any model's output


def check_data(data: Any) -> str | None:
    if data is not None and (not isinstance(data, str) or len(data) > MAX_DATA_CHARS):
        raise ValueError(f"data must be None or a string of at most {MAX_DATA_CHARS} characters")
    return data


def check_last(last: int | None) -> int | None:
    if last is not None and (not isinstance(last, int) or last < 0):
        raise ValueError(f"last={last!r} must be None (all messages) or an integer >= 0")
    return last


def open_backend(
    url: str,
    *,
    idle_ttl_s: float,
    max_stored_messages: int,
    clock: Clock = time.time,
    sqlite_synchronous: Literal["full", "normal"] = "full",
    sweep_interval_s: float | None = 300.0,
    timeout_s: float = 10.0,
) -> SessionBackend:
    """The backend a URL names: `sqlite:///<path>` (absolute or ~) or `redis://host:port/db` (also rediss://)."""
    kind, target = parse_backend_url(url)
    common = {"idle_ttl_s": idle_ttl_s, "max_stored_messages": max_stored_messages, "clock": clock}
    if kind == "sqlite":
        from r1.sessions.sqlite import SQLiteBackend

        return SQLiteBackend(target, synchronous=sqlite_synchronous, sweep_interval_s=sweep_interval_s,
                             busy_timeout_s=timeout_s, **common)
    from r1.sessions.redis import RedisBackend

    return RedisBackend(target, timeout_s=timeout_s, **common)


def parse_backend_url(url: str) -> tuple[Literal["sqlite", "redis"], str]:
    """("sqlite", path) or ("redis", url); a ValueError that shows the accepted forms otherwise."""
    forms = "use sqlite:///~/path/sessions.db, sqlite:////abs/path/sessions.db or redis://host:6379/0"
    if not isinstance(url, str):
        raise ValueError(f"session backend url must be a string; {forms}")
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if not path or path == ":memory:":
            raise ValueError(f"session backend {url!r} names no file (an in-memory database is not durable); {forms}")
        if not (path.startswith("/") or path.startswith("~")):
            raise ValueError(
                f"session backend {url!r} has a relative path, which would depend on each actor's working "
                f"directory; {forms}"
            )
        return "sqlite", path
    if url.startswith(("redis://", "rediss://", "unix://")):
        # redis-py reads the path as the database number and silently ignores one that is not a
        # number ("redis://host/abc" would use database 0). A unix:// path is the socket (?db= picks).
        path = urlsplit(url).path.strip("/")
        if not url.startswith("unix://") and path and not path.isdigit():
            raise ValueError(f"session backend {url!r}: the path after the port must be a database number, "
                             f"not {path!r}; {forms}")
        return "redis", url
    raise ValueError(f"session backend {url!r} is not supported; {forms}")
