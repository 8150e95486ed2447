"""SQLite session storage: the default backend, one database file per cluster (single node).

Durability: the database runs in WAL mode and every write is one `BEGIN IMMEDIATE ... COMMIT`
transaction that has finished before the method returns. With `synchronous="full"` (default) each
commit fsyncs the WAL, so an acknowledged turn survives a process kill *and* a power loss. With
`synchronous="normal"` a commit survives the process being killed (the WAL is in the OS page
cache) but the last commits can be lost if the machine itself goes down; it is faster on slow disks.

Several processes may open the same file (each SessionStore actor holds one connection); SQLite's
file lock serialises writers and `busy_timeout_s` bounds the wait. The file must be on a local disk
(network filesystems break SQLite's locking), so on a multi-node cluster use Redis instead.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Literal

from r1.sessions.store import (
    BackendBase,
    Clock,
    Session,
    check_data,
    check_last,
    check_messages,
    check_owner,
    check_session_id,
    check_turn_id,
)

# 2: sessions.data (a stored response's object); a version-1 file gains the column when opened.
SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    next_seq INTEGER NOT NULL DEFAULT 0,
    data TEXT
);
CREATE INDEX IF NOT EXISTS sessions_by_updated_at ON sessions (updated_at);
CREATE TABLE IF NOT EXISTS messages (
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    turn_id TEXT,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_by_turn ON messages (session_id, turn_id) WHERE turn_id IS NOT NULL;
"""


class SQLiteBackend(BackendBase):
    """Sessions in one SQLite file. Thread-safe (one connection behind a lock)."""

    def __init__(
        self,
        path: str | Path,
        *,
        idle_ttl_s: float = 7 * 24 * 3600.0,
        max_stored_messages: int = 10_000,
        clock: Clock = time.time,
        synchronous: Literal["full", "normal"] = "full",
        busy_timeout_s: float = 10.0,
        sweep_interval_s: float | None = 300.0,
    ):
        super().__init__(idle_ttl_s=idle_ttl_s, max_stored_messages=max_stored_messages, clock=clock,
                         sweep_interval_s=sweep_interval_s)
        if synchronous not in ("full", "normal"):
            raise ValueError(f"synchronous={synchronous!r} must be 'full' or 'normal'")
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        try:
            self.path = Path(path).expanduser()
            # Stored chats are private: folders this creates and the database (SQLite gives its -wal
            # and -shm files the database's mode) are readable by the owner only.
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self.path.exists():
                self.path.touch(mode=0o600)
            # isolation_level=None: no implicit transactions; each method opens its own.
            self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise ValueError(f"SQLite could not switch to WAL mode (got {mode}); put the file on a local disk")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            self._init_schema()
        except (OSError, RuntimeError, ValueError, sqlite3.Error) as error:
            # RuntimeError: expanduser of "~user" for a user that does not exist.
            if self._db is not None:
                self._db.close()
            raise ValueError(f"cannot open the session database {path}: {error}; check the path and permissions") from None

    def _rollback(self) -> None:
        """Roll back after a failed statement, unless SQLite already did (it does for some errors,
        such as a full disk, and a second ROLLBACK would raise and hide the real error)."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _init_schema(self) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version not in (0, 1, SCHEMA_VERSION):
                    raise ValueError(
                        f"{self.path} has session schema version {version}, this r1-cluster reads {SCHEMA_VERSION}; "
                        "point sessions.backend_url at a new file"
                    )
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                if version == 1:  # its sessions table predates the data column
                    self._db.execute("ALTER TABLE sessions ADD COLUMN data TEXT")
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    # -- transactions ------------------------------------------------------------------------
    def _write(self, body):
        """Run body(db) in one write transaction; commit (durably) before returning its value."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = body(self._db)
                self._db.execute("COMMIT")
                return result
            except BaseException:
                self._rollback()
                raise

    def _read_messages(self, db: sqlite3.Connection, session_id: str, last: int | None) -> list[dict[str, str]]:
        if last == 0:
            return []
        if last is None:
            rows = db.execute("SELECT role, content FROM messages WHERE session_id=? ORDER BY seq", (session_id,)).fetchall()
        else:
            rows = db.execute(
                "SELECT role, content FROM messages WHERE session_id=? ORDER BY seq DESC LIMIT ?", (session_id, last)
            ).fetchall()[::-1]
        return [{"role": role, "content": content} for role, content in rows]

    @staticmethod
    def _count(db: sqlite3.Connection, session_id: str) -> int:
        return db.execute("SELECT COUNT(*) FROM messages WHERE session_id=?", (session_id,)).fetchone()[0]

    @staticmethod
    def _drop(db: sqlite3.Connection, session_id: str) -> None:
        db.execute("DELETE FROM messages WHERE session_id=?", (session_id,))
        db.execute("DELETE FROM sessions WHERE id=?", (session_id,))

    # -- operations ----------------------------------------------------------------------------
    def open(self, session_id: str, owner: str, *, last: int | None = None) -> Session | None:
        check_session_id(session_id)
        check_owner(owner)
        check_last(last)
        now = self.clock()
        self.maybe_sweep(now)

        def body(db: sqlite3.Connection) -> Session | None:
            row = db.execute("SELECT owner, created_at, updated_at, data FROM sessions WHERE id=?", (session_id,)).fetchone()
            if row is not None and self.is_expired(row[2], now):
                self._drop(db, session_id)
                row = None
            if row is None:
                db.execute("INSERT INTO sessions (id, owner, created_at, updated_at) VALUES (?, ?, ?, ?)",
                           (session_id, owner, now, now))
                return Session(session_id, owner, now, now, 0, [], created=True)
            if row[0] != owner:
                return None
            updated_at = row[2]
            if self.needs_refresh(updated_at, now):
                # A turn starting on a session idle for over half its TTL refreshes it, so the turn
                # has at least half the TTL to finish before the session could expire under it. (Not
                # at every open: each write is an fsync'd commit, and most turns follow recent ones.)
                db.execute("UPDATE sessions SET updated_at=? WHERE id=?", (now, session_id))
                updated_at = now
            return Session(session_id, owner, row[1], updated_at, self._count(db, session_id),
                           self._read_messages(db, session_id, last), data=row[3])

        return self._write(body)

    def get(self, session_id: str, owner: str, *, last: int | None = None) -> Session | None:
        check_session_id(session_id)
        check_owner(owner)
        check_last(last)
        now = self.clock()
        with self._lock:
            # One read transaction, so the metadata and the messages are one snapshot.
            self._db.execute("BEGIN")
            try:
                row = self._db.execute("SELECT owner, created_at, updated_at, data FROM sessions WHERE id=?",
                                       (session_id,)).fetchone()
                if row is None or row[0] != owner or self.is_expired(row[2], now):
                    return None
                return Session(session_id, owner, row[1], row[2], self._count(self._db, session_id),
                               self._read_messages(self._db, session_id, last), data=row[3])
            finally:
                self._db.execute("COMMIT")

    def append(self, session_id: str, owner: str, messages: list[dict[str, str]], *, turn_id: str | None = None,
               create: bool = False, data: str | None = None) -> bool:
        check_session_id(session_id)
        check_owner(owner)
        check_turn_id(turn_id)
        check_data(data)
        messages = check_messages(messages)
        now = self.clock()
        self.maybe_sweep(now)

        def body(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT owner, updated_at, next_seq FROM sessions WHERE id=?", (session_id,)).fetchone()
            if create and (row is None or self.is_expired(row[1], now)):
                if row is not None:
                    self._drop(db, session_id)
                db.execute("INSERT INTO sessions (id, owner, created_at, updated_at) VALUES (?, ?, ?, ?)",
                           (session_id, owner, now, now))
                row = (owner, now, 0)
            if row is None or row[0] != owner or self.is_expired(row[1], now):
                return False
            if turn_id is not None and db.execute(
                "SELECT 1 FROM messages WHERE session_id=? AND turn_id=? LIMIT 1", (session_id, turn_id)
            ).fetchone():
                return True  # a retry of a turn that was already stored
            first = row[2]
            db.executemany(
                "INSERT INTO messages (session_id, seq, role, content, turn_id) VALUES (?, ?, ?, ?, ?)",
                [(session_id, first + i, m["role"], m["content"], turn_id) for i, m in enumerate(messages)],
            )
            next_seq = first + len(messages)
            db.execute("UPDATE sessions SET updated_at=?, next_seq=?, data=COALESCE(?, data) WHERE id=?",
                       (now, next_seq, data, session_id))
            db.execute("DELETE FROM messages WHERE session_id=? AND seq < ?",
                       (session_id, next_seq - self.max_stored_messages))
            return True

        return self._write(body)

    def delete(self, session_id: str, owner: str) -> bool:
        check_session_id(session_id)
        check_owner(owner)
        now = self.clock()

        def body(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT owner, updated_at FROM sessions WHERE id=?", (session_id,)).fetchone()
            if row is None or row[0] != owner or self.is_expired(row[1], now):
                return False
            self._drop(db, session_id)
            return True

        return self._write(body)

    def expire_idle(self, now: float | None = None) -> int:
        cutoff = (self.clock() if now is None else now) - self.idle_ttl_s

        def body(db: sqlite3.Connection) -> int:
            db.execute("DELETE FROM messages WHERE session_id IN (SELECT id FROM sessions WHERE updated_at < ?)", (cutoff,))
            return db.execute("DELETE FROM sessions WHERE updated_at < ?", (cutoff,)).rowcount

        return self._write(body)

    def close(self) -> None:
        with self._lock:
            self._db.close()
