"""Starting real Ray + Serve applications for tests, with deadlines and clean shutdown."""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from typing import Any, Iterator

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def small_deployment(**overrides: Any) -> dict[str, Any]:
    """Fractional CPUs so several replicas fit on a 2-core test machine."""
    base = {"min_replicas": 2, "max_replicas": 10, "num_cpus": 0.05, "target_ongoing_requests": 4,
            "health_check_period_s": 2.0, "health_check_timeout_s": 30.0}
    base.update(overrides)
    return base


def wait_http_ok(url: str, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == 200:
                return
            last = response.status_code
        except httpx.HTTPError as error:
            last = error
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout_s}s (last: {last})")


@contextmanager
def ray_serve(port: int, num_cpus: int = 2, env_vars: dict[str, str] | None = None,
              metrics_port: int | None = None) -> Iterator[None]:
    """A fresh local Ray (never an unrelated running cluster) with Serve on `port`.

    `env_vars` reach every worker; `metrics_port` is where Ray's Prometheus export listens.
    """
    import ray
    from ray import serve

    extra = {"_metrics_export_port": metrics_port} if metrics_port else {}
    # The cluster's processes inherit this process's environment. Without the OMP_NUM_THREADS that
    # tests/conftest.py sets for shared cores, Ray gives each replica its own (its reserved CPUs,
    # 1 for a fractional num_cpus), as it does in production.
    threads = os.environ.pop("OMP_NUM_THREADS", None)
    try:
        ray.init(address="local", num_cpus=num_cpus, namespace="r1-tests", include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env_vars or {})}},
                 **extra)
    finally:
        if threads is not None:
            os.environ["OMP_NUM_THREADS"] = threads
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def wait_for(predicate, timeout_s: float, what: str) -> None:
    """Poll `predicate` until it holds; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
