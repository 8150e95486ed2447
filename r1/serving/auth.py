"""API keys: loading them and checking `Authorization: Bearer <key>` in constant time.

Keys come from an environment variable (comma-separated, default `R1_API_KEYS`) and/or a file with
one key per line (`#` comments allowed). With no keys configured the server is open, and the Serve
CLI then binds to loopback only. A key is never logged; `key_id` (a short hash) names the caller
where an identity is needed (e.g. session ownership).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from r1.serving.protocol import APIError


def load_api_keys(env_var: str = "R1_API_KEYS", keys_file: str | None = None) -> list[str]:
    keys = [k.strip() for k in os.environ.get(env_var, "").split(",") if k.strip()]
    if keys_file:
        path = Path(keys_file).expanduser()
        if not path.exists():
            raise ValueError(f"api_keys_file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:  # a directory, no permission, not text
            raise ValueError(f"cannot read api_keys_file {path}: {getattr(error, 'strerror', None) or error}") from None
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    return keys


# `r1 serve` hands its keys to the replicas as SHA-256 digests in this variable (comma-separated hex)
# rather than in plain text: a Ray runtime env's variables are written to Ray's logs and shown on its
# dashboard.
KEY_DIGESTS_ENV = "R1_API_KEY_DIGESTS"


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id(key: str) -> str:
    return key_id_of_digest(key_digest(key))


def key_id_of_digest(digest: str) -> str:
    """The short, loggable name of a key (session ownership): its digest's first 16 hex digits."""
    return digest[:16]


def load_key_digests(env_var: str = "R1_API_KEYS", keys_file: str | None = None) -> list[str]:
    """Digests of the keys `load_api_keys` finds, and those given in KEY_DIGESTS_ENV."""
    digests = [key_digest(key) for key in load_api_keys(env_var, keys_file)]
    for item in os.environ.get(KEY_DIGESTS_ENV, "").split(","):
        item = item.strip().lower()
        if item:
            if len(item) != 64 or any(c not in "0123456789abcdef" for c in item):
                raise ValueError(f"{KEY_DIGESTS_ENV} holds something that is not a SHA-256 hex digest")
            digests.append(item)
    return list(dict.fromkeys(digests))


class APIKeyChecker:
    """Checks `Authorization: Bearer <key>` against the digests of the configured keys."""

    def __init__(self, digests: list[str]):
        self._digests = [bytes.fromhex(d) for d in digests]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> str | None:
        """Return the caller's key id (None when auth is off); raise APIError(401) otherwise."""
        if not self._digests:
            return None
        scheme, _, credentials = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():  # the scheme is case-insensitive (RFC 7235)
            raise APIError(401, "missing API key: send it as 'Authorization: Bearer <key>'", code="invalid_api_key")
        offered = hashlib.sha256(credentials.strip().encode("utf-8")).digest()
        match = None
        # Compare against every key, without stopping early, so timing does not reveal which matched.
        for digest in self._digests:
            if hmac.compare_digest(offered, digest):
                match = digest
        if match is None:
            raise APIError(401, "invalid API key", code="invalid_api_key")
        return key_id_of_digest(match.hex())


def refuse_open_api(required: bool, keys_configured: bool, env_name: str) -> None:
    """`require_api_keys`: a ValueError when keys are required and none are configured (checked by
    `r1 serve` before Ray starts, and by the ingress replica, which `serve run` starts directly)."""
    if required and not keys_configured:
        raise ValueError(f"require_api_keys is set and no API keys are configured ({env_name} is empty or unset "
                         "and no api_keys_file): refusing to serve an open API")
