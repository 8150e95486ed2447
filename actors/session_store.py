"""SessionStore actors and the client the Serve ingress uses to reach them.

`num_partitions` named actors (`r1-sessions-<config digest>-<i>` in the configured namespace), each
wrapping one `r1.sessions` backend; a session lives on partition `partition_for(id, N)`. The actors
are *detached*: they are created by whichever ingress replica first needs them, and must outlive
that replica when Serve scales it down. `max_restarts=-1` brings a crashed actor back; it reopens the
same storage, and since every write was committed before it was acknowledged, nothing is lost.
The digest in the name (of the storage settings and the actor protocol version) means a redeploy
with different settings gets fresh actors instead of silently reusing old ones; `stop_session_actors`
removes them all (do that when the application is shut down for good).

Ordering: the actor is a plain (non-async) actor, so it runs one call at a time. Every read and
append of a session goes through its one actor, each call is one storage transaction, and a turn's
exchange is one append, so concurrent turns on a session are applied whole, one after the other,
and two concurrent creates of one id make one session (the storage also enforces both).

With SQLite the actors are pinned to the head node (the file is on its disk); use Redis when the
head node cannot run them (e.g. KubeRay heads started with num-cpus 0) or nodes come and go.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from types import SimpleNamespace
from typing import Any, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from actors import metrics
from actors.tracing import setup_actor_tracing
from r1.config import ModelConfig, SessionConfig
from r1.serving.protocol import APIError
from r1.sessions import (
    Session,
    Turn,
    check_session_id,
    open_backend,
    parse_backend_url,
    partition_for,
    pending_session,
    plan_turn,
    prompt_token_budget,
    resolve_session_id,
)
from r1.sessions.turn import turn_messages
from r1.sessions.window import Message, TokenCounter, chat_token_counter
from r1.telemetry import inject_context, span

logger = logging.getLogger("ray.serve")

ACTOR_NAME_PREFIX = "r1-sessions-"
SESSION_HEADER = "X-Session-Id"
# Ray retries a call that was in flight when its actor died, once the actor is back. Safe: reads
# and deletes are idempotent, `open` is get-or-create, appends carry a turn id.
MAX_TASK_RETRIES = 3
# Bumped when the actor's methods change, so a deploy never talks to detached actors of an older version.
ACTOR_PROTOCOL_VERSION = 4  # 2: every method takes a `trace` carrier; 3: `append` can create; 4: and store data
# Config fields that change what an actor does; the ingress-side ones (window, timeouts) do not.
_ACTOR_FIELDS = ("num_partitions", "backend_url", "idle_ttl_s", "max_stored_messages", "sqlite_synchronous",
                 "sweep_interval_s", "num_cpus", "call_timeout_s")


class SessionStoreActor:
    """One partition of the session store: a thin shell around an `r1.sessions` backend."""

    def __init__(self, config: dict[str, Any]):
        setup_actor_tracing("session-store")
        metrics.start_resource_reporter("session_store")
        config = SessionConfig.model_validate(config)
        self.backend = open_backend(
            config.backend_url,
            idle_ttl_s=config.idle_ttl_s,
            max_stored_messages=config.max_stored_messages,
            sqlite_synchronous=config.sqlite_synchronous,
            sweep_interval_s=config.sweep_interval_s,
            timeout_s=config.call_timeout_s,
        )

    def open(self, session_id: str, owner: str, last: int | None = None, trace: dict | None = None) -> Session | None:
        with span("session_store.open", trace) as current:
            session = self.backend.open(session_id, owner, last=last)
            current.set_attribute("found", session is not None)
            return session

    def get(self, session_id: str, owner: str, last: int | None = None, trace: dict | None = None) -> Session | None:
        with span("session_store.get", trace):
            return self.backend.get(session_id, owner, last=last)

    def append(self, session_id: str, owner: str, messages: list[Message], turn_id: str | None = None,
               create: bool = False, data: str | None = None, trace: dict | None = None) -> bool:
        with span("session_store.append", trace, num_messages=len(messages), create=create) as current:
            stored = self.backend.append(session_id, owner, messages, turn_id=turn_id, create=create, data=data)
            current.set_attribute("stored", stored)
            return stored

    def delete(self, session_id: str, owner: str, trace: dict | None = None) -> bool:
        with span("session_store.delete", trace):
            return self.backend.delete(session_id, owner)

    def expire_idle(self, now: float | None = None) -> int:
        return self.backend.expire_idle(now)

    def ping(self) -> str:
        return "ok"


RemoteSessionStore = ray.remote(SessionStoreActor)


def config_digest(config: SessionConfig) -> str:
    fields = {name: getattr(config, name) for name in _ACTOR_FIELDS}
    fields["protocol"] = ACTOR_PROTOCOL_VERSION
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode("utf-8")).hexdigest()[:8]


def actor_name(config: SessionConfig, index: int) -> str:
    return f"{ACTOR_NAME_PREFIX}{config_digest(config)}-{index}"


def actor_options(config: SessionConfig, index: int) -> dict[str, Any]:
    options: dict[str, Any] = {
        "name": actor_name(config, index),
        "namespace": config.namespace,
        "get_if_exists": True,
        "lifetime": "detached",
        "max_restarts": -1,
        "max_task_retries": MAX_TASK_RETRIES,
        "num_cpus": config.num_cpus,
    }
    if parse_backend_url(config.backend_url)[0] == "sqlite":
        options["resources"] = {"node:__internal_head__": 0.001}
    return options


def stop_session_actors(namespace: str = "r1-cluster") -> int:
    """Kill every SessionStore actor in `namespace` (stored sessions stay); the number killed."""
    killed = 0
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == namespace and entry["name"].startswith(ACTOR_NAME_PREFIX):
            try:
                ray.kill(ray.get_actor(entry["name"], namespace=namespace), no_restart=True)
                killed += 1
            except ValueError:  # already gone
                pass
    return killed


def token_counting(model: ModelConfig, tokenizer: Any | None = None) -> tuple[TokenCounter, int]:
    """(count_tokens, context_tokens) for `model`, so the window respects its context; loads no
    weights, and no tokenizer when the caller has one."""
    from r1.model import context_length, load_model_config, load_tokenizer

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
    context_tokens = context_length(SimpleNamespace(config=load_model_config(model)), tokenizer)
    return chat_token_counter(tokenizer), context_tokens


class SessionClient:
    """Routes session calls to the partition actors, with deadlines; failures become `APIError`s.

    Every method is a coroutine for the ingress's event loop. A call that finds its actor dead gets
    the actor again by name (re-creating it if it is gone for good) and is retried once.
    """

    def __init__(self, config: SessionConfig | dict[str, Any], *, count_tokens: TokenCounter | None = None,
                 context_tokens: int | None = None):
        self.config = config if isinstance(config, SessionConfig) else SessionConfig.model_validate(config)
        if (count_tokens is None) != (context_tokens is None):
            raise ValueError("pass count_tokens and context_tokens together (see token_counting(model_config))")
        if self.config.window_tokens is not None and count_tokens is None:
            raise ValueError("sessions.window_tokens is set but no tokenizer was given to count tokens")
        self.count_tokens = count_tokens
        self.context_tokens = context_tokens
        self._config_dict = self.config.model_dump()
        self._actors: list[Any] = [None] * self.config.num_partitions

    # -- actors --------------------------------------------------------------------------------
    def actor(self, index: int, *, refresh: bool = False) -> Any:
        if refresh or self._actors[index] is None:
            options = actor_options(self.config, index)
            self._actors[index] = RemoteSessionStore.options(**options).remote(self._config_dict)
        return self._actors[index]

    def start_actors(self) -> None:
        """Get (or create) every partition's actor without waiting for it. A partition first needed by a
        request would otherwise start its worker process (seconds of CPU) inside that request."""
        for index in range(self.config.num_partitions):
            self.actor(index)

    def actor_for(self, session_id: str) -> Any:
        return self.actor(partition_for(session_id, self.config.num_partitions))

    async def _call(self, session_id: str, method: str, *args: Any) -> Any:
        index = partition_for(session_id, self.config.num_partitions)
        # A child of the caller's current span (the ingress's request span); the actor continues it.
        with span(f"session.{method}", partition=index):
            return await self._call_partition(index, method, args)

    async def _call_partition(self, index: int, method: str, args: tuple) -> Any:
        timeout_s = self.config.call_timeout_s
        for attempt in range(2):
            actor = self.actor(index, refresh=attempt > 0)
            try:
                return await asyncio.wait_for(getattr(actor, method).remote(*args, trace=inject_context()),
                                              timeout=timeout_s)
            except (asyncio.TimeoutError, GetTimeoutError):
                raise APIError(503, f"the session store did not answer within {timeout_s:.0f}s; retry later",
                               code="session_store_unavailable") from None
            except RayTaskError as error:
                logger.warning("session store %s failed: %s", method, error.cause if hasattr(error, "cause") else error)
                raise APIError(503, "the session store failed; retry later", code="session_store_unavailable") from None
            except RayActorError as error:
                if attempt == 0:
                    logger.warning("session store actor %d unavailable (%s); retrying once", index, type(error).__name__)
                    continue
                raise APIError(503, "the session store is unavailable; retry later", code="session_store_unavailable") from None
        raise AssertionError("unreachable")

    async def ready(self) -> None:
        """Wait until every partition actor answers (for startup checks and tests)."""
        await asyncio.gather(*(self._ping(index) for index in range(self.config.num_partitions)))

    async def _ping(self, index: int) -> None:
        try:
            await asyncio.wait_for(self.actor(index).ping.remote(), timeout=self.config.call_timeout_s)
        except (asyncio.TimeoutError, RayActorError, RayTaskError) as error:
            raise APIError(503, f"session store partition {index} is not available ({type(error).__name__})",
                           code="session_store_unavailable") from None

    # -- the chat-completion path ----------------------------------------------------------------
    async def begin_turn(self, body_session_id: Any, header_session_id: str | None, owner: str | None,
                         messages: Sequence[Message], max_new_tokens: int | None = None) -> Turn:
        """Open (or create) the request's session and plan the prompt. 400 bad id/messages, 404 not yours."""
        session = await self.open_session(body_session_id, header_session_id, owner, messages)
        return await self.plan(session, messages, max_new_tokens)

    async def open_session(self, body_session_id: Any, header_session_id: str | None, owner: str | None,
                           messages: Sequence[Message]) -> Session:
        """`begin_turn`'s first half: check the id and the messages' shape, then open (or create) the
        session. 400 bad id/messages, 404 not yours. It sends the store no message text, so the
        ingress runs it alongside the input screening and plans the screened messages after; a
        request refused in between gives the session to `abandon`. A request that names no session
        gets a new one without a call to the store (`pending_session`): `finish_turn` stores it with
        its first exchange."""
        try:
            session_id = resolve_session_id(body_session_id, header_session_id)
        except ValueError as error:
            raise APIError(400, str(error), param="session_id", code="invalid_session") from None
        try:
            turn_messages(messages)
        except ValueError as error:
            raise APIError(400, str(error), param="messages", code="invalid_value") from None
        if session_id is None:
            return pending_session(owner or "")
        session = await self._call(session_id, "open", session_id, owner or "", self.config.window_messages)
        if session is None:
            raise _not_found(session_id)
        return session

    async def plan(self, session: Session, messages: Sequence[Message], max_new_tokens: int | None = None) -> Turn:
        """`begin_turn`'s second half: the turn for `messages` on the opened `session` (its history
        window and the prompt). 400 if the chat template refuses them (a session this request
        created is removed first)."""
        budget = None
        if self.count_tokens is not None:
            budget = prompt_token_budget(self.context_tokens, max_new_tokens, window_tokens=self.config.window_tokens,
                                         reply_reserve_tokens=self.config.reply_reserve_tokens)
        try:
            return plan_turn(session, messages, window_messages=self.config.window_messages, token_budget=budget,
                             count_tokens=self.count_tokens)
        except ValueError as error:  # bad messages, or the chat template refused them (r1/chat_template.py)
            await self.abandon(session)
            raise APIError(400, str(error), param="messages", code="invalid_value") from None

    async def abandon(self, opened: Session | Turn) -> None:
        """A turn that stores nothing (refused, failed, or its client went away), given as its opened
        session or as the planned turn: delete the session if this turn created it, so no empty
        session is left behind under an id nobody was given. A pending session was never stored."""
        if opened.created and not opened.pending:
            await self._delete_quietly(opened.session_id, opened.owner)

    async def _delete_quietly(self, session_id: str, owner: str) -> None:
        try:
            await self._call(session_id, "delete", session_id, owner)
        except APIError:  # the store is down: the empty session expires with its idle TTL
            logger.info("could not delete the empty session %s… of a failed turn", session_id[:6])

    async def finish_turn(self, turn: Turn, reply: str, data: str | None = None) -> bool:
        """Store the turn's messages and the (screened) reply, and `data` with them (a stored
        response's object); False if the session was deleted meanwhile."""
        try:
            stored = await self._call(turn.session_id, "append", turn.session_id, turn.owner, turn.exchange(reply),
                                      turn.turn_id, turn.pending, data)
        except APIError:
            metrics.record_session_turn("failed")
            raise
        metrics.record_session_turn("stored" if stored else "not_stored")
        if not stored:
            logger.info("session %s… was deleted or expired during a turn; the exchange was not stored", turn.session_id[:6])
        return stored

    async def read(self, session_id: str, owner: str | None) -> Session | None:
        """A stored session with every message (a stored response's conversation); None when missing,
        expired, not `owner`'s, or not an id the store could hold."""
        if not _storable(session_id):
            return None
        return await self._call(session_id, "get", session_id, owner or "", None)

    async def remove(self, session_id: str, owner: str | None) -> bool:
        """Delete a stored session; False when missing, expired, not `owner`'s or not a valid id."""
        return _storable(session_id) and await self._call(session_id, "delete", session_id, owner or "")

    # -- the session routes ------------------------------------------------------------------
    async def history(self, session_id: str, owner: str | None) -> dict[str, Any]:
        """Body of GET /v1/sessions/{id}: every stored message. 404 when missing, expired or not yours."""
        _check_path_id(session_id)
        session = await self._call(session_id, "get", session_id, owner or "", None)
        if session is None:
            raise _not_found(session_id)
        return session.to_json()

    async def delete(self, session_id: str, owner: str | None) -> dict[str, Any]:
        """Body of DELETE /v1/sessions/{id}. 404 when missing, expired or not yours."""
        _check_path_id(session_id)
        if not await self._call(session_id, "delete", session_id, owner or ""):
            raise _not_found(session_id)
        return {"id": session_id, "object": "session.deleted", "deleted": True}


def _storable(session_id: str) -> bool:
    try:
        check_session_id(session_id)
    except ValueError:
        return False
    return True


def _check_path_id(session_id: str) -> None:
    try:
        check_session_id(session_id)
    except ValueError as error:
        raise APIError(400, str(error), param="session_id", code="invalid_session") from None


def _not_found(session_id: str) -> APIError:
    return APIError(404, f"session '{session_id}' does not exist (or has expired)", param="session_id",
                    code="session_not_found")
