"""Tracing for r1-cluster: one OpenTelemetry trace per request or training run, across processes.

Each process sets tracing up once, from a `TelemetryConfig` or from environment variables (a Ray
worker does it lazily on its first span, so the driver only has to pass `telemetry_env_vars(...)`
in its runtime_env). Exporters: OTLP (gRPC or HTTP) when an endpoint is set, a JSON-lines file when
`R1_TRACE_FILE` is set (one span per line, appended by every process of the node), or none.

Context crosses process boundaries as a W3C `traceparent` carrier (a plain dict) that callers put
into the bodies of their Ray calls: `inject_context()` on one side, `span(name, carrier)` on the
other. With tracing off every helper is a cheap no-op and `inject_context()` returns `{}`.

Span attributes hold sizes and ids only; `content_attributes` adds prompt/completion text solely
when `record_content` was opted into. Exception messages are not recorded either (they may quote
user input): a failed span gets its exception's type name. The JSON-lines exporter lives in
r1/trace_file.py, metrics in r1/metrics.py; this module never imports ray.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import INVALID_SPAN, Span, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from r1.config import TelemetryConfig
from r1.trace_file import JsonLinesSpanExporter

logger = logging.getLogger(__name__)

ENV_TRACE_FILE = "R1_TRACE_FILE"
ENV_EXPORTER = "R1_TRACE_EXPORTER"
ENV_RECORD_CONTENT = "R1_TRACE_CONTENT"
ENV_SERVICE_NAME = "OTEL_SERVICE_NAME"
ENV_RESOURCE_INTERVAL = "R1_RESOURCE_SAMPLE_INTERVAL_S"
ENV_OTLP_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
ENV_OTLP_TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
ENV_OTLP_PROTOCOL = "OTEL_EXPORTER_OTLP_PROTOCOL"
ENV_OTLP_TRACES_PROTOCOL = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
TRACEPARENT_HEADER = "traceparent"
TRACE_ID_HEADER = "X-Trace-Id"
OTLP_PROTOCOLS = ("grpc", "http/protobuf")
_TRUE = {"1", "true", "yes", "on"}
# Longer headers are ignored (OTel's propagator ignores them too).
MAX_TRACEPARENT_CHARS = 512
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_PROPAGATOR = TraceContextTextMapPropagator()


class _State:
    """This process's tracing: set up at most once per pid (a forked child sets up its own)."""

    lock = threading.Lock()
    pid: int | None = None
    provider: TracerProvider | None = None
    tracer: trace.Tracer | None = None
    record_content = False


# -- configuration --------------------------------------------------------------------------------


def config_from_env(env: Mapping[str, str] | None = None) -> TelemetryConfig:
    """The `TelemetryConfig` that `telemetry_env_vars` encoded (unset variables keep the defaults)."""
    env = os.environ if env is None else env
    exporter = env.get(ENV_EXPORTER, "auto").strip().lower() or "auto"
    if exporter not in ("auto", "otlp", "jsonl", "off"):
        raise ValueError(f"{ENV_EXPORTER}={exporter!r} is not an exporter; use auto, otlp, jsonl or off")
    return TelemetryConfig(
        exporter=exporter,
        trace_file=env.get(ENV_TRACE_FILE) or None,
        service_name=env.get(ENV_SERVICE_NAME) or "r1-cluster",
        record_content=env.get(ENV_RECORD_CONTENT, "").strip().lower() in _TRUE,
        resource_sample_interval_s=_seconds(env, ENV_RESOURCE_INTERVAL, 5.0),
    )


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name, "").strip()
    try:
        return float(text) if text else default
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number of seconds; use e.g. {name}={default}") from None


def telemetry_env_vars(config: TelemetryConfig, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables that make every Ray worker trace like this process (for runtime_env).

    Settings the config leaves unset are copied from `env` (default: os.environ), so a driver started
    with `R1_TRACE_FILE=...` or `OTEL_EXPORTER_OTLP_ENDPOINT=...` passes them on unchanged.
    """
    env = os.environ if env is None else env
    out = {name: env[name] for name in (ENV_TRACE_FILE, ENV_OTLP_ENDPOINT, ENV_OTLP_TRACES_ENDPOINT,
                                        ENV_OTLP_PROTOCOL, ENV_OTLP_TRACES_PROTOCOL, "OTEL_EXPORTER_OTLP_HEADERS",
                                        "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG") if env.get(name)}
    out[ENV_EXPORTER] = config.exporter
    out[ENV_SERVICE_NAME] = config.service_name
    out[ENV_RECORD_CONTENT] = "1" if config.record_content else "0"
    out[ENV_RESOURCE_INTERVAL] = str(config.resource_sample_interval_s)
    trace_file = config.trace_file or out.get(ENV_TRACE_FILE)
    if trace_file:  # absolute: Ray workers do not run in the driver's working directory
        out[ENV_TRACE_FILE] = str(Path(trace_file).expanduser().resolve())
    if config.otlp_endpoint:
        out[ENV_OTLP_ENDPOINT] = config.otlp_endpoint
    if config.otlp_protocol:
        out[ENV_OTLP_PROTOCOL] = config.otlp_protocol
    return out


def _otlp_endpoint(config: TelemetryConfig) -> str | None:
    return config.otlp_endpoint or os.environ.get(ENV_OTLP_TRACES_ENDPOINT) or os.environ.get(ENV_OTLP_ENDPOINT) or None


def otlp_protocol(config: TelemetryConfig) -> str:
    """grpc or http/protobuf: the config's, else the OTel environment's, else http/protobuf (the spec's default)."""
    if config.otlp_protocol:
        return config.otlp_protocol
    for name in (ENV_OTLP_TRACES_PROTOCOL, ENV_OTLP_PROTOCOL):
        value = os.environ.get(name, "").strip()
        if value:
            if value not in OTLP_PROTOCOLS:
                raise ValueError(f"{name}={value!r} is not supported; use grpc or http/protobuf")
            return value
    return "http/protobuf"


def _otlp_exporter(config: TelemetryConfig) -> SpanExporter:
    protocol = otlp_protocol(config)
    endpoint = config.otlp_endpoint  # None: the exporter reads the OTEL_EXPORTER_OTLP_* variables itself
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    if endpoint and not endpoint.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"  # the base URL, as OTEL_EXPORTER_OTLP_ENDPOINT means it
    return HttpExporter(endpoint=endpoint)


def _processors(config: TelemetryConfig) -> list[Any]:
    trace_file = config.trace_file or os.environ.get(ENV_TRACE_FILE) or None
    endpoint = _otlp_endpoint(config)
    if config.exporter == "off":
        return []
    if config.exporter == "jsonl" and not trace_file:
        raise ValueError(f"telemetry.exporter=jsonl needs telemetry.trace_file (or ${ENV_TRACE_FILE}) set to a path")
    if config.exporter == "otlp" and not endpoint:
        raise ValueError(f"telemetry.exporter=otlp needs telemetry.otlp_endpoint (or ${ENV_OTLP_ENDPOINT}), "
                         "e.g. http://otel-collector:4318")
    processors: list[Any] = []
    if trace_file and config.exporter in ("auto", "jsonl"):
        # Simple (synchronous) processor: a Ray worker can be killed without running shutdown hooks.
        processors.append(SimpleSpanProcessor(JsonLinesSpanExporter(trace_file)))
    if endpoint and config.exporter in ("auto", "otlp"):
        processors.append(BatchSpanProcessor(_otlp_exporter(config)))
    return processors


def setup_tracing(config: TelemetryConfig | None = None, service_name: str | None = None) -> TracerProvider | None:
    """Set up this process's tracing once; later calls return the first result. None: tracing is off.

    `config` None reads the environment (`config_from_env`). `service_name` overrides the config's
    (components pass their role, e.g. "r1-cluster-llm"). A bad setting raises ValueError.
    """
    with _State.lock:
        if _State.pid == os.getpid():
            return _State.provider
        config = config or config_from_env()
        processors = _processors(config)
        _State.pid, _State.provider, _State.tracer = os.getpid(), None, None
        _State.record_content = config.record_content
        if not processors:
            return None
        resource = Resource.create({"service.name": service_name or config.service_name, "process.pid": os.getpid()})
        provider = TracerProvider(resource=resource)
        for processor in processors:
            provider.add_span_processor(processor)
        _State.provider, _State.tracer = provider, provider.get_tracer("r1-cluster")
        return provider


def shutdown_tracing() -> None:
    """Flush and close this process's exporters; the next span or `setup_tracing` sets up afresh."""
    with _State.lock:
        provider, _State.pid, _State.provider, _State.tracer = _State.provider, None, None, None
    if provider is not None:
        provider.shutdown()


def tracing_enabled() -> bool:
    return _tracer() is not None


def _tracer() -> trace.Tracer | None:
    if _State.pid == os.getpid():
        return _State.tracer
    try:  # first use in this process: set up from the environment (how Ray workers get tracing)
        setup_tracing()
    except (ValueError, ImportError) as error:
        logger.error("tracing is off in this process: %s", error)
        with _State.lock:
            _State.pid, _State.provider, _State.tracer = os.getpid(), None, None
    return _State.tracer


# -- spans and propagation --------------------------------------------------------------------------


def clean_attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes OpenTelemetry accepts: None dropped, scalars kept, sequences of scalars as lists."""
    out: dict[str, Any] = {}
    for key, value in attributes.items():
        if value is None:
            continue
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, (list, tuple, set, frozenset)):
            out[key] = [v if isinstance(v, (bool, int, float)) else str(v) for v in value]
        else:
            out[key] = str(value)
    return out


def content_attributes(span: Span, **texts: str | None) -> None:
    """Add prompt/completion text to `span` only when `record_content` is on (off by default)."""
    if _State.record_content and span.is_recording():
        span.set_attributes({f"r1.content.{key}": text for key, text in texts.items() if text is not None})


def extract_context(carrier: Mapping[str, str] | None) -> otel_context.Context:
    """The context a W3C carrier (dict or HTTP headers, any key case) describes; empty when none."""
    if not carrier:
        return otel_context.Context()
    lowered = {str(k).lower(): v for k, v in carrier.items() if str(k).lower() in ("traceparent", "tracestate")}
    return _PROPAGATOR.extract(lowered)


def inject_context(span: Span | None = None) -> dict[str, str]:
    """W3C carrier (`traceparent`, maybe `tracestate`) of `span` or the current span; {} when none/off."""
    if _tracer() is None:
        return {}
    ctx = trace.set_span_in_context(span) if span is not None else None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    return carrier


def _parent(carrier: Mapping[str, str] | None) -> otel_context.Context | None:
    # A non-empty carrier wins over the current context; an empty one means "continue the current".
    return extract_context(carrier) if carrier else None


def _fail(span: Span, error: BaseException) -> None:
    if not span.is_recording():
        return
    if isinstance(error, GeneratorExit) or type(error).__name__ == "CancelledError":
        span.set_attribute("r1.cancelled", True)
        return
    span.set_attribute("error.type", type(error).__name__)
    span.set_status(Status(StatusCode.ERROR, type(error).__name__))


@contextmanager
def span(name: str, carrier: Mapping[str, str] | None = None, *, attach: bool = True,
         **attributes: Any) -> Iterator[Span]:
    """A span around the block: child of `carrier`'s context if given, else of the current span.

    `attach=False` does not make the span current: use it around `yield` in (async) generators,
    where the current context belongs to whoever drives the generator; pass `inject_context(s)` to
    calls made inside. The span ends when the block exits, including by cancellation or GeneratorExit.
    """
    tracer = _tracer()
    if tracer is None:
        yield INVALID_SPAN
        return
    current = tracer.start_span(name, context=_parent(carrier), attributes=clean_attributes(attributes))
    try:
        if attach:
            with trace.use_span(current, record_exception=False, set_status_on_exception=False):
                yield current
        else:
            yield current
    except BaseException as error:
        _fail(current, error)
        raise
    finally:
        current.end()


def start_span(name: str, carrier: Mapping[str, str] | None = None, *, start_ns: int | None = None,
               **attributes: Any) -> Span:
    """A started, not-current span the caller must `end_span`; for spans that outlive a call.

    `start_ns` (ns since the epoch) back-dates it, e.g. to an interval measured elsewhere.
    """
    tracer = _tracer()
    if tracer is None:
        return INVALID_SPAN
    return tracer.start_span(name, context=_parent(carrier), attributes=clean_attributes(attributes),
                             start_time=start_ns)


def end_span(span_: Span | None, error: BaseException | None = None, *, end_ns: int | None = None,
             **attributes: Any) -> None:
    """End a span from `start_span` (with `error`: marked failed by its type); None or off: no-op."""
    if span_ is not None and span_.is_recording():
        span_.set_attributes(clean_attributes(attributes))
        if error is not None:
            _fail(span_, error)
        status = attributes.get("http.status_code")
        if isinstance(status, int) and status >= 500:  # a server error fails the span (4xx are the caller's)
            span_.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
        span_.end(end_time=end_ns)


@contextmanager
def untraced() -> Iterator[None]:
    """Spans started inside (and in threads or calls that copy this context) are not recorded: for
    housekeeping such as health checks, which would otherwise add a one-span trace each time."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    ids = RandomIdGenerator()
    unsampled = NonRecordingSpan(SpanContext(ids.generate_trace_id(), ids.generate_span_id(), is_remote=False,
                                             trace_flags=TraceFlags(TraceFlags.DEFAULT)))
    with trace.use_span(unsampled, end_on_exit=False):
        yield


@contextmanager
def use_span(span_: Span | None) -> Iterator[Span | None]:
    """Make a span from `start_span` current for the block, without ending it.

    Calls inside then pass `inject_context()` and continue it. Do not hold it across a `yield`.
    """
    if span_ is None:
        yield span_
        return
    # A non-recording span (the caller's traceparent said "not sampled") is made current too: the
    # spans below then follow its decision, instead of each starting a trace of its own.
    with trace.use_span(span_, end_on_exit=False, record_exception=False, set_status_on_exception=False):
        yield span_


def trace_id_of(span_: Span | None) -> str | None:
    """32-hex trace id of `span_` (even a non-recording one, e.g. an unsampled parent's); None if invalid."""
    span_context = span_.get_span_context() if span_ is not None else None
    return format(span_context.trace_id, "032x") if span_context is not None and span_context.is_valid else None


def current_trace_id() -> str | None:
    return trace_id_of(trace.get_current_span())


def trace_id_from_traceparent(header: str | None) -> str | None:
    """The trace id of a W3C traceparent header; None when absent or malformed (never raises)."""
    if not header or not isinstance(header, str) or len(header) > MAX_TRACEPARENT_CHARS:
        return None
    match = _TRACEPARENT.match(header.strip())  # lower-case hex only, as W3C (and OTel's propagator) require
    if match is None:
        return None
    version, trace_id, span_id, _, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return trace_id
