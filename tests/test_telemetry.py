"""Tracing: setup from config/env, the JSON-lines exporter, W3C propagation, and a trace across Ray actors."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from pathlib import Path

import pytest

from r1 import telemetry
from r1.config import TelemetryConfig
from r1.sequence_spans import RequestCarriers, SequenceSpans
from r1.telemetry import (
    content_attributes,
    current_trace_id,
    inject_context,
    setup_tracing,
    shutdown_tracing,
    span,
    trace_id_from_traceparent,
    trace_id_of,
)
from r1.trace_file import read_spans

GIVEN_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
GIVEN_SPAN_ID = "b7ad6b7169203331"
GIVEN_TRACEPARENT = f"00-{GIVEN_TRACE_ID}-{GIVEN_SPAN_ID}-01"
TELEMETRY_ENV = ("R1_TRACE_FILE", "R1_TRACE_EXPORTER", "R1_TRACE_CONTENT", "OTEL_SERVICE_NAME",
                 "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL",
                 "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")


@pytest.fixture
def clean_env(monkeypatch):
    """No tracing settings from the surrounding environment, and fresh per-process tracing state."""
    for name in TELEMETRY_ENV:
        monkeypatch.delenv(name, raising=False)
    shutdown_tracing()
    yield monkeypatch
    shutdown_tracing()


@pytest.fixture
def trace_file(clean_env, tmp_path) -> Path:
    path = tmp_path / "trace.jsonl"
    clean_env.setenv("R1_TRACE_FILE", str(path))
    return path


def by_name(records: list[dict]) -> dict[str, dict]:
    return {record["name"]: record for record in records}


# -- traceparent parsing ---------------------------------------------------------------------------

@pytest.mark.parametrize("header,expected", [
    (GIVEN_TRACEPARENT, GIVEN_TRACE_ID),  # the W3C example header
    (GIVEN_TRACEPARENT.upper(), None),  # W3C allows lower-case hex only (OTel's propagator ignores it too)
    (GIVEN_TRACEPARENT + "-" + "a" * 500, None),  # longer than 512 characters: ignored, as OTel does
    (f" {GIVEN_TRACEPARENT} ", GIVEN_TRACE_ID),  # surrounding whitespace from a hand-written header
    (f"01-{GIVEN_TRACE_ID}-{GIVEN_SPAN_ID}-01-extra", GIVEN_TRACE_ID),  # future versions may append fields
    (f"00-{GIVEN_TRACE_ID}-{GIVEN_SPAN_ID}-01-extra", None),  # version 00 has exactly four fields
    (f"ff-{GIVEN_TRACE_ID}-{GIVEN_SPAN_ID}-01", None),  # version ff is forbidden by the spec
    (f"00-{'0' * 32}-{GIVEN_SPAN_ID}-01", None),  # all-zero trace id is invalid
    (f"00-{GIVEN_TRACE_ID}-{'0' * 16}-01", None),  # all-zero parent id is invalid
    (f"00-{GIVEN_TRACE_ID[:-1]}-{GIVEN_SPAN_ID}-01", None),  # trace id one digit short
    ("not a traceparent", None),  # garbage from an untrusted client never raises
    ("", None),  # empty header
    (None, None),  # no header at all
])
def test_trace_id_from_traceparent(header, expected):
    assert trace_id_from_traceparent(header) == expected


# -- setup -----------------------------------------------------------------------------------------

def processor_kinds(provider) -> list[str]:
    if provider is None:
        return []
    processors = provider._active_span_processor._span_processors
    return sorted(type(p.span_exporter).__module__.split(".")[-2] if "otlp" in type(p.span_exporter).__module__
                  else type(p.span_exporter).__name__ for p in processors)


@pytest.mark.parametrize("env,config,expected", [
    ({}, None, []),  # nothing configured: tracing is off
    ({"R1_TRACE_FILE": "{tmp}/t.jsonl"}, None, ["JsonLinesSpanExporter"]),  # the file variable alone turns JSONL on
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}, None, ["http"]),  # OTLP defaults to http/protobuf
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, None,
     ["grpc"]),  # the OTel protocol variable picks gRPC
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "R1_TRACE_FILE": "{tmp}/t.jsonl"}, None,
     ["JsonLinesSpanExporter", "http"]),  # auto with both targets exports to both
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "R1_TRACE_FILE": "{tmp}/t.jsonl"},
     {"exporter": "jsonl"}, ["JsonLinesSpanExporter"]),  # an explicit exporter uses only that one
    ({"R1_TRACE_FILE": "{tmp}/t.jsonl"}, {"exporter": "off"}, []),  # off wins over a configured file
    ({}, {"otlp_endpoint": "http://127.0.0.1:9", "otlp_protocol": "grpc"}, ["grpc"]),  # config alone, no env
])
def test_setup_picks_exporters(clean_env, tmp_path, env, config, expected):
    for name, value in env.items():
        clean_env.setenv(name, value.format(tmp=tmp_path))
    provider = setup_tracing(TelemetryConfig(**config) if config else None)
    assert processor_kinds(provider) == expected
    assert telemetry.tracing_enabled() == bool(expected)


@pytest.mark.parametrize("env,config,message", [
    ({}, {"exporter": "jsonl"}, "trace_file"),  # jsonl without a file says which setting is missing
    ({}, {"exporter": "otlp"}, "otlp_endpoint"),  # otlp without an endpoint names the endpoint setting
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, None,
     "OTEL_EXPORTER_OTLP_PROTOCOL"),  # a protocol the Python exporter lacks is refused, not ignored
    ({"R1_TRACE_EXPORTER": "zipkin"}, None, "R1_TRACE_EXPORTER"),  # an unknown exporter name in the env
    ({"R1_RESOURCE_SAMPLE_INTERVAL_S": "5s"}, None, "R1_RESOURCE_SAMPLE_INTERVAL_S"),  # a unit where a number goes
])
def test_setup_rejects_bad_settings(clean_env, env, config, message):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        setup_tracing(TelemetryConfig(**config) if config else None)


def test_setup_is_idempotent_per_process(trace_file):
    # Each actor may call setup; the first wins, so spans of one process go to one provider.
    first = setup_tracing()
    assert first is not None and setup_tracing(TelemetryConfig(exporter="off")) is first


def test_env_vars_round_trip(clean_env, tmp_path):
    # What a driver passes to its workers reproduces its config there.
    config = TelemetryConfig(exporter="jsonl", trace_file=str(tmp_path / "x.jsonl"), service_name="svc",
                             record_content=True, resource_sample_interval_s=2.5)
    env = telemetry.telemetry_env_vars(config, env={"OTEL_EXPORTER_OTLP_HEADERS": "k=v"})
    assert env["OTEL_EXPORTER_OTLP_HEADERS"] == "k=v"
    back = telemetry.config_from_env(env)
    assert back.model_dump() == config.model_dump()


def test_env_vars_make_a_relative_trace_file_absolute(clean_env, tmp_path):
    # Ray workers run in their own working directory: a relative path would scatter the trace.
    clean_env.chdir(tmp_path)
    env = telemetry.telemetry_env_vars(TelemetryConfig(), env={"R1_TRACE_FILE": "traces/run.jsonl"})
    assert env["R1_TRACE_FILE"] == str(tmp_path.resolve() / "traces" / "run.jsonl")


# -- spans, propagation and the JSONL file --------------------------------------------------------

def test_off_is_a_no_op(clean_env, tmp_path):
    with span("request", prompt_tokens=3) as current:
        assert not current.is_recording()
        assert inject_context() == {}
        assert current_trace_id() is None
    assert list(tmp_path.iterdir()) == []


def test_nested_spans_link_parents(trace_file):
    with span("request", n=2) as root:
        carrier = inject_context()
        with span("child"):
            pass
        with span("remote", carrier):  # as a callee in another process would do
            pass
        assert current_trace_id() == trace_id_of(root)
    records = by_name(read_spans(trace_file))
    assert set(records) == {"request", "child", "remote"}
    root_record = records["request"]
    assert root_record["parent_id"] is None and root_record["attributes"] == {"n": 2}
    assert records["child"]["parent_id"] == root_record["span_id"]
    assert records["remote"]["parent_id"] == root_record["span_id"]
    assert {r["trace_id"] for r in records.values()} == {root_record["trace_id"]}
    assert carrier["traceparent"].split("-")[1:3] == [root_record["trace_id"], root_record["span_id"]]
    assert all(r["pid"] == os.getpid() and r["end_ns"] >= r["start_ns"] for r in records.values())


@pytest.mark.parametrize("carrier", [
    {"traceparent": GIVEN_TRACEPARENT},  # a dict body field
    {"Traceparent": GIVEN_TRACEPARENT, "Content-Type": "application/json"},  # HTTP headers, any case
])
def test_given_traceparent_is_continued(trace_file, carrier):
    with span("request", carrier) as current:
        assert trace_id_of(current) == GIVEN_TRACE_ID
        assert current_trace_id() == GIVEN_TRACE_ID
    (record,) = read_spans(trace_file)
    assert record["trace_id"] == GIVEN_TRACE_ID and record["parent_id"] == GIVEN_SPAN_ID


def test_errors_record_type_not_message(trace_file):
    # An exception message may quote the prompt: only its type goes into the trace.
    with pytest.raises(KeyError):
        with span("request"):
            raise KeyError("my password is hunter2")
    (record,) = read_spans(trace_file)
    assert record["status"] == "ERROR" and record["attributes"] == {"error.type": "KeyError"}
    assert "hunter2" not in trace_file.read_text()


@pytest.mark.parametrize("record_content", [False, True])
def test_content_only_when_opted_in(trace_file, clean_env, record_content):
    clean_env.setenv("R1_TRACE_CONTENT", "1" if record_content else "0")
    with span("generate", prompt_tokens=4) as current:
        content_attributes(current, prompt="secret prompt", completion="secret reply")
    (record,) = read_spans(trace_file)
    assert ("secret prompt" in trace_file.read_text()) == record_content
    assert record["attributes"]["prompt_tokens"] == 4


def test_stream_span_ends_when_the_stream_is_abandoned(trace_file):
    # A span around a streamed generation must end when the consumer stops early, and must not
    # leak into the consumer's context.
    async def generate(carrier):
        with span("generate", carrier, attach=False) as current:
            for index in range(100):
                current.set_attribute("chunks", index + 1)
                yield index

    async def consume():
        with span("request"):
            stream = generate(inject_context())
            async for item in stream:
                if item == 2:
                    break
            await stream.aclose()
            return current_trace_id()

    trace_id = asyncio.run(consume())
    records = by_name(read_spans(trace_file))
    assert records["generate"]["attributes"] == {"chunks": 3, "r1.cancelled": True}
    assert records["generate"]["parent_id"] == records["request"]["span_id"]
    assert records["request"]["trace_id"] == trace_id


def test_measured_interval_span(trace_file):
    # An interval measured elsewhere (e.g. an all-reduce timed by a communication hook) becomes a span.
    with span("train.step"):
        measured = telemetry.start_span("train.all_reduce", start_ns=1_000, buckets=3)
    telemetry.end_span(measured, end_ns=5_000, comm_s=4e-6)
    records = by_name(read_spans(trace_file))
    assert (records["train.all_reduce"]["start_ns"], records["train.all_reduce"]["end_ns"]) == (1_000, 5_000)
    assert records["train.all_reduce"]["attributes"] == {"buckets": 3, "comm_s": 4e-6}
    assert records["train.all_reduce"]["parent_id"] == records["train.step"]["span_id"]


def test_use_span_makes_a_started_span_current(trace_file):
    # The ingress starts the request span, makes it current for the handler, and ends it later
    # (after a streamed body): calls inside pick it up through inject_context().
    root = telemetry.start_span("request", route="chat")
    with telemetry.use_span(root):
        carrier = inject_context()
        with span("session.open"):
            pass
    assert current_trace_id() is None  # no longer current after the block
    with span("llm.generate", carrier):
        pass
    telemetry.end_span(root, **{"http.status_code": 200})
    records = by_name(read_spans(trace_file))
    assert records["session.open"]["parent_id"] == records["request"]["span_id"]
    assert records["llm.generate"]["parent_id"] == records["request"]["span_id"]
    assert records["request"]["attributes"] == {"route": "chat", "http.status_code": 200}


def test_an_unsampled_callers_request_records_nothing(trace_file):
    # The caller's traceparent says "not sampled": the request span does not record, and neither
    # do the spans below it (they used to start traces of their own, one per hop).
    root = telemetry.start_span("request", {"traceparent": f"00-{GIVEN_TRACE_ID}-{GIVEN_SPAN_ID}-00"}, route="chat")
    with telemetry.use_span(root):
        with span("safety.check"):
            pass
        carrier = inject_context()
    with span("llm.generate", carrier):
        pass
    telemetry.end_span(root, **{"http.status_code": 200})
    with span("sampled"):
        pass
    assert [record["name"] for record in read_spans(trace_file)] == ["sampled"]


def test_housekeeping_is_untraced(trace_file):
    import threading

    import contextvars

    def in_thread() -> None:
        with span("in.thread"):
            pass

    with telemetry.untraced():
        with span("health.probe"):
            pass
        # asyncio.to_thread runs its function in a copy of the caller's context, like this:
        thread = threading.Thread(target=contextvars.copy_context().run, args=(in_thread,))
        thread.start()
        thread.join()
    with span("request"):
        pass
    assert [record["name"] for record in read_spans(trace_file)] == ["request"]


@pytest.mark.parametrize("status, expected", [(200, "UNSET"), (404, "UNSET"), (499, "UNSET"), (503, "ERROR")])
def test_server_errors_fail_the_request_span(trace_file, status, expected):
    root = telemetry.start_span("request", route="chat")
    telemetry.end_span(root, **{"http.status_code": status})
    assert read_spans(trace_file)[0]["status"] == expected


def _write_spans(path: str, count: int) -> None:
    os.environ["R1_TRACE_FILE"] = path
    shutdown_tracing()
    for index in range(count):
        with span("bulk", index=index, padding="x" * 200):
            pass


def test_processes_append_whole_lines(trace_file):
    # Several processes share one file: every line must stay a whole JSON record.
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_spans, args=(str(trace_file), 200)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    lines = trace_file.read_text().splitlines()
    records = read_spans(trace_file)
    assert len(lines) == len(records) == 800
    assert len({r["pid"] for r in records}) == 4


def test_sequence_spans_follow_batched_sequences(trace_file):
    # A model shard sees batches; each traced request gets one span there, parented to its carrier.
    carriers = RequestCarriers()
    spans = SequenceSpans("model_shard", stage_index=1)
    with span("generate-a") as a:
        carriers.register("a", inject_context())
    with span("generate-b") as b:
        carriers.register("b", inject_context())
    assert carriers.for_sequences(["a", "untraced"]).keys() == {"a"}
    spans.open(["a", "b", "untraced"], carriers.for_sequences(["a", "b", "untraced"]), batch=3)
    spans.count_step(["a", "b"])
    spans.count_step(["a"])
    spans.close(["a", "untraced"])
    assert len(spans) == 1
    spans.close_all(reason="shutdown")
    carriers.discard("a")
    assert len(carriers) == 1
    shard = [r for r in read_spans(trace_file) if r["name"] == "model_shard"]
    by_parent = {r["parent_id"]: r for r in shard}
    a_id, b_id = (format(s.get_span_context().span_id, "016x") for s in (a, b))
    assert set(by_parent) == {a_id, b_id}
    assert by_parent[a_id]["attributes"] == {"stage_index": 1, "batch": 3, "decode_steps": 2}
    assert by_parent[b_id]["attributes"]["reason"] == "shutdown"


def test_sequence_spans_are_bounded(trace_file):
    # Sequences that never get removed (a crashed caller) must not pile up forever.
    spans = SequenceSpans("model_shard", max_open=2)
    with span("generate"):
        carrier = inject_context()
    spans.open(["a", "b", "c"], {"a": carrier, "b": carrier, "c": carrier})
    assert len(spans) == 2
    (evicted,) = [r for r in read_spans(trace_file) if r["name"] == "model_shard"]
    assert evicted["attributes"]["r1.evicted"] is True


# -- across Ray actors -----------------------------------------------------------------------------

def hop_class() -> type:
    """One process in the chain: a span per call, continuing the caller's carrier.

    Defined in a function so Ray ships the class by value (workers cannot import test modules).
    """

    class Hop:
        def __init__(self, role: str):
            from actors.tracing import setup_actor_tracing

            self.role = role
            setup_actor_tracing(role)

        def pid(self) -> int:
            return os.getpid()

        def call(self, carrier: dict, rest: list) -> str | None:
            import ray

            from r1.telemetry import inject_context, span, trace_id_of

            with span(f"hop.{self.role}", carrier, remaining=len(rest)) as current:
                if rest:
                    ray.get(rest[0].call.remote(inject_context(), rest[1:]), timeout=60)
                return trace_id_of(current)

    return Hop


def test_trace_crosses_ray_actors(trace_file):
    import ray
    from cluster.ray_start import init_ray

    from actors.tracing import with_telemetry_env

    runtime_env = with_telemetry_env({"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    assert runtime_env["env_vars"]["R1_TRACE_FILE"] == str(trace_file)
    # address="local": a fresh cluster of our own, even when another Ray cluster runs on this machine.
    init_ray(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env=runtime_env)
    try:
        remote_hop = ray.remote(num_cpus=0)(hop_class())
        hops = [remote_hop.remote(role) for role in ("a", "b", "c")]
        pids = ray.get([hop.pid.remote() for hop in hops], timeout=120)
        with span("driver") as root:
            remote_trace_id = ray.get(hops[0].call.remote(inject_context(), hops[1:]), timeout=120)
        driver_trace_id = trace_id_of(root)
    finally:
        ray.shutdown()
    assert remote_trace_id == driver_trace_id
    records = by_name([r for r in read_spans(trace_file) if r["trace_id"] == driver_trace_id])
    assert set(records) == {"driver", "hop.a", "hop.b", "hop.c"}
    assert len({r["pid"] for r in records.values()}) == 4
    assert [records[f"hop.{role}"]["pid"] for role in "abc"] == pids
    assert records["driver"]["parent_id"] is None
    assert records["hop.a"]["parent_id"] == records["driver"]["span_id"]
    assert records["hop.b"]["parent_id"] == records["hop.a"]["span_id"]
    assert records["hop.c"]["parent_id"] == records["hop.b"]["span_id"]
    assert records["hop.c"]["service"] == "r1-cluster-c"
