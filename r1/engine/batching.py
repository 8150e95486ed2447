"""Batching a delta stream in time: fewer, larger messages when each one costs a network hop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any


class StreamBatcher:
    """The next delta of a stream merged with those decoded within `interval_s` after it arrived.

    The pending `anext` lives in a task, so a window that closes never cancels the stream (that
    would abort the request); `close` does, when the caller is done with the stream.
    """

    def __init__(self, deltas: AsyncIterator[Any], interval_s: float) -> None:
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
        if self.interval_s <= 0:
            return delta
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.interval_s
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
