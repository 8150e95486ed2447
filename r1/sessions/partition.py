"""Which SessionStore partition owns a session: a stable hash of the id, the same in every process.

Python's built-in `hash` of a string changes between processes (hash randomisation), so two Serve
replicas would route one session to different actors; sha256 does not.
"""

from __future__ import annotations

import hashlib


def partition_for(session_id: str, num_partitions: int) -> int:
    """The partition index in [0, num_partitions) that owns `session_id`."""
    if not isinstance(num_partitions, int) or num_partitions < 1:
        raise ValueError(f"num_partitions={num_partitions!r} must be an integer >= 1")
    digest = hashlib.sha256(session_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_partitions
