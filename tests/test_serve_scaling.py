"""Autoscaling and replica failure of the LLM server, on real Serve under real HTTP load.

Slow (a minute or two), but part of CI: the LLM server must scale above its 2 minimum replicas
under sustained load and return to 2 after, and a replica killed under load must be replaced while
retried requests succeed.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
import ray
from ray import serve

from cluster.serve.app import build_app
from tests.serve_helpers import free_port, ray_serve, small_deployment, wait_for, wait_http_ok

pytestmark = pytest.mark.slow
APP = "scaling"
MODEL = "r1-tiny"


@pytest.fixture(scope="module")
def server():
    port = free_port()
    # Serve's routers and replicas report their load every 10 s by default; every second here, so
    # the controller sees the load (and its end) within the test's seconds, not tens of seconds.
    with ray_serve(port, env_vars={"RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
                                   "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}):
        config = {
            "ingress": small_deployment(num_cpus=0.05, min_replicas=2, max_replicas=2),
            # Scale on one in-flight request per replica, quickly up, a few seconds down, judged over
            # a short window.
            "llm": small_deployment(num_cpus=0.1, target_ongoing_requests=1, upscale_delay_s=1.0, downscale_delay_s=4.0,
                                    look_back_period_s=4.0),
            "engine": {"max_num_seqs": 16, "max_queued_requests": 64},
            "request_timeout_s": 120,
            # This module tests /v1/completions only: no sessions, no sandbox, one filter replica
            # (fewer processes starting and idling beside the replicas under test).
            "sessions": {"enabled": False},
            "code_validator": None,
            "safety": {"deployment": small_deployment(min_replicas=1, max_replicas=1, num_cpus=0.02)},
        }
        serve.run(build_app(config), name=APP, route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        wait_http_ok(f"{base}/health")
        yield base


def running_replicas() -> int:
    status = serve.status().applications[APP].deployments["LLMServer"]
    return status.replica_states.get("RUNNING", 0)


def live_llm_replicas() -> list[tuple[str, object]]:
    """(name, handle) of LLMServer replica actors that are alive (the name list keeps dead ones)."""
    live = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if "LLMServer" not in entry["name"]:
            continue
        try:
            handle = ray.get_actor(entry["name"], namespace=entry["namespace"])
        except ValueError:
            continue
        live.append((entry["name"], handle))
    return live


class Load:
    """Keeps `concurrency` requests in flight until stopped; retries failures (as a client would)."""

    def __init__(self, base: str, concurrency: int, max_tokens: int):
        self.base, self.concurrency, self.max_tokens = base, concurrency, max_tokens
        self.stop = threading.Event()
        self.ok = 0
        self.failed_then_retried = 0
        self.final_failures = 0
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _one(self, http: httpx.AsyncClient) -> None:
        body = {"model": MODEL, "prompt": "1", "max_tokens": self.max_tokens, "temperature": 0}
        while not self.stop.is_set():
            for attempt in range(5):
                try:
                    response = await http.post(f"{self.base}/v1/completions", json=body)
                    if response.status_code == 200:
                        self.ok += 1
                        break
                except httpx.HTTPError:
                    pass
                self.failed_then_retried += 1
                await asyncio.sleep(0.5)
            else:
                self.final_failures += 1

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            await asyncio.gather(*(self._one(http) for _ in range(self.concurrency)))

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=180)
        assert not self.thread.is_alive(), "load generator did not stop"


def test_llm_server_scales_up_under_load_and_back_down(server):
    assert running_replicas() == 2
    peak = 2
    # Three requests in flight at a target of one per replica ask for one more replica: starting
    # one replica process on 2 busy cores takes ~25 s, starting six at once (8 requests) over a minute.
    with Load(server, concurrency=3, max_tokens=300) as load:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and peak <= 2:
            peak = max(peak, running_replicas())
            time.sleep(0.5)
    assert peak > 2, "the LLM server never scaled above its 2 minimum replicas"
    assert load.ok > 0
    wait_for(lambda: running_replicas() == 2, 180, "scale-down to 2 replicas")


def test_killed_replica_is_replaced_and_retries_succeed(server):
    wait_for(lambda: running_replicas() == 2, 120, "2 running replicas")
    victim_name, victim = live_llm_replicas()[0]
    with Load(server, concurrency=4, max_tokens=100) as load:
        wait_for(lambda: load.ok >= 2, 120, "requests to succeed before the kill")
        ray.kill(victim, no_restart=True)
        ok_at_kill = load.ok
        wait_for(lambda: load.ok >= ok_at_kill + 8, 180, "requests to succeed after the kill")
    assert load.final_failures == 0
    wait_for(lambda: running_replicas() >= 2, 180, "the killed replica to be replaced")
    assert victim_name not in {name for name, _ in live_llm_replicas()}
