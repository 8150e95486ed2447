"""Dialog sessions: durable chat history per session, windowed into the prompt.

Pure library (no Ray): storage backends (`SQLiteBackend`, `RedisBackend`), the prompt window, the
partition hash and the turn plan. The SessionStore actors in `actors/session_store.py` wrap it.
"""

from r1.sessions.partition import partition_for
from r1.sessions.store import (
    Session,
    SessionBackend,
    check_session_id,
    new_session_id,
    open_backend,
    parse_backend_url,
    pending_session,
)
from r1.sessions.turn import Turn, plan_turn, resolve_session_id
from r1.sessions.window import Window, build_window, chat_token_counter, prompt_token_budget

__all__ = [
    "Session", "SessionBackend", "Turn", "Window", "build_window", "chat_token_counter", "check_session_id",
    "new_session_id", "open_backend", "parse_backend_url", "partition_for", "pending_session", "plan_turn",
    "prompt_token_budget", "resolve_session_id",
]
