"""One chat turn with a session: which session, what the model sees, what is stored afterwards.

A turn reads the session once (before generating) and appends the request's messages together with
the reply once (after generating), as one unit. Two concurrent turns on one session therefore both
get stored, each exchange contiguous, in the order their appends arrive; each was generated
without seeing the other. A failed or refused generation stores nothing; a session the server made
for a turn that named none is stored by that turn's append (`pending_session`), so a failed first
turn leaves no session behind.

System messages of a request shape that request only; they are not stored.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Sequence

from r1.chat_template import continued_message, continues_reasoning
from r1.sessions.store import Session, check_messages, check_session_id
from r1.sessions.window import Message, TokenCounter, build_window


@dataclass(frozen=True)
class Turn:
    session_id: str
    owner: str
    # True when this turn created the session (the response then carries the new id).
    created: bool
    # Makes the final append idempotent when it is retried after a store restart.
    turn_id: str
    prompt: list[Message]
    new_messages: list[Message]
    num_history_messages: int
    num_dropped_for_tokens: int
    # The session is not stored yet (`pending_session`): the turn's append creates it.
    pending: bool = False

    def exchange(self, reply: str) -> list[Message]:
        """What to append once the reply is known: the request's messages, then the assistant's; a
        start of the assistant's message the reply continues (`prefix`) becomes one message with it
        (a start inside the reasoning adds nothing: the reasoning is not stored)."""
        continued = continued_message(self.new_messages)
        if continued is None:
            return [*self.new_messages, {"role": "assistant", "content": reply}]
        start = "" if continues_reasoning(continued) else continued["content"]
        return [*self.new_messages[:-1], {"role": "assistant", "content": start + reply}]


def resolve_session_id(body_value: object, header_value: str | None) -> str | None:
    """The session a request names (body `session_id` or `X-Session-Id` header), validated; None if neither."""
    if body_value is not None and header_value is not None and body_value != header_value:
        raise ValueError("session_id in the body and the X-Session-Id header differ; send one of them")
    value = body_value if body_value is not None else header_value
    return None if value is None else check_session_id(value)


def new_turn_id() -> str:
    return secrets.token_urlsafe(12)


def turn_messages(request_messages: Sequence[Message]) -> tuple[list[Message], list[Message]]:
    """(all messages, the ones to store): validated; a turn needs at least one non-system message."""
    messages = check_messages(list(request_messages))
    if request_messages and continued_message(list(request_messages)) is not None:
        messages[-1]["prefix"] = True  # the reply continues it (`Turn.exchange`)
    new_messages = [m for m in messages if m["role"] != "system"]
    if not new_messages:
        raise ValueError("a turn in a session needs at least one non-system message (the user's message)")
    return messages, new_messages


def plan_turn(
    session: Session,
    request_messages: Sequence[Message],
    *,
    window_messages: int,
    token_budget: int | None = None,
    count_tokens: TokenCounter | None = None,
) -> Turn:
    """The turn for `request_messages` on `session` (read with at least `window_messages` of history)."""
    messages, new_messages = turn_messages(request_messages)
    window = build_window(session.messages, messages, max_messages=window_messages, token_budget=token_budget,
                          count_tokens=count_tokens)
    return Turn(
        session_id=session.session_id,
        owner=session.owner,
        created=session.created,
        turn_id=new_turn_id(),
        prompt=window.messages,
        new_messages=new_messages,
        num_history_messages=window.num_history_messages,
        num_dropped_for_tokens=window.num_dropped_for_tokens,
        pending=session.pending,
    )
