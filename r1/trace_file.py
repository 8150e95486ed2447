"""The JSON-lines trace file: an OpenTelemetry span exporter that appends one span per line, and its reader.

Used when `R1_TRACE_FILE` (or `TelemetryConfig.trace_file`) is set: every process of a node appends
to the same file, which makes a whole request's trace readable with nothing but Python (tests, a
quick look on a dev box). Each line: trace_id (32 hex), span_id (16 hex), parent_id (16 hex or
null), name, service, pid, start_ns, end_ns, attributes, status. No rotation and no size cap: meant
for development and tests; production uses OTLP.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

logger = logging.getLogger(__name__)


def span_record(span_: ReadableSpan) -> dict[str, Any]:
    """One JSON-lines record: ids as lowercase hex, times in ns since the epoch."""
    context_ = span_.get_span_context()
    parent = span_.parent
    pid = span_.resource.attributes.get("process.pid", os.getpid()) if span_.resource else os.getpid()
    return {
        "trace_id": format(context_.trace_id, "032x"),
        "span_id": format(context_.span_id, "016x"),
        "parent_id": format(parent.span_id, "016x") if parent is not None and parent.is_valid else None,
        "name": span_.name,
        "service": span_.resource.attributes.get("service.name") if span_.resource else None,
        "pid": pid,
        "start_ns": span_.start_time,
        "end_ns": span_.end_time,
        "attributes": dict(span_.attributes or {}),
        "status": span_.status.status_code.name,
    }


class JsonLinesSpanExporter(SpanExporter):
    """Appends one JSON object per finished span to `path`, one line each.

    Many processes share the file: it is opened with O_APPEND and every line is one `os.write`, so
    lines from different processes never interleave (small writes on a local file system).
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path).expanduser()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"cannot create the trace file's directory {self.path.parent}: {error}") from None
        self._fd: int | None = None
        self._fd_pid: int | None = None
        self._lock = threading.Lock()

    def _descriptor(self) -> int:
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._fd_pid = os.getpid()
        return self._fd

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            lines = [json.dumps(span_record(s), ensure_ascii=False, default=str).encode("utf-8") + b"\n" for s in spans]
            with self._lock:
                fd = self._descriptor()
                for line in lines:
                    os.write(fd, line)
        except OSError as error:
            logger.warning("could not append spans to %s: %s", self.path, error)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._fd is not None and self._fd_pid == os.getpid():
                os.close(self._fd)
            self._fd = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # every span is written when exported


def read_spans(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a JSON-lines trace file (a torn last line from a killed writer is skipped)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
