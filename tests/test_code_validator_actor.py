"""The CodeValidator Serve deployment on a real local Ray: hostile programs end as results, the
same replica keeps serving, and the pool stays at its size. Also the handle-backed validator used
by the repair loop and the GRPO reward.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
from ray import serve

from actors.code_validator import HandleValidator, build_code_validator
from cluster.ray_start import init_ray
from r1.codecheck import CodeTestReward, solve_with_repair
from r1.config import CodeCheckConfig, CodeValidatorConfig

APP = "code-validator-test"
REPLY_DEADLINE_S = 120.0
ADD_TESTS = ["assert add(2, 3) == 5", "assert add(0, 0) == 0"]
GOOD = "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def handle():
    init_ray(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    config = CodeValidatorConfig(
        codecheck=CodeCheckConfig(timeout_s=20.0, memory_mb=256, max_processes=16),
        num_cpus=0.1, min_replicas=1, max_replicas=1, target_ongoing_requests=2, max_ongoing_requests=4,
        max_concurrent_runs=2,
    )
    try:
        # Handles only: no HTTP proxy, so nothing competes for a port with other Serve instances.
        serve.start(proxy_location="Disabled")
        yield serve.run(build_code_validator(config), name=APP, route_prefix=None)
    finally:
        serve.shutdown()
        ray.shutdown()


def _call(handle, code, tests=None, timeout_s=None) -> dict:
    return handle.validate.remote(code, tests, timeout_s).result(timeout_s=REPLY_DEADLINE_S)


def _running_replicas() -> int:
    deployment = serve.status().applications[APP].deployments["CodeValidator"]
    return deployment.replica_states.get("RUNNING", 0)


HOSTILE = [
    # Fork bomb inside the function under test.
    ("import os\ndef add(a, b):\n    while True:\n        try:\n            os.fork()\n        except OSError:\n"
     "            pass\n", ("timeout",)),
    # Tries to kill the replica by its pid (filled in below) and every low pid; inside a pid
    # namespace the low pids include the program itself, so it may end its own run.
    ("import os, signal\nfor pid in [REPLICA_PID, *range(1, 2000)]:\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
     "    except OSError:\n        pass\ndef add(a, b):\n    return 0\n", ("failed", "error")),
    # Allocates without bound.
    ("blocks = []\nwhile True:\n    blocks.append(bytearray(64 << 20))\n", ("error",)),
    # Crashes the interpreter.
    ("import ctypes\nctypes.string_at(0)\n", ("error",)),
    # Endless output.
    ("while True:\n    print('x' * 4096)\n", ("error", "timeout")),
]


def test_hostile_programs_then_a_normal_one_on_the_same_replica(handle) -> None:
    before = handle.stats.remote().result(timeout_s=REPLY_DEADLINE_S)
    for code, statuses in HOSTILE:
        reply = _call(handle, code.replace("REPLICA_PID", str(before["pid"])), ADD_TESTS, timeout_s=3.0)
        assert reply["status"] in statuses and reply["tests_passed"] == 0, reply
    normal = _call(handle, GOOD, ADD_TESTS)
    assert (normal["status"], normal["tests_passed"], normal["tests_total"]) == ("passed", 2, 2)
    assert normal["isolation"]["level"] == before["isolation"]
    after = handle.stats.remote().result(timeout_s=REPLY_DEADLINE_S)
    assert after["pid"] == before["pid"], "the replica was replaced"
    assert _running_replicas() == 1


def test_concurrent_hostile_requests_keep_the_pool_at_size(handle) -> None:
    pid = handle.stats.remote().result(timeout_s=REPLY_DEADLINE_S)["pid"]
    codes = [code.replace("REPLICA_PID", str(pid)) for code, _ in HOSTILE] + [GOOD]
    with ThreadPoolExecutor(max_workers=len(codes)) as pool:
        replies = list(pool.map(lambda code: _call(handle, code, ADD_TESTS, timeout_s=3.0), codes))
    assert [r["status"] for r in replies][-1] == "passed"
    assert all(r["tests_passed"] == 0 for r in replies[:-1])
    deadline = time.monotonic() + 30
    while _running_replicas() != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _running_replicas() == 1
    assert handle.stats.remote().result(timeout_s=REPLY_DEADLINE_S)["pid"] == pid


def test_bad_request_is_a_result_not_an_exception(handle) -> None:
    reply = _call(handle, GOOD, ["assert add(1,"])
    assert (reply["status"], reply["stage"]) == ("error", "request")
    assert "tests[0] is not valid Python" in reply["errors"][0]


def test_handle_validator_drives_the_repair_loop_and_the_reward(handle) -> None:
    validator = HandleValidator(handle, timeout_s=REPLY_DEADLINE_S)
    answers = iter(["```python\ndef add(a, b)\n    return a + b\n```", f"```python\n{GOOD}```"])
    outcome = solve_with_repair("Write `add(a, b)`.", lambda prompt, *, temperature: next(answers),
                                tests=ADD_TESTS, validator=validator)
    assert [a.validation.status for a in outcome.attempts] == ["syntax_error", "passed"]
    reward = CodeTestReward(validator=validator)
    assert reward([GOOD, "def add(a, b):\n    return 0\n"], tests=[ADD_TESTS, ADD_TESTS]) == [1.0, 0.5]
