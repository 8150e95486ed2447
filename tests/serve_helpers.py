"""Starting real Ray + Serve applications for tests, with deadlines and clean shutdown."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from typing import Any, Iterator

import httpx


# Ports the kernel hands out itself (a bind to port 0, every outgoing connection) come from its
# ephemeral range (32768-60999 on Linux), and Ray's workers listen on 10002-19999. A port taken from
# either range can be grabbed by the other xdist worker's Ray cluster between this check and the
# bind that uses it (a Serve proxy once failed to bind so); one from between them cannot.
_TEST_PORTS = range(20000, 32768)
_port_choice = random.Random()  # its own generator: tests that seed `random` are not disturbed


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, outside the ranges the kernel and Ray pick from."""
    for _ in range(500):
        port = _port_choice.choice(_TEST_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_TEST_PORTS.start}-{_TEST_PORTS.stop - 1}")


def small_deployment(**overrides: Any) -> dict[str, Any]:
    """Fractional CPUs so several replicas fit on a 2-core test machine."""
    base = {"min_replicas": 2, "max_replicas": 10, "num_cpus": 0.05, "target_ongoing_requests": 4,
            "health_check_period_s": 2.0, "health_check_timeout_s": 30.0}
    base.update(overrides)
    return base


def answer_at_once(tokenizer: Any) -> dict[str, int]:
    """A logit_bias that closes r1-tiny's reasoning at once: trained on short arithmetic, it keeps on
    reasoning under the long text that offers tools, so a constrained answer (a tool call) would
    never start within a test's token budget."""
    return {str(tokenizer.convert_tokens_to_ids("</think>")): 100}


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
    from cluster.ray_start import init_ray
    from ray import serve

    extra = {"_metrics_export_port": metrics_port} if metrics_port else {}
    # The cluster's processes inherit this process's environment. Without the OMP_NUM_THREADS that
    # tests/conftest.py sets for shared cores, Ray gives each replica its own (its reserved CPUs,
    # 1 for a fractional num_cpus), as it does in production.
    threads = os.environ.pop("OMP_NUM_THREADS", None)
    try:
        init_ray(address="local", num_cpus=num_cpus, namespace="r1-tests", include_dashboard=False, log_to_driver=False,
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


@contextmanager
def redis_server(*args: str, timeout_s: float = 30.0) -> Iterator[str]:
    """A real `redis-server` on a free port, without snapshots (extra server `args` may turn on an
    append-only file); yields its URL and stops it afterwards."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed; install it (apt-get install redis-server, or scripts/system_deps.sh)")
    import redis

    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {process.returncode} before it answered") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer within {timeout_s} s") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
