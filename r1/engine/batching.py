"""Batching a delta stream in time: fewer, larger messages when each one costs a network hop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any


def stream_window_s(interval_ms: float, active_streams: int, messages_per_s: float | None) -> float:
    """Seconds a stream gathers tokens before its next message: `interval_ms`, widened so that all
    `active_streams` together send at most `messages_per_s` messages (None: no budget).

    Each message costs the same hops and calls whatever it carries, so with many streams a fixed
    window spends the CPU the model needs on messages; widening it keeps that cost bounded while
    a lone stream keeps the short window.
    """
    window_s = interval_ms / 1000
    if messages_per_s is not None and active_streams > 0:
        window_s = max(window_s, active_streams / messages_per_s)
    return window_s


class StreamBatcher:
    """The next delta of a stream merged with those decoded within `interval_s` after it arrived.

    `interval_s` is a number or a function called for each message (a window that follows the load).

    The pending `anext` lives in a task, so a window that closes never cancels the stream (that
    would abort the request); `close` does, when the caller is done with the stream.
    """

    def __init__(self, deltas: AsyncIterator[Any], interval_s: float | Callable[[], float]) -> None:
        self.deltas = deltas
        self.interval_s = interval_s
        self._pending: asyncio.Future | None = None

    def _fetch(self) -> asyncio.Future:
        if self._pending is None:
            self._pending = asyncio.ensure_future(anext(self.deltas))
        return self._pending

    async def _take(self) -> Any:
        try:
            return await self._fetch()
        finally:
            self._pending = None

    async def next(self) -> Any:
        delta = await self._take()
        interval_s = self.interval_s() if callable(self.interval_s) else self.interval_s
        if interval_s <= 0:
            return delta
        loop = asyncio.get_running_loop()
        deadline = loop.time() + interval_s
        while delta.finish_reason is None and (remaining := deadline - loop.time()) > 0:
            done, _ = await asyncio.wait({self._fetch()}, timeout=remaining)
            if not done:
                break
            delta = delta.followed_by(await self._take())
        return delta

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
