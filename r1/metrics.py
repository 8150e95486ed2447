"""The metrics r1-cluster exports: one list of names, kinds, labels and buckets, plus the clocks behind them.

`METRICS` is the single source of truth: `actors/metrics.py` builds Ray metric objects from it, and
the Grafana dashboard and Prometheus rules in `k8s/` may only query names from `exported_series()`
(Ray prefixes every application metric with `ray_`; a histogram exports `_bucket`, `_sum` and
`_count` series). `metric_names_in_promql` pulls metric names out of a PromQL expression so a test
can hold the dashboard to that. The guide's three health indicators are the thresholds below.

`GenerationTimer` turns stream arrivals into TTFT / time per output token; `StepPhases` times the
phases of a training step (with a span each) and gives the step's communication share. Label
values are ids, routes, statuses and rule ids, never text. This module records nothing itself and
never imports ray.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal

from r1.telemetry import span

RAY_PREFIX = "ray_"
# The guide's health indicators (section 2.2): memory < 85 %, compute utilization > 70 %,
# communication overhead < 15 %.
MEMORY_UTILIZATION_MAX = 0.85
COMPUTE_UTILIZATION_MIN = 0.70
COMM_SHARE_MAX = 0.15

# Resource-reporter components whose compute is the work (the model's forward passes): the compute
# utilization alert watches these. The others (ingress, safety, session_store, code_validator) mostly
# wait on I/O or on the model by design, so a low busy share there is no finding.
COMPUTE_BOUND_COMPONENTS = ("llm_server", "model_shard", "train_worker")
SERVICE_COMPONENTS = ("ingress", "safety", "session_store", "code_validator")

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
STEP_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)


@dataclass(frozen=True)
class MetricSpec:
    """One metric as registered with Ray (`name`) and as Prometheus sees it (`exported_name`)."""

    name: str
    kind: Literal["counter", "histogram", "gauge"]
    description: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def exported_name(self) -> str:
        return RAY_PREFIX + self.name

    def series(self) -> tuple[str, ...]:
        """Prometheus series names this metric produces."""
        if self.kind == "histogram":
            return tuple(self.exported_name + suffix for suffix in ("_bucket", "_sum", "_count"))
        return (self.exported_name,)


METRICS: tuple[MetricSpec, ...] = (
    # -- serving (OpenAIIngress, LLMServer) --
    MetricSpec("r1_requests_total", "counter", "HTTP requests answered, by route and HTTP status code.",
               ("route", "status")),
    MetricSpec("r1_e2e_seconds", "histogram", "Request latency from arrival to the last byte of the response.",
               ("route",), LATENCY_BUCKETS_S),
    MetricSpec("r1_ttft_seconds", "histogram", "Time from request arrival to the first generated token.",
               ("route",), TTFT_BUCKETS_S),
    MetricSpec("r1_tpot_seconds", "histogram", "Time per output token after the first one.",
               ("route",), TPOT_BUCKETS_S),
    MetricSpec("r1_tokens_total", "counter",
               "Prompt (in) and generated (out) tokens, by the model asked for (the base model or a LoRA adapter).",
               ("direction", "model")),
    MetricSpec("r1_queue_depth", "gauge", "Requests waiting for an engine slot, per LLMServer replica."),
    MetricSpec("r1_running_requests", "gauge", "Requests being decoded, per LLMServer replica."),
    MetricSpec("r1_prefix_cache_bytes", "gauge", "Memory the engine's prefix cache holds, per LLMServer replica."),
    MetricSpec("r1_prefix_cache_hit_ratio", "gauge",
               "Share of prompt tokens prefilled from the prefix cache since the replica started."),
    MetricSpec("r1_tool_calls_total", "counter",
               "Tool calls in answers, by route and tool_choice mode (auto, required, named).", ("route", "mode")),
    # -- safety, code validation, sessions --
    MetricSpec("r1_safety_findings_total", "counter", "Safety rule matches, by rule id and direction (input/output).",
               ("rule_id", "direction")),
    MetricSpec("r1_sandbox_runs_total", "counter", "Code validations, by result status.", ("status",)),
    MetricSpec("r1_sessions_turns_total", "counter", "Chat turns on sessions, by outcome.", ("outcome",)),
    # -- training --
    MetricSpec("r1_train_tokens_per_second", "gauge", "Training throughput of the last step, all workers together (rank 0 records it).",
               ("trainer",)),
    MetricSpec("r1_train_step_seconds", "histogram", "Wall time of one training step.", ("trainer",), STEP_BUCKETS_S),
    MetricSpec("r1_train_comm_share_ratio", "gauge",
               "Share of the last step spent in communication (all-reduce); the guide wants < 0.15.", ("trainer",)),
    # -- resources (every actor that runs a resource reporter) --
    MetricSpec("r1_memory_utilization_ratio", "gauge",
               "Used / available memory of the component's device; the guide wants < 0.85.", ("component", "device")),
    MetricSpec("r1_compute_utilization_ratio", "gauge",
               "Busy share of the component's compute (CPU time or GPU utilization); the guide wants > 0.70.",
               ("component", "device")),
)

METRICS_BY_NAME = {metric.name: metric for metric in METRICS}


def metric(name: str) -> MetricSpec:
    try:
        return METRICS_BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS_BY_NAME))}") from None


def exported_series() -> frozenset[str]:
    """Every Prometheus series name r1-cluster exports (ray_ prefix, histogram suffixes)."""
    return frozenset(name for spec in METRICS for name in spec.series())


# -- PromQL ----------------------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE)
_IDENT = re.compile(r"(?<![0-9A-Za-z_:.$])[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
             "inf", "nan", "atan2"}
_LABEL_VALUES = re.compile(r"^\s*label_values\s*\(\s*(?:([A-Za-z_:][A-Za-z0-9_:]*)\s*(?:\{[^}]*\})?\s*,)?\s*\w+\s*\)\s*$")


def metric_names_in_promql(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (not functions, keywords, labels or durations).

    Handles the dashboard dialect too: Grafana `$variables` and `label_values(metric, label)`.
    """
    match = _LABEL_VALUES.match(expr)
    if match:
        return {match.group(1)} if match.group(1) else set()
    text = _STRING.sub(" ", expr)
    text = _BRACES.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for found in _IDENT.finditer(text):
        name = found.group(0)
        following = text[found.end():].lstrip()
        if following.startswith("(") or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


# -- clocks ------------------------------------------------------------------------------------------


class GenerationTimer:
    """TTFT and time per output token of one streamed generation, from arrival times of token chunks.

    TPOT = (last token time - first token time) / tokens after the first chunk, i.e. the usual
    (e2e - TTFT) / (tokens - 1) when every chunk holds one token; a first chunk of several tokens
    (held back by the detokenizer) does not count its extra tokens as produced in no time.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.started = clock()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.num_tokens = 0
        self.first_chunk_tokens = 0

    def tokens_arrived(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        now = self.clock()
        if self.first_token_at is None:
            self.first_token_at = now
            self.first_chunk_tokens = num_tokens
        self.last_token_at = now
        self.num_tokens += num_tokens

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    @property
    def tpot_s(self) -> float | None:
        later_tokens = self.num_tokens - self.first_chunk_tokens
        if later_tokens <= 0 or self.first_token_at is None or self.last_token_at is None:
            return None
        return (self.last_token_at - self.first_token_at) / later_tokens

    def elapsed_s(self) -> float:
        return self.clock() - self.started


class StepPhases:
    """Per-phase wall time of one training step, with a span per phase.

    Phases in `comm_phases` (default: all_reduce) count as communication. On GPU pass
    `sync=torch.cuda.synchronize`, or a phase's time is only the time to queue its kernels.
    """

    def __init__(self, comm_phases: Iterable[str] = ("all_reduce",), sync: Callable[[], Any] | None = None,
                 clock: Callable[[], float] = time.perf_counter, span_prefix: str = "train."):
        self.comm_phases = frozenset(comm_phases)
        self.sync = sync
        self.clock = clock
        self.span_prefix = span_prefix
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str, **attributes: Any) -> Iterator[None]:
        with span(self.span_prefix + name, **attributes):
            if self.sync is not None:
                self.sync()
            started = self.clock()
            try:
                yield
            finally:
                if self.sync is not None:
                    self.sync()
                self.seconds[name] += self.clock() - started

    @property
    def comm_s(self) -> float:
        return sum(seconds for name, seconds in self.seconds.items() if name in self.comm_phases)

    def comm_share(self, step_s: float) -> float | None:
        """Communication time / step time (None for a step of no measurable length)."""
        return None if step_s <= 0 else min(1.0, self.comm_s / step_s)

    def reset(self) -> None:
        self.seconds.clear()
