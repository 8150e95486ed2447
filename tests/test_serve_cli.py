"""The two ways users start serving: `r1 serve` (the Quickstart main job) and `serve run`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.serve_helpers import free_port, wait_http_ok

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    env.pop("R1_API_KEYS", None)
    return {**env, **extra}


def _start(command: list[str], log: Path, cwd: Path, **env: str) -> subprocess.Popen:
    # Its own session: the Ray processes it starts share its process group, so `_stop` can sweep
    # them without `ray stop`, which would also stop the cluster of a test running in parallel.
    with open(log, "w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=_env(**env), cwd=cwd,
                                start_new_session=True)


def _wait_for_line(process: subprocess.Popen, log: Path, line: str, timeout_s: float = 300) -> str:
    deadline = time.monotonic() + timeout_s
    while line not in log.read_text():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {line!r} within {timeout_s:.0f}s: " + log.read_text()[-3000:]
        time.sleep(1)
    return log.read_text()


def _stop(process: subprocess.Popen, timeout_s: float = 90) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
    try:  # whatever of its cluster outlived it
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _chat(base: str) -> dict:
    body = {"model": "r1-tiny", "messages": [{"role": "user", "content": "1 + 1?"}], "max_tokens": 5}
    response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_r1_serve_prints_ready_and_serves_the_default_model(tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    process = _start([str(BIN / "r1"), "serve", "--port", str(port), "--host", "0.0.0.0"], log, tmp_path)
    try:
        deadline = time.monotonic() + 300
        while "r1-cluster is ready" not in log.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()[-3000:]
            time.sleep(1)
        text = log.read_text()
        assert f"r1-cluster is ready: http://127.0.0.1:{port}/v1" in text, text[-3000:]
        # No API keys: it refused 0.0.0.0 and said so.
        assert "no API keys configured" in text
        reply = _chat(f"http://127.0.0.1:{port}")
        assert reply["model"] == "r1-tiny" and reply["usage"]["completion_tokens"] >= 1
    finally:
        _stop(process)
    assert process.returncode == 0


def test_serve_run_with_the_shipped_serve_yaml(tmp_path):
    port = free_port()
    config = yaml.safe_load((ROOT / "ray_configs" / "serve.yaml").read_text())
    config["http_options"]["port"] = port  # the only change: a free port
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "serve_run.log"
    process = _start([str(BIN / "serve"), "run", str(path)], log, ROOT)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", timeout_s=300)
        reply = _chat(f"http://127.0.0.1:{port}")
        assert reply["choices"][0]["finish_reason"] in {"stop", "length"}
    finally:
        _stop(process)


# Run against a server: open a long stream, read its first event, close it; the LLM servers'
# running requests must fall to 0 (the engine stopped generating for it).
DISCONNECT_CHECK = """
import sys, time
import httpx, ray
from ray import serve
address, base = sys.argv[1], sys.argv[2]
ray.init(address=address, namespace="r1", log_to_driver=False)
handle = serve.get_deployment_handle("LLMServer", app_name="r1")
running = lambda: handle.stats.remote().result(timeout_s=30)["running"]  # the server's one LLM replica
body = {"model": "r1-tiny", "prompt": "1", "max_tokens": 900, "temperature": 0, "stream": True, "ignore_eos": True}
print("idle before the stream:", running(), flush=True)  # also sets up the handle's router (seconds, the first time)
with httpx.Client(timeout=60, headers={"Authorization": "Bearer haproxy-key"}) as client:
    with client.stream("POST", base + "/v1/completions", json=body) as response:
        # Kept in a name: a generator over iter_lines() closes it when collected, and that closes
        # the connection, so the server would see the client leave before the check below.
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        print("generating while streaming:", running(), flush=True)
deadline = time.monotonic() + 60
while running() and time.monotonic() < deadline:
    time.sleep(0.5)
print("cancelled after the client left" if not running() else "still generating", flush=True)
"""


def test_r1_serve_behind_haproxy(tmp_path):
    # Ray Serve's HAProxy mode: no Python proxy; the two ingress replicas serve HTTP themselves and
    # HAProxy on the port balances over them. The same API, auth and streaming through it.
    import tempfile

    import openai

    port = free_port()
    log = tmp_path / "serve.log"
    folders = set(Path(tempfile.gettempdir()).glob("r1-haproxy-*"))
    # One LLM server replica (the ingress keeps its two behind HAProxy): Serve routes a stats call to
    # the least busy replica, so with two it would never reach the one generating.
    process = _start([str(BIN / "r1"), "serve", "--proxy", "haproxy", "--port", str(port),
                      "--set", "llm.min_replicas=1", "--set", "llm.max_replicas=1"], log, tmp_path,
                     R1_API_KEYS="haproxy-key")
    try:
        text = _wait_for_line(process, log, "r1-cluster is ready")
        assert f"http://127.0.0.1:{port}/v1" in text and "HAProxy in front of the ingress replicas" in text, text[-3000:]
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/health", timeout=30).status_code == 200
        refused = httpx.get(f"{base}/v1/models", timeout=30)
        assert refused.status_code == 401 and "API key" in refused.json()["error"]["message"]
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="haproxy-key", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "1 + 1?"}]
        reply = client.chat.completions.create(model="r1-tiny", messages=messages, max_tokens=12, temperature=0)
        chunks = list(client.chat.completions.create(model="r1-tiny", messages=messages, max_tokens=12, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        streamed = "".join((c.delta.model_extra.get("reasoning_content") or "") + (c.delta.content or "")
                           for chunk in chunks for c in chunk.choices)
        message = reply.choices[0].message
        assert streamed == (message.model_extra.get("reasoning_content") or "") + (message.content or "")
        assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens >= 1
        # A client that goes away cancels its generation: HAProxy closes the replica's connection.
        address = next(line.split()[3] for line in text.splitlines() if line.startswith("Ray cluster at "))
        check = subprocess.run([sys.executable, "-c", DISCONNECT_CHECK, address, base], capture_output=True, text=True,
                               timeout=240, env=_env(RAY_AUTH_MODE="token"), cwd=tmp_path)
        assert check.returncode == 0 and "idle before the stream: 0" in check.stdout, check.stdout + check.stderr
        assert "generating while streaming: 1" in check.stdout, check.stdout + check.stderr
        assert "cancelled after the client left" in check.stdout, check.stdout + check.stderr
        # HAProxy listens on the port (not Serve's proxy), with its files in a folder of this server's own.
        import psutil

        listeners = {c.pid for c in psutil.net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid}
        assert [psutil.Process(pid).name() for pid in listeners] == ["haproxy"]
        assert set(Path(tempfile.gettempdir()).glob("r1-haproxy-*")) - folders
    finally:
        _stop(process)
    assert process.returncode == 0, log.read_text()[-3000:]
    # Its own HAProxy files were removed with it.
    assert not set(Path(tempfile.gettempdir()).glob("r1-haproxy-*")) - folders
