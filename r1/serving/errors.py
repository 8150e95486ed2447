"""The error a request gets: an HTTP status and OpenAI's error fields (message, type, param, code)."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _error_type(status)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_type(status: int) -> str:
    return {
        400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
        413: "invalid_request_error",
        422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable",
    }.get(status, "server_error")
