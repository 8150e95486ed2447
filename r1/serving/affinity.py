"""Prefix affinity: which LLM-server replica a request should go to, so that its prefix cache helps.

Each replica keeps its own prefix cache (`r1.engine.prefix_cache`), so a chat's later turns find
their history cached only on the replica that served the earlier ones, and requests sharing a long
system text only where it was computed before. `affinity_key` reduces a request's prompt to a start
that stays the same as such prompts grow: a chat's opening (its system messages and first user
message: every later turn repeats it), at most `KEY_CHARS` characters of it, so chats that share a
system text that long share a key; the first `TEXT_KEY_CHARS` characters of a raw prompt or
`TOKEN_KEY_IDS` ids of a token prompt, none for a shorter one (a raw prompt's turns cannot be told
apart from other prompts). `rank_replicas` orders the replicas for a key by rendezvous (highest
random weight) hashing: every router ranks them the same way without sharing state, and when
replicas come or go only the keys of those move.
`cluster.serve.routing.PrefixAffinityRouter` routes with them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

KEY_CHARS = 512
TEXT_KEY_CHARS = 256
TOKEN_KEY_IDS = 64
OPENING_ROLES = ("system", "developer")

Replica = TypeVar("Replica")


def _message_text(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, list):  # content parts: their text
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict) and isinstance(part.get("text"), str))
    text = content if isinstance(content, str) else ""
    return f"{message.get('role', '')}\n{text}\n"


def affinity_key(prompt: Any) -> bytes | None:
    """The start of a prompt (chat messages, text or token ids) that routing keeps together (module
    doc), or None for a raw prompt too short for one, or a prompt of a shape this does not know."""
    if isinstance(prompt, str):
        return None if len(prompt) < TEXT_KEY_CHARS else b"text:" + prompt[:TEXT_KEY_CHARS].encode("utf-8", "surrogatepass")
    if not isinstance(prompt, list) or not prompt:
        return None
    if all(isinstance(t, int) for t in prompt):
        return None if len(prompt) < TOKEN_KEY_IDS else b"ids:" + ",".join(map(str, prompt[:TOKEN_KEY_IDS])).encode()
    if not all(isinstance(m, dict) for m in prompt):
        return None
    opening = ""
    for message in prompt:
        opening += _message_text(message)
        if message.get("role") not in OPENING_ROLES or len(opening) >= KEY_CHARS:
            break
    return b"chat:" + opening[:KEY_CHARS].encode("utf-8", "surrogatepass")


def rank_replicas(key: bytes, replicas: Sequence[Replica], name: Callable[[Replica], str]) -> list[Replica]:
    """`replicas` from the one `key` belongs to most to the one it belongs to least (rendezvous hashing
    on `name(replica)`, a stable id of each)."""
    def weight(replica: Replica) -> bytes:
        return hashlib.blake2b(key + b"\0" + name(replica).encode(), digest_size=8).digest()

    return sorted(replicas, key=weight, reverse=True)
