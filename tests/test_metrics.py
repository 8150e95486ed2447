"""Metrics: the catalog, the clocks, resource sampling, Ray's Prometheus export, and the dashboard's queries."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from r1 import resources
from r1.metrics import (
    COMM_SHARE_MAX,
    COMPUTE_UTILIZATION_MIN,
    MEMORY_UTILIZATION_MAX,
    METRICS,
    GenerationTimer,
    StepPhases,
    exported_series,
    metric_names_in_promql,
)
from tests.serve_helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "k8s" / "grafana" / "r1-dashboard.json"
PROMETHEUS_RULE = ROOT / "k8s" / "monitoring" / "prometheusrule.yaml"
SCRAPE_DEADLINE_S = 60.0


class FakeClock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- the catalog -------------------------------------------------------------------------------------

def test_catalog_is_consistent():
    names = [spec.name for spec in METRICS]
    assert len(names) == len(set(names))
    series = [s for spec in METRICS for s in spec.series()]
    assert len(series) == len(set(series))
    for spec in METRICS:
        assert re.fullmatch(r"r1_[a-z0-9_]+", spec.name), spec.name
        assert spec.description, spec.name
        assert all(re.fullmatch(r"[a-z_][a-z0-9_]*", label) and not label.startswith("__") for label in spec.labels)
        # Ray appends _total to a counter without it; naming them so keeps exported == registered + ray_.
        assert (spec.kind == "counter") == spec.name.endswith("_total"), spec.name
        assert spec.name.endswith(("_total", "_seconds", "_ratio", "_depth", "_requests", "_per_second", "_bytes")), spec.name
        if spec.kind == "histogram":
            assert spec.buckets and list(spec.buckets) == sorted(set(spec.buckets)) and spec.buckets[0] > 0
        else:
            assert spec.buckets == ()


def test_indicator_thresholds_are_the_guides():
    assert (MEMORY_UTILIZATION_MAX, COMPUTE_UTILIZATION_MIN, COMM_SHARE_MAX) == (0.85, 0.70, 0.15)


@pytest.mark.parametrize("expr,expected", [
    ("ray_r1_requests_total", {"ray_r1_requests_total"}),  # a bare selector
    ('sum by (route, status) (rate(ray_r1_requests_total{route="chat"}[5m]))',
     {"ray_r1_requests_total"}),  # grouping labels, label matchers and ranges are not metrics
    ("histogram_quantile(0.99, sum(rate(ray_r1_ttft_seconds_bucket[$__rate_interval])) by (le))",
     {"ray_r1_ttft_seconds_bucket"}),  # Grafana's range variable and a trailing by clause
    ("max_over_time(ray_r1_memory_utilization_ratio[10m]) >= 0.85",
     {"ray_r1_memory_utilization_ratio"}),  # comparison with a number
    ("avg_over_time(ray_r1_compute_utilization_ratio{device=~\"cuda.*\"}[15m]) < 0.7 and on(WorkerId) "
     "ray_r1_compute_utilization_ratio offset 5m", {"ray_r1_compute_utilization_ratio"}),  # and on(), offset
    ("rate(ray_r1_e2e_seconds_sum[5m]) / rate(ray_r1_e2e_seconds_count[5m])",
     {"ray_r1_e2e_seconds_sum", "ray_r1_e2e_seconds_count"}),  # two metrics in one expression
    ('label_replace(ray_r1_queue_depth, "x", "$1", "WorkerId", "(.*)")',
     {"ray_r1_queue_depth"}),  # string arguments are not metric names
    ('{__name__="ray_r1_queue_depth"}', set()),  # a name matcher selects by label (not checked)
    ("label_values(ray_r1_requests_total, route)", {"ray_r1_requests_total"}),  # a Grafana variable query
    ("label_values(route)", set()),  # a Grafana variable over all metrics
    ("sum(ray_r1_tokens_total) * 1e3", {"ray_r1_tokens_total"}),  # scientific numbers are not names
    ("ray_r1_train_comm_share_ratio > bool 0.15 unless ray_r1_train_step_seconds_count",
     {"ray_r1_train_comm_share_ratio", "ray_r1_train_step_seconds_count"}),  # bool and set operators
])
def test_metric_names_in_promql(expr, expected):
    assert metric_names_in_promql(expr) == expected


# -- clocks --------------------------------------------------------------------------------------------

def test_generation_timer():
    clock = FakeClock()
    timer = GenerationTimer(clock)
    clock.now += 0.5
    timer.tokens_arrived(0)  # the start item carries no tokens: not the first token
    assert timer.ttft_s is None and timer.tpot_s is None
    clock.now += 0.25
    timer.tokens_arrived(2)
    assert timer.ttft_s == pytest.approx(0.75) and timer.tpot_s is None  # one chunk: no inter-token time yet
    clock.now += 0.3
    timer.tokens_arrived(1)
    clock.now += 0.3
    timer.tokens_arrived(1)
    assert timer.tpot_s == pytest.approx(0.6 / 2)  # the first chunk's two tokens are not "later" tokens
    assert timer.elapsed_s() == pytest.approx(1.35)


def test_step_phases_comm_share():
    clock = FakeClock()
    phases = StepPhases(clock=clock)
    for name, seconds in [("rollout", 2.0), ("forward_backward", 1.0), ("all_reduce", 0.5), ("all_reduce", 0.25)]:
        with phases.phase(name):
            clock.now += seconds
    assert phases.comm_s == pytest.approx(0.75)
    assert phases.comm_share(3.75) == pytest.approx(0.2)
    assert phases.comm_share(0.0) is None
    phases.reset()
    assert phases.comm_s == 0


# -- resources -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("used,total,expected", [
    (1, 4, 0.25),  # plain share
    (5, 4, 1.0),  # a momentary overshoot is clamped to full
    (-1, 4, 0.0),  # a negative delta (clock skew) is clamped to zero
    (1, 0, None),  # no total: unknown, not a division by zero
    (None, 4, None),  # unknown usage stays unknown
])
def test_ratio(used, total, expected):
    assert resources.ratio(used, total) == expected


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("files,proc_cgroup,memory,cpus", [
    ({}, "0::/\n", None, None),  # no cgroup files: unlimited
    ({"memory.max": "max", "cpu.max": "max 100000"}, "0::/\n", None, None),  # v2 root without limits
    ({"memory.max": "1073741824", "cpu.max": "150000 100000"}, "0::/\n", 1 << 30, 1.5),  # v2 limits on the root
    ({"pod/memory.max": "2147483648", "pod/cpu.max": "200000 100000", "pod/ray/memory.max": "max",
      "pod/ray/cpu.max": "max 100000"}, "0::/pod/ray\n", 2 << 30, 2.0),  # limits sit on a parent cgroup
    ({"memory/memory.limit_in_bytes": "536870912", "cpu/cpu.cfs_quota_us": "50000",
      "cpu/cpu.cfs_period_us": "100000"}, "4:memory:/x\n", 1 << 29, 0.5),  # cgroup v1 limits
    ({"memory/memory.limit_in_bytes": str(2 ** 63 - 4096), "cpu/cpu.cfs_quota_us": "-1",
      "cpu/cpu.cfs_period_us": "100000"}, "4:memory:/x\n", None, None),  # cgroup v1 "unlimited" values
])
def test_cgroup_limits(tmp_path, files, proc_cgroup, memory, cpus):
    root = tmp_path / "cgroup"
    root.mkdir()
    for name, text in files.items():
        write(root / name, text)
    write(tmp_path / "proc_cgroup", proc_cgroup)
    assert resources.cgroup_memory_limit_bytes(root, tmp_path / "proc_cgroup") == memory
    assert resources.cgroup_cpu_limit(root, tmp_path / "proc_cgroup") == cpus


def test_cpu_meter_uses_cpu_time_over_wall_time():
    clock, cpu = FakeClock(0.0), FakeClock(10.0)
    meter = resources.CpuUtilizationMeter(cores=4, clock=clock, cpu_time=cpu)
    clock.now, cpu.now = 2.0, 16.0  # 6 CPU-seconds in 2 s on 4 cores
    assert meter.read() == pytest.approx(0.75)
    assert meter.read() is None  # no time passed since the last read
    with pytest.raises(ValueError, match="cores"):
        resources.CpuUtilizationMeter(cores=0)


def test_sampler_on_this_host():
    # CPU only here: one sample, and the sampler must not have initialized CUDA.
    import torch

    sampler = resources.ResourceSampler()
    cpu_start, deadline = sum(os.times()[:2]), time.monotonic() + 30
    while sum(os.times()[:2]) - cpu_start < 0.05 and time.monotonic() < deadline:  # burn CPU time, not wall time
        pass
    (sample,) = [s for s in sampler.sample() if s.device == "cpu"]
    assert 0 < sample.memory_utilization < 1
    assert 0 < sample.compute_utilization <= 1
    assert not torch.cuda.is_initialized()


# -- Ray's Prometheus export -------------------------------------------------------------------------

def recorder_class() -> type:
    """An actor that records one of everything (a class built here so Ray ships it by value)."""

    class Recorder:
        def record(self) -> None:
            from actors import metrics
            from r1.metrics import GenerationTimer
            from r1.resources import ResourceSample

            metrics.register_all()
            metrics.record_request("chat", 200, 0.3)
            metrics.record_request("chat", 200, 0.7)
            metrics.record_request("completions", 400, None)
            clock = iter([10.0, 10.2, 10.3, 10.5]).__next__
            timer = GenerationTimer(clock)
            timer.tokens_arrived(1)
            timer.tokens_arrived(1)
            timer.tokens_arrived(1)
            metrics.record_generation("chat", timer, prompt_tokens=12, completion_tokens=3, model="r1-tiny")
            metrics.record_engine_load({"running": 2, "waiting": 5, "prefix_cache_bytes": 4096,
                                        "prefix_cache_queried_tokens": 200, "prefix_cache_hit_tokens": 50})
            metrics.record_tool_calls("chat", "required", 2)
            metrics.record_safety_findings(["card_number", "card_number", "password"], "output")
            metrics.record_sandbox_run("passed")
            metrics.record_session_turn("stored")
            metrics.record_train_step("grpo", 2.0, tokens_per_s=2048.0, comm_share=0.1)
            metrics.record_resources("llm_server", [ResourceSample("cpu", 0.25, 0.5)])
            metrics.ResourceReporter("ingress", interval_s=60).report_once()  # real sampling
            metrics.record_request("models", 200, -1.0)  # counted; the impossible latency is dropped
            metrics.record_generation("chat", None, 0, 0)

    return Recorder


def scrape_r1(port: int, deadline_s: float) -> dict[str, list]:
    """{series name: [(labels, value)]} of the node's export, once every r1 series is there."""
    deadline = time.monotonic() + deadline_s
    wanted = exported_series()
    found: dict[str, list] = {}
    while time.monotonic() < deadline:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            time.sleep(1)
            continue
        found = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                found.setdefault(sample.name, []).append((sample.labels, sample.value))
        if wanted <= found.keys():
            return found
        time.sleep(1)
    raise AssertionError(f"series missing after {deadline_s}s: {sorted(wanted - found.keys())}")


@pytest.fixture(scope="module")
def exported():
    import ray
    from cluster.ray_start import init_ray

    port = free_port()
    # address="local": a fresh cluster of our own, even when another Ray cluster runs on this machine.
    init_ray(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=port)
    try:
        recorder = ray.remote(num_cpus=0)(recorder_class()).remote()
        ray.get(recorder.record.remote(), timeout=120)
        yield scrape_r1(port, SCRAPE_DEADLINE_S)
    finally:
        ray.shutdown()


def value(series: dict[str, list], name: str, **labels: str) -> float:
    matching = [v for found, v in series.get(name, []) if all(found.get(k) == w for k, w in labels.items())]
    assert matching, f"no {name} with {labels}"
    return sum(matching)


def test_ray_exports_every_r1_series_with_sane_values(exported):
    assert value(exported, "ray_r1_requests_total", route="chat", status="200") == 2
    assert value(exported, "ray_r1_requests_total", route="completions", status="400") == 1
    assert value(exported, "ray_r1_e2e_seconds_count", route="chat") == 2
    assert value(exported, "ray_r1_requests_total", route="models", status="200") == 1
    assert not [v for labels, v in exported["ray_r1_e2e_seconds_count"] if labels.get("route") == "models"]
    assert value(exported, "ray_r1_e2e_seconds_bucket", route="chat", le="0.5") == 1
    assert value(exported, "ray_r1_ttft_seconds_bucket", route="chat", le="0.1") == 0
    assert value(exported, "ray_r1_ttft_seconds_bucket", route="chat", le="0.25") == 1  # 0.2 s
    assert value(exported, "ray_r1_tpot_seconds_bucket", route="chat", le="0.1") == 0
    assert value(exported, "ray_r1_tpot_seconds_bucket", route="chat", le="0.25") == 1  # (10.5 - 10.2) / 2
    assert value(exported, "ray_r1_tokens_total", direction="in", model="r1-tiny") == 12
    assert value(exported, "ray_r1_tokens_total", direction="out", model="r1-tiny") == 3
    assert (value(exported, "ray_r1_running_requests"), value(exported, "ray_r1_queue_depth")) == (2, 5)
    assert value(exported, "ray_r1_prefix_cache_bytes") == 4096
    assert value(exported, "ray_r1_prefix_cache_hit_ratio") == pytest.approx(0.25)
    assert value(exported, "ray_r1_tool_calls_total", route="chat", mode="required") == 2
    assert value(exported, "ray_r1_safety_findings_total", rule_id="card_number", direction="output") == 2
    assert value(exported, "ray_r1_sandbox_runs_total", status="passed") == 1
    assert value(exported, "ray_r1_sessions_turns_total", outcome="stored") == 1
    assert value(exported, "ray_r1_train_tokens_per_second", trainer="grpo") == 2048
    assert value(exported, "ray_r1_train_comm_share_ratio", trainer="grpo") == pytest.approx(0.1)
    assert value(exported, "ray_r1_train_step_seconds_count", trainer="grpo") == 1
    assert value(exported, "ray_r1_memory_utilization_ratio", component="llm_server", device="cpu") == 0.25
    assert value(exported, "ray_r1_compute_utilization_ratio", component="llm_server", device="cpu") == 0.5
    assert 0 < value(exported, "ray_r1_memory_utilization_ratio", component="ingress", device="cpu") < 1
    assert 0 <= value(exported, "ray_r1_compute_utilization_ratio", component="ingress", device="cpu") <= 1


# -- the dashboard and the alert rules only query what is exported ----------------------------------

def dashboard_queries(node) -> list[str]:
    """Every PromQL string in a Grafana dashboard: panel targets and templating variable queries."""
    found = []
    if isinstance(node, dict):
        for key, item in node.items():
            if key == "expr" and isinstance(item, str):
                found.append(item)
            elif key == "query" and isinstance(item, str) and "(" in item:  # templating: label_values(...)
                found.append(item)
            else:
                found.extend(dashboard_queries(item))
    elif isinstance(node, list):
        for item in node:
            found.extend(dashboard_queries(item))
    return found


def rule_queries(path: Path) -> list[str]:
    queries = []
    for document in yaml.safe_load_all(path.read_text()):
        if not document:
            continue
        assert document.get("kind") == "PrometheusRule", f"{path.name}: a PrometheusRule is expected"
        for group in document["spec"]["groups"]:
            queries.extend(rule["expr"] for rule in group["rules"])
    return queries


def test_dashboard_parses_and_has_panels():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard.get("title") and dashboard.get("panels")
    assert dashboard_queries(dashboard)


@pytest.mark.parametrize("path", [DASHBOARD, PROMETHEUS_RULE], ids=["dashboard", "prometheus-rule"])
def test_queries_use_only_exported_metrics(exported, path):
    # r1 series must come from r1.metrics; anything else must be a series this Ray version exports.
    queries = dashboard_queries(json.loads(path.read_text())) if path.suffix == ".json" else rule_queries(path)
    assert queries, f"{path.name} has no queries"
    names = set().union(*(metric_names_in_promql(q) for q in queries))
    r1_names = {n for n in names if n.startswith(("ray_r1_", "r1_"))}
    assert r1_names - exported_series() == set(), f"{path.name} queries metrics r1-cluster does not export"
    assert names - r1_names - exported.keys() == set(), f"{path.name} queries metrics Ray does not export"


def test_alert_rules_watch_the_three_indicators():
    text = " ".join(rule_queries(PROMETHEUS_RULE))
    for series in ("ray_r1_memory_utilization_ratio", "ray_r1_compute_utilization_ratio",
                   "ray_r1_train_comm_share_ratio"):
        assert series in text, f"no alert rule on {series}"


def test_gpu_utilization_can_be_read():
    # torch.cuda.utilization reads GPU utilization through pynvml (the nvidia-ml-py dependency);
    # without it a GPU process would report no compute series at all.
    assert importlib.util.find_spec("pynvml") is not None
