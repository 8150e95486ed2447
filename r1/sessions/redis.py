"""Redis session storage, for clusters with more than one node.

Per session three keys share one hash tag (`{id}`), so each operation is a single Lua script that
Redis runs atomically (and that works on one Redis Cluster slot):

    r1:session:{id}:meta      hash  owner, created_at, updated_at, data (when an append gave one)
    r1:session:{id}:messages  list  JSON {"role", "content"} per message, oldest first
    r1:session:{id}:turns     list  the last 64 turn ids appended (makes retried appends no-ops)

The idle TTL is checked against the backend's clock inside each script (so expiry is exact and
testable) and enforced by `PEXPIRE` on all three keys, refreshed on every append and when a turn
opens a session idle for over half its TTL, so Redis frees idle sessions itself.

Durability is Redis's: an acknowledged write is in Redis's memory and its append-only file. Run Redis
with `appendonly yes` and `appendfsync always` for the same guarantee as SQLite's synchronous=FULL
(`everysec` may lose the last second if the Redis host fails). The backend logs a warning when the
server it talks to has `appendonly no`. It does not manage Redis Sentinel or Cluster topologies.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

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

logger = logging.getLogger(__name__)
KEY_PREFIX = "r1:session:"
NUM_REMEMBERED_TURNS = 64

# KEYS: meta, messages, turns. ARGV: owner, now, ttl_s, ttl_ms, last (-1 = all), create (0/1).
# Returns {status, created_at, updated_at, num_messages, messages, data ('' = none)}; status 1
# created, 0 found, -1 another owner, -2 missing (create=0).
_OPEN = """
local meta = redis.call('HMGET', KEYS[1], 'owner', 'created_at', 'updated_at', 'data')
local now = tonumber(ARGV[2])
if meta[1] and tonumber(meta[3]) + tonumber(ARGV[3]) < now then
  if ARGV[6] == '0' then return {-2} end
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  meta = {false, false, false, false}
end
if not meta[1] then
  if ARGV[6] == '0' then return {-2} end
  redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'created_at', ARGV[2], 'updated_at', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {1, ARGV[2], ARGV[2], 0, {}, ''}
end
if meta[1] ~= ARGV[1] then return {-1} end
if ARGV[6] == '1' and tonumber(meta[3]) + tonumber(ARGV[3]) / 2 < now then
  -- a turn starting on a session idle for over half its TTL refreshes it (see SQLiteBackend.open)
  redis.call('HSET', KEYS[1], 'updated_at', ARGV[2])
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[4]) end
  meta[3] = ARGV[2]
end
local count = redis.call('LLEN', KEYS[2])
local last = tonumber(ARGV[5])
local items = {}
if last < 0 then
  items = redis.call('LRANGE', KEYS[2], 0, -1)
elseif last > 0 then
  items = redis.call('LRANGE', KEYS[2], -last, -1)
end
return {0, meta[2], meta[3], count, items, meta[4] or ''}
"""

# KEYS: meta, messages, turns. ARGV: owner, now, ttl_s, ttl_ms, max_stored, turn_id ('' = none),
# remembered turns, create (0/1: a missing or expired session is created first), data ('' = keep
# the session's), then one JSON message per argument. Returns 1 appended, 2 duplicate turn, 0 missing.
_APPEND = """
local meta = redis.call('HMGET', KEYS[1], 'owner', 'updated_at')
local expired = meta[1] and tonumber(meta[2]) + tonumber(ARGV[3]) < tonumber(ARGV[2])
if ARGV[8] == '1' and ((not meta[1]) or expired) then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'created_at', ARGV[2], 'updated_at', ARGV[2])
  meta = {ARGV[1], ARGV[2]}
  expired = false
end
if (not meta[1]) or meta[1] ~= ARGV[1] or expired then
  return 0
end
if ARGV[6] ~= '' then
  if redis.call('LPOS', KEYS[3], ARGV[6]) then return 2 end
  redis.call('RPUSH', KEYS[3], ARGV[6])
  redis.call('LTRIM', KEYS[3], -tonumber(ARGV[7]), -1)
end
for i = 10, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[5]), -1)
redis.call('HSET', KEYS[1], 'updated_at', ARGV[2])
if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'data', ARGV[9]) end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[4]) end
return 1
"""

# KEYS: meta, messages, turns. ARGV: owner, now, ttl_s. Returns 1 deleted, 0 missing.
_DELETE = """
local meta = redis.call('HMGET', KEYS[1], 'owner', 'updated_at')
if (not meta[1]) or meta[1] ~= ARGV[1] or tonumber(meta[2]) + tonumber(ARGV[3]) < tonumber(ARGV[2]) then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 1
"""

# KEYS: meta, messages, turns. ARGV: cutoff. Deletes the session if idle since before cutoff.
_EXPIRE_ONE = """
local updated = redis.call('HGET', KEYS[1], 'updated_at')
if updated and tonumber(updated) < tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  return 1
end
return 0
"""


def _keys(session_id: str) -> list[str]:
    base = f"{KEY_PREFIX}{{{session_id}}}"
    return [f"{base}:meta", f"{base}:messages", f"{base}:turns"]


class RedisBackend(BackendBase):
    """Sessions in Redis (redis-py). Connects lazily: constructing it does no network I/O."""

    def __init__(
        self,
        url: str,
        *,
        idle_ttl_s: float = 7 * 24 * 3600.0,
        max_stored_messages: int = 10_000,
        clock: Clock = time.time,
        timeout_s: float = 10.0,
    ):
        # Redis frees idle keys itself (PEXPIRE), so there is no periodic sweep.
        super().__init__(idle_ttl_s=idle_ttl_s, max_stored_messages=max_stored_messages, clock=clock,
                         sweep_interval_s=None)
        import redis

        self.url = url
        try:
            self._redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout_s,
                                               socket_connect_timeout=timeout_s)
        except ValueError as error:
            raise ValueError(f"session backend {url!r} is not a valid Redis URL: {error}") from None
        self._open = self._redis.register_script(_OPEN)
        self._append = self._redis.register_script(_APPEND)
        self._delete = self._redis.register_script(_DELETE)
        self._expire_one = self._redis.register_script(_EXPIRE_ONE)
        self._checked_persistence = False

    def _ttl_args(self, now: float) -> list[Any]:
        return [repr(now), repr(self.idle_ttl_s), max(1, int(self.idle_ttl_s * 1000))]

    def _check_persistence(self) -> None:
        """Warn once when Redis would lose acknowledged writes on a restart."""
        if self._checked_persistence:
            return
        self._checked_persistence = True
        try:
            appendonly = self._redis.config_get("appendonly").get("appendonly")
        except Exception:  # CONFIG is often disabled on managed Redis; nothing to check then
            return
        if appendonly != "yes":
            logger.warning("Redis at %s runs with appendonly=%s: sessions are lost if Redis restarts; "
                           "set appendonly yes and appendfsync always", self._redis.connection_pool.connection_kwargs.get("host"),
                           appendonly)

    def _read(self, session_id: str, owner: str, last: int | None, create: bool) -> Session | None:
        check_session_id(session_id)
        check_owner(owner)
        check_last(last)
        now = self.clock()
        reply = self._open(keys=_keys(session_id),
                           args=[owner, *self._ttl_args(now), -1 if last is None else last, "1" if create else "0"])
        self._check_persistence()
        status = int(reply[0])
        if status < 0:
            return None
        messages = [json.loads(item) for item in reply[4]]
        return Session(session_id, owner, float(reply[1]), float(reply[2]), int(reply[3]), messages, created=status == 1,
                       data=reply[5] or None)

    def open(self, session_id: str, owner: str, *, last: int | None = None) -> Session | None:
        return self._read(session_id, owner, last, create=True)

    def get(self, session_id: str, owner: str, *, last: int | None = None) -> Session | None:
        return self._read(session_id, owner, last, create=False)

    def append(self, session_id: str, owner: str, messages: list[dict[str, str]], *, turn_id: str | None = None,
               create: bool = False, data: str | None = None) -> bool:
        check_session_id(session_id)
        check_owner(owner)
        check_turn_id(turn_id)
        check_data(data)
        messages = check_messages(messages)
        now = self.clock()
        encoded = [json.dumps(m, ensure_ascii=False) for m in messages]
        reply = self._append(keys=_keys(session_id), args=[
            owner, *self._ttl_args(now), self.max_stored_messages, turn_id or "", NUM_REMEMBERED_TURNS,
            "1" if create else "0", data or "", *encoded,
        ])
        return int(reply) > 0

    def delete(self, session_id: str, owner: str) -> bool:
        check_session_id(session_id)
        check_owner(owner)
        now = self.clock()
        return int(self._delete(keys=_keys(session_id), args=[owner, repr(now), repr(self.idle_ttl_s)])) == 1

    def expire_idle(self, now: float | None = None) -> int:
        """Scan for sessions idle past the TTL by this backend's clock (Redis's own expiry does this in real time)."""
        cutoff = (self.clock() if now is None else now) - self.idle_ttl_s
        removed = 0
        for meta_key in self._redis.scan_iter(match=f"{KEY_PREFIX}*:meta", count=500):
            session_id = meta_key[len(KEY_PREFIX) + 1:-len("}:meta")]
            removed += int(self._expire_one(keys=_keys(session_id), args=[repr(cutoff)]))
        return removed

    def close(self) -> None:
        self._redis.close()
