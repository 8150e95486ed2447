"""Validate code: stage 1 syntax, stage 2 tests run in the sandbox, judged by the harness.

`validate(code, tests)` returns a `Validation`; untrusted code and model-written tests never
raise out of it. A ValueError means the caller's own request was malformed (a test that is not
Python, `tests` of the wrong type). "passed" comes from the harness result channel (see
harness.py), never from the program's exit code.
"""

from __future__ import annotations

import marshal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1.codecheck import harness
from r1.codecheck.sandbox import RunResult, Sandbox, default_sandbox
from r1.codecheck.syntax import SyntaxIssue, check_syntax
from r1.config import CodeCheckConfig

RUNNER_SOURCE = (Path(__file__).parent / "runner.py").read_text(encoding="utf-8")
STATUSES = ("passed", "failed", "syntax_error", "error", "timeout")
# Where validation stopped: "syntax", "tests" (no tests, or broken channel), "load" (the solution
# failed at import), "sandbox" (the sandbox itself failed: not the code's fault), "run" (tests ran),
# "request" (the request was malformed; see validate_request).
STAGES = ("request", "syntax", "tests", "load", "sandbox", "run")


@dataclass(frozen=True)
class Validation:
    status: str  # "passed" | "failed" | "syntax_error" | "error" | "timeout"
    tests_passed: int
    tests_total: int
    errors: tuple[str, ...]  # "stage: message", the ones to feed back to a model first
    stage: str
    tests: tuple[harness.TestResult, ...] = ()
    syntax: SyntaxIssue | None = None
    notes: tuple[str, ...] = ()
    run: RunResult | None = field(default=None, repr=False)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def pass_rate(self) -> float:
        return self.tests_passed / self.tests_total if self.tests_total else 0.0

    def to_dict(self) -> dict:
        """Plain data (what the CodeValidator deployment returns)."""
        return {
            "status": self.status, "stage": self.stage, "tests_passed": self.tests_passed,
            "tests_total": self.tests_total, "errors": list(self.errors),
            "tests": [result.to_dict() for result in self.tests],
            "syntax": self.syntax.to_dict() if self.syntax else None, "notes": list(self.notes),
            "isolation": self.run.isolation.to_dict() if self.run else None,
            "duration_s": self.run.duration_s if self.run else 0.0,
            "stdout": self.run.stdout[-2000:] if self.run else "",
            "stderr": self.run.stderr[-2000:] if self.run else "",
        }

    @classmethod
    def from_dict(cls, data: dict) -> Validation:
        """Rebuild from `to_dict()` output (e.g. a deployment's reply); `run` is not carried."""
        syntax = SyntaxIssue(**data["syntax"]) if data.get("syntax") else None
        tests = tuple(harness.TestResult(**item) for item in data.get("tests", []))
        return cls(status=data["status"], tests_passed=data["tests_passed"], tests_total=data["tests_total"],
                   errors=tuple(data.get("errors", [])), stage=data.get("stage", "run"), tests=tests,
                   syntax=syntax, notes=tuple(data.get("notes", [])))


def validate(code: str, tests: str | Sequence[str] | None = None, *, timeout_s: float | None = None,
             config: CodeCheckConfig | None = None, sandbox: Sandbox | None = None,
             include_doctests: bool = True, test_origin: str = "request") -> Validation:
    """Syntax-check `code`, then run `tests` (plus its doctests) against it in the sandbox."""
    sandbox = sandbox or default_sandbox(config)
    timeout_s = sandbox.config.timeout_s if timeout_s is None else timeout_s
    issue = check_syntax(code)
    if issue is not None:
        return Validation("syntax_error", 0, 0, (f"syntax: {issue}",), "syntax", syntax=issue)
    specs = harness.parse_tests(tests, origin=test_origin)
    notes: list[str] = []
    if include_doctests:
        doctests, notes = harness.doctest_specs(code)
        specs += doctests
    if not specs:
        return Validation("error", 0, 0, ("tests: no tests to run; pass tests or add doctest examples",), "tests",
                          notes=tuple(notes))
    # marshal: the runner decodes it without importing json (the request is trusted data).
    request = marshal.dumps({"tests": [spec.request() for spec in specs]}, 4)
    run = sandbox.run_program({"solution.py": code},
                              ["-c", RUNNER_SOURCE, "solution.py", "{channel_in}", "{channel_out}"],
                              timeout_s=timeout_s, channel_input=request)
    return _verdict(specs, run, notes)


def validate_request(code: Any, tests: Any = None, *, timeout_s: Any = None, sandbox: Sandbox | None = None,
                     include_doctests: bool = True) -> Validation:
    """`validate` for a request path: a malformed request comes back as status "error", stage
    "request", with a message naming the field, instead of raising. `timeout_s` may lower the
    sandbox's configured limit, not raise it."""
    sandbox = sandbox or default_sandbox()
    limit = sandbox.config.timeout_s
    problem = ""
    if not isinstance(code, str):
        problem = f"code must be a string, got {type(code).__name__}"
    elif timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                    or not 0 < timeout_s <= limit):
        problem = f"timeout_s={timeout_s!r} must be a number in (0, {limit}]"
    if not problem:
        try:
            return validate(code, tests, timeout_s=timeout_s, sandbox=sandbox, include_doctests=include_doctests)
        except ValueError as error:
            problem = str(error)
    return Validation("error", 0, 0, (f"request: {problem}",), "request")


def _verdict(specs: list[harness.TestSpec], run: RunResult, notes: list[str]) -> Validation:
    total = len(specs)
    if not run.started:
        return Validation("error", 0, total, (f"sandbox: {run.reason}",), "sandbox", notes=tuple(notes), run=run)
    judgement = harness.judge(specs, run.channel, truncated=run.channel_truncated)
    results = tuple(judgement.results)
    passed = sum(result.passed for result in results)
    common = dict(tests=results, notes=tuple(notes), run=run)
    if judgement.violation:
        return Validation("error", 0, total, (f"tests: result channel broke protocol ({judgement.violation})",),
                          "tests", **common)
    timed_out = run.status == "timeout"
    if not judgement.loaded:
        if judgement.loaded is False:
            return Validation("error", 0, total, (f"load: {judgement.load_error}",), "load", **common)
        if timed_out:
            return Validation("timeout", 0, total, (f"load: {run.reason} while loading the solution",), "load",
                              **common)
        stderr_tail = run.stderr.strip()[-500:]
        detail = f"; stderr: {stderr_tail}" if stderr_tail else ""
        return Validation("error", 0, total, (f"load: the program ended before any test ran ({run.reason}){detail}",),
                          "load", **common)
    errors = tuple(f"test {result.name}: {result.error}" for result in results if not result.passed)
    if passed == total:
        return Validation("passed", passed, total, (), "run", **common)
    if timed_out:
        return Validation("timeout", passed, total, (f"timeout: {run.reason}", *errors), "run", **common)
    return Validation("failed", passed, total, errors, "run", **common)
