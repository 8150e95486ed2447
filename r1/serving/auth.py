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


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


class APIKeyChecker:
    def __init__(self, keys: list[str]):
        self._keys = [k.encode("utf-8") for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> str | None:
        """Return the caller's key id (None when auth is off); raise APIError(401) otherwise."""
        if not self._keys:
            return None
        if not authorization or not authorization.startswith("Bearer "):
            raise APIError(401, "missing API key: send it as 'Authorization: Bearer <key>'", code="invalid_api_key")
        offered = authorization[len("Bearer "):].strip().encode("utf-8")
        match = None
        # Compare against every key, without stopping early, so timing does not reveal which matched.
        for key in self._keys:
            if hmac.compare_digest(offered, key):
                match = key
        if match is None:
            raise APIError(401, "invalid API key", code="invalid_api_key")
        return key_id(match.decode("utf-8"))
