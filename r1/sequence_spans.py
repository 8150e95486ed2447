"""Spans for sequences inside a batched component (the engine's model runner, a model shard).

A batched component sees many requests at once (`add(seq_ids, ...)`, `step(seq_ids, ...)`,
`remove(seq_ids)`), so a `with span(...)` per call cannot follow one request. Here:

- `RequestCarriers` is the table, in the process that owns the engine, from a sequence id (the
  engine's request id) to its request's trace carrier; the server registers a carrier when a stream
  starts and drops it when the stream ends.
- `SequenceSpans` keeps one open span per sequence in the component: opened when the sequence is
  added (as a child of its carrier), counting the decode steps it took part in, ended when it is
  removed. A model shard holds one, so each request gets one span per shard.

Both are no-ops for sequences without a carrier (tracing off, or an untraced caller). Never imports ray.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable, Mapping

from r1.telemetry import clean_attributes, end_span, start_span, tracing_enabled

# Past this many open spans the oldest are ended, so sequences that never reach `remove` (a stage
# restarted, a caller crashed) cannot grow the table without bound.
MAX_OPEN_SPANS = 4096


class RequestCarriers:
    """Thread-safe map sequence id → W3C carrier (the engine's decode thread reads it)."""

    def __init__(self) -> None:
        self._carriers: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()

    def register(self, seq_id: str, carrier: Mapping[str, str] | None) -> None:
        if carrier:
            with self._lock:
                self._carriers[seq_id] = dict(carrier)

    def discard(self, seq_id: str) -> None:
        with self._lock:
            self._carriers.pop(seq_id, None)

    def for_sequences(self, seq_ids: Iterable[str]) -> dict[str, dict[str, str]]:
        """Carriers of those of `seq_ids` that have one ({} when none do: nothing extra to send)."""
        if not self._carriers:
            return {}
        with self._lock:
            return {seq_id: self._carriers[seq_id] for seq_id in seq_ids if seq_id in self._carriers}

    def __len__(self) -> int:
        return len(self._carriers)


class SequenceSpans:
    """One span per sequence while it lives in a batched component."""

    def __init__(self, name: str, max_open: int = MAX_OPEN_SPANS, **attributes: Any) -> None:
        assert max_open >= 1
        self.name = name
        self.max_open = max_open
        self.attributes = clean_attributes(attributes)
        self._open: dict[str, list[Any]] = {}  # seq_id -> [span, decode steps]
        self._lock = threading.Lock()

    def open(self, seq_ids: Iterable[str], carriers: Mapping[str, Mapping[str, str]] | None, **attributes: Any) -> None:
        """Start a span for each of `seq_ids` that has a carrier; `attributes` go on each of them."""
        if not carriers or not tracing_enabled():
            return
        extra = {**self.attributes, **clean_attributes(attributes)}
        evicted = []
        with self._lock:
            for seq_id in seq_ids:
                carrier = carriers.get(seq_id)
                if not carrier or seq_id in self._open:
                    continue
                self._open[seq_id] = [start_span(self.name, carrier, **extra), 0]
            while len(self._open) > self.max_open:
                evicted.append(self._open.pop(next(iter(self._open))))
        for span_, steps in evicted:
            end_span(span_, decode_steps=steps, **{"r1.evicted": True})

    def count_step(self, seq_ids: Iterable[str]) -> None:
        if not self._open:
            return
        with self._lock:
            for seq_id in seq_ids:
                entry = self._open.get(seq_id)
                if entry is not None:
                    entry[1] += 1

    def close(self, seq_ids: Iterable[str], **attributes: Any) -> None:
        if not self._open:
            return
        with self._lock:
            closing = [self._open.pop(seq_id) for seq_id in seq_ids if seq_id in self._open]
        for span_, steps in closing:
            end_span(span_, decode_steps=steps, **attributes)

    def close_all(self, **attributes: Any) -> None:
        with self._lock:
            closing, self._open = list(self._open.values()), {}
        for span_, steps in closing:
            end_span(span_, decode_steps=steps, **attributes)

    def __len__(self) -> int:
        return len(self._open)
