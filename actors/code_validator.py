"""CodeValidator: the Serve deployment that validates generated code in sandbox workers.

Thin by design: each replica builds one `r1.codecheck.Sandbox` (probing the isolation level at
startup, so a host that cannot sandbox fails the deployment instead of the first request) and runs
`validate_request` in worker threads, at most `max_concurrent_runs` at once. Untrusted code never
runs in the replica's process: every run is a separate process tree under its own uid (see
r1/codecheck/isolation.py), so a hostile program ends as a result, not as a dead replica.

`HandleValidator` adapts a deployment handle to the `validator(code, tests)` callable that
`r1.codecheck.solve_with_repair` and `r1.codecheck.CodeTestReward` accept. Training needs no Serve
app: `start_validator_actors` starts the same class as plain Ray actors and `ActorPoolValidator`
spreads a GRPO step's sandbox runs over them.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from actors import metrics
from actors.tracing import setup_actor_tracing
from r1.codecheck import Sandbox, Validation, validate_request
from r1.config import CodeValidatorConfig, parse_config
from r1.telemetry import inject_context, span, untraced

HEALTH_PROBE_EVERY_S = 60.0

_DEFAULTS = CodeValidatorConfig()


@serve.deployment(
    name="CodeValidator",
    ray_actor_options={"num_cpus": _DEFAULTS.num_cpus},
    autoscaling_config={"min_replicas": _DEFAULTS.min_replicas, "max_replicas": _DEFAULTS.max_replicas,
                        "target_ongoing_requests": _DEFAULTS.target_ongoing_requests},
    max_ongoing_requests=_DEFAULTS.max_ongoing_requests,
)
class CodeValidatorDeployment:
    def __init__(self, config: dict[str, Any] | None = None) -> None:
        setup_actor_tracing("code-validator")
        metrics.start_resource_reporter("code_validator")
        self.config = parse_config(CodeValidatorConfig, config, source="CodeValidator config")
        self.sandbox = Sandbox(self.config.codecheck)
        self.plan = self.sandbox.plan()
        self._slots = asyncio.Semaphore(self.config.max_concurrent_runs)
        self._counts: Counter[str] = Counter()
        self._last_probe = time.monotonic()

    async def validate(self, code: str, tests: str | list[str] | None = None,
                       timeout_s: float | None = None, trace: dict[str, str] | None = None) -> dict[str, Any]:
        """Validation.to_dict() of `code` against `tests` (+ doctests); never raises for bad input."""
        num_tests = len(tests) if isinstance(tests, list) else int(bool(tests))
        with span("code.validate", trace, code_chars=len(code), num_tests=num_tests,
                  isolation=self.plan.level) as current:
            async with self._slots:
                # to_thread copies the context: the sandbox's "sandbox.run" spans are children of this one.
                validation = await asyncio.to_thread(validate_request, code, tests, timeout_s=timeout_s,
                                                     sandbox=self.sandbox)
            current.set_attribute("status", validation.status)
        self._counts[validation.status] += 1
        metrics.record_sandbox_run(validation.status)
        return validation.to_dict()

    def stats(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "isolation": self.plan.level, "interpreter": self.plan.interpreter,
                "notes": list(self.plan.notes), "validations": dict(self._counts)}

    async def check_health(self) -> None:
        # A real sandbox run now and then: catches a host that lost bubblewrap or its uid range.
        if time.monotonic() - self._last_probe < HEALTH_PROBE_EVERY_S:
            return
        self._last_probe = time.monotonic()
        with untraced():  # not a trace per health check
            result = await asyncio.to_thread(self.sandbox.run_python, "print('ok')", timeout_s=30.0)
        if result.status != "ok":
            raise RuntimeError(f"sandbox cannot run a trivial program: {result.reason}")


def build_code_validator(config: CodeValidatorConfig | dict[str, Any] | None = None) -> serve.Application:
    """The deployment bound to `config`, with its resources and autoscaling taken from it."""
    config = config if isinstance(config, CodeValidatorConfig) else parse_config(CodeValidatorConfig, config)
    return CodeValidatorDeployment.options(
        ray_actor_options={"num_cpus": config.num_cpus},
        autoscaling_config={"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                            "target_ongoing_requests": config.target_ongoing_requests},
        max_ongoing_requests=config.max_ongoing_requests,
    ).bind(config.model_dump())


def run_on_loop(loop: asyncio.AbstractEventLoop, call: Any, timeout_s: float) -> Any:
    """From a worker thread: run the coroutine `call()` on `loop` and wait (bounded) for its value.

    For handles of a replica whose router runs on its own event loop (the ingress with
    `ingress_single_loop`): such a handle can be called only from that loop, not from a thread.
    """
    future = asyncio.run_coroutine_threadsafe(call(), loop)
    try:
        return future.result(timeout=timeout_s)
    except TimeoutError:
        future.cancel()
        raise


class HandleValidator:
    """`validator(code, tests) -> Validation` backed by a CodeValidator handle (picklable).

    Blocking, for worker threads. With `loop`, the call is made on that event loop (see `run_on_loop`).
    """

    def __init__(self, handle: DeploymentHandle, timeout_s: float = 60.0,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.handle = handle
        self.timeout_s = timeout_s
        self.loop = loop

    def __call__(self, code: str, tests: str | list[str] | None) -> Validation:
        trace = inject_context()  # this thread's span: the caller's
        if self.loop is None:
            reply = self.handle.validate.remote(code, tests, trace=trace).result(timeout_s=self.timeout_s)
        else:
            async def call() -> Any:
                return await self.handle.validate.remote(code, tests, trace=trace)

            reply = run_on_loop(self.loop, call, self.timeout_s)
        return Validation.from_dict(reply)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "loop": None}  # an event loop belongs to its process


def start_validator_actors(count: int, config: CodeValidatorConfig | dict[str, Any] | None = None) -> list[Any]:
    """`count` CodeValidator workers as plain Ray actors (restarted if they die), e.g. for a training
    run's code_tests reward. Each probes its sandbox at start, so a host that cannot sandbox fails here."""
    import ray

    if count < 1:
        raise ValueError(f"count={count} must be >= 1")
    config = config if isinstance(config, CodeValidatorConfig) else parse_config(CodeValidatorConfig, config)
    actor_class = ray.remote(CodeValidatorDeployment.func_or_class)
    return [
        actor_class.options(num_cpus=config.num_cpus, max_restarts=-1, max_task_retries=2,
                            max_concurrency=config.max_ongoing_requests).remote(config.model_dump())
        for _ in range(count)
    ]


class ActorPoolValidator:
    """`validator(code, tests) -> Validation` over CodeValidator actors, round robin (picklable)."""

    def __init__(self, actors: list[Any], timeout_s: float = 120.0) -> None:
        if not actors:
            raise ValueError("ActorPoolValidator needs at least one CodeValidator actor")
        self.actors = list(actors)
        self.timeout_s = timeout_s
        self._calls = 0

    def __call__(self, code: str, tests: str | list[str] | None) -> Validation:
        import ray

        actor = self.actors[self._calls % len(self.actors)]
        self._calls += 1
        reply = ray.get(actor.validate.remote(code, tests, trace=inject_context()), timeout=self.timeout_s)
        return Validation.from_dict(reply)
