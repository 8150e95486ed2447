"""Ray metrics of r1-cluster: `ray.util.metrics` objects built from `r1.metrics.METRICS`, and record helpers.

Ray exports them on every node's metrics export port for Prometheus, as `ray_<name>` with Ray's own
labels added (WorkerId, NodeAddress, SessionName, ...). Objects are created lazily, once per process.
Every `record_*` helper is safe on the request path: a metric that cannot be recorded is logged once
and dropped, it never fails a request. Label values are routes, statuses, rule ids and device names;
never text from a prompt or completion.

`start_resource_reporter(component)` starts one daemon thread per process and component that
samples `r1.resources` every few seconds into `r1_memory_utilization_ratio` and
`r1_compute_utilization_ratio` (and runs an optional `poll`, e.g. the engine's queue gauges).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from typing import Any, Callable, Iterable, Mapping

from ray.util.metrics import Counter, Gauge, Histogram

from r1.metrics import METRICS, GenerationTimer, metric
from r1.resources import ResourceSample, ResourceSampler
from r1.telemetry import config_from_env

logger = logging.getLogger(__name__)

_objects: dict[str, Any] = {}
_objects_lock = threading.Lock()
_warned: set[str] = set()


def ray_metric(name: str) -> Any:
    """This process's Ray metric object for `name` (one of r1.metrics.METRICS), created on first use."""
    found = _objects.get(name)
    if found is not None:
        return found
    spec = metric(name)
    with _objects_lock:
        if name not in _objects:
            if spec.kind == "counter":
                _objects[name] = Counter(spec.name, spec.description, tag_keys=spec.labels)
            elif spec.kind == "gauge":
                _objects[name] = Gauge(spec.name, spec.description, tag_keys=spec.labels)
            else:
                _objects[name] = Histogram(spec.name, spec.description, boundaries=list(spec.buckets),
                                           tag_keys=spec.labels)
        return _objects[name]


def register_all() -> None:
    """Create every metric object now (so a scrape lists them even before the first event)."""
    for spec in METRICS:
        ray_metric(spec.name)


def _never_raises(record: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(record)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            record(*args, **kwargs)
        except Exception as error:  # a metric must not fail the request it measures
            if record.__name__ not in _warned:
                _warned.add(record.__name__)
                logger.warning("metrics: %s failed (%s: %s); further failures are not logged",
                               record.__name__, type(error).__name__, error)

    return wrapper


def _tags(**labels: Any) -> dict[str, str]:
    return {key: str(value) for key, value in labels.items()}


def _inc(name: str, value: float, **labels: Any) -> None:
    if value > 0:  # Ray counters refuse 0 and negative increments
        ray_metric(name).inc(value, tags=_tags(**labels))


def _observe(name: str, value: float | None, **labels: Any) -> None:
    if value is not None and value >= 0:
        ray_metric(name).observe(value, tags=_tags(**labels))


def _set(name: str, value: float | None, **labels: Any) -> None:
    if value is not None:
        ray_metric(name).set(value, tags=_tags(**labels))


# -- serving ---------------------------------------------------------------------------------------


@_never_raises
def record_request(route: str, status: int, e2e_s: float | None) -> None:
    """One answered request: its route (chat, completions, sessions, models), HTTP status and latency."""
    _inc("r1_requests_total", 1, route=route, status=status)
    _observe("r1_e2e_seconds", e2e_s, route=route)


@_never_raises
def record_generation(route: str, timer: GenerationTimer | None, prompt_tokens: int, completion_tokens: int,
                      model: str = "") -> None:
    """One request's generation: TTFT and TPOT from `timer`, tokens in and out of `model` (a served
    model's name: the base model or a LoRA adapter, never a name the server does not serve)."""
    if timer is not None:
        _observe("r1_ttft_seconds", timer.ttft_s, route=route)
        _observe("r1_tpot_seconds", timer.tpot_s, route=route)
    _inc("r1_tokens_total", prompt_tokens, direction="in", model=model)
    _inc("r1_tokens_total", completion_tokens, direction="out", model=model)


@_never_raises
def record_tool_calls(route: str, mode: str, calls: int) -> None:
    """The tool calls one request's answers made (0 counts the request's mode without a call)."""
    _inc("r1_tool_calls_total", calls, route=route, mode=mode)


@_never_raises
def record_engine_load(stats: Mapping[str, int]) -> None:
    """The engine's `stats()`: {"running": n, "waiting": n}, and the prefix cache's figures when it has one."""
    _set("r1_running_requests", stats.get("running"))
    _set("r1_queue_depth", stats.get("waiting"))
    if "prefix_cache_bytes" in stats:
        _set("r1_prefix_cache_bytes", stats["prefix_cache_bytes"])
        queried = stats["prefix_cache_queried_tokens"]
        _set("r1_prefix_cache_hit_ratio", stats["prefix_cache_hit_tokens"] / queried if queried else 0.0)


@_never_raises
def record_safety_findings(rule_ids: Iterable[str], direction: str) -> None:
    """One count per rule match (ids from the safety config, never the matched text)."""
    for rule_id in rule_ids:
        _inc("r1_safety_findings_total", 1, rule_id=rule_id, direction=direction)


@_never_raises
def record_sandbox_run(status: str) -> None:
    _inc("r1_sandbox_runs_total", 1, status=status)


@_never_raises
def record_session_turn(outcome: str) -> None:
    """outcome: stored | not_stored (session deleted meanwhile) | not_found | failed."""
    _inc("r1_sessions_turns_total", 1, outcome=outcome)


# -- training --------------------------------------------------------------------------------------


@_never_raises
def record_train_step(trainer: str, step_s: float, tokens_per_s: float | None = None,
                      comm_share: float | None = None) -> None:
    """One training step (trainer: sft | reward | grpo): wall time, throughput, share spent communicating."""
    _observe("r1_train_step_seconds", step_s, trainer=trainer)
    _set("r1_train_tokens_per_second", tokens_per_s, trainer=trainer)
    _set("r1_train_comm_share_ratio", comm_share, trainer=trainer)


# -- resources -------------------------------------------------------------------------------------


@_never_raises
def record_resources(component: str, samples: Iterable[ResourceSample]) -> None:
    for sample in samples:
        _set("r1_memory_utilization_ratio", sample.memory_utilization, component=component, device=sample.device)
        _set("r1_compute_utilization_ratio", sample.compute_utilization, component=component, device=sample.device)


class ResourceReporter:
    """Daemon thread: every `interval_s`, samples this process's resources and runs `poll`."""

    def __init__(self, component: str, interval_s: float = 5.0, poll: Callable[[], None] | None = None,
                 cores: float | None = None):
        if interval_s <= 0:
            raise ValueError(f"interval_s={interval_s} must be > 0")
        self.component = component
        self.interval_s = interval_s
        self.poll = poll
        self.sampler = ResourceSampler(cores)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"r1-metrics-{component}", daemon=True)

    def start(self) -> ResourceReporter:
        self._thread.start()
        return self

    def report_once(self) -> None:
        record_resources(self.component, self.sampler.sample())
        if self.poll is not None:
            try:
                self.poll()
            except Exception as error:  # the polled object may be shutting down
                logger.debug("metrics poll of %s failed: %s", self.component, error)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.report_once()

    def stop(self) -> None:
        self._stop.set()


_reporters: dict[tuple[int, str], ResourceReporter] = {}
_reporters_lock = threading.Lock()


def start_resource_reporter(component: str, interval_s: float | None = None, poll: Callable[[], None] | None = None,
                            cores: float | None = None) -> ResourceReporter:
    """The process's reporter for `component`, started once (later calls return it).

    `interval_s` None: TelemetryConfig.resource_sample_interval_s as the driver passed it to the
    workers ($R1_RESOURCE_SAMPLE_INTERVAL_S, see `r1.telemetry.telemetry_env_vars`), else 5 s.
    """
    key = (os.getpid(), component)
    with _reporters_lock:
        if key not in _reporters:
            interval = interval_s or config_from_env().resource_sample_interval_s
            _reporters[key] = ResourceReporter(component, interval, poll, cores).start()
        return _reporters[key]
