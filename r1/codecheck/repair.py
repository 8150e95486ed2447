"""Stage 3: the feedback loop. Generate code, validate it, and on a syntax error or failing tests
regenerate with the errors in the prompt and a lower temperature, up to `max_repairs` times.

The model is any `generate(prompt, *, temperature) -> str` callable and validation any
`validator(code, tests) -> Validation` callable (the local sandbox by default, a CodeValidator
deployment in serving), so the loop runs the same with a real model, a test stub or a remote pool.
It does not retry when the sandbox itself failed: that is not something the model can fix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from r1.codecheck.extract import extract_code
from r1.codecheck.prompts import build_code_prompt, build_repair_prompt
from r1.codecheck.testgen import Generate, generate_tests
from r1.codecheck.validate import Validation, validate
from r1.config import CodeCheckConfig

Validator = Callable[[str, Sequence[str] | str | None], Validation]


class RepairCancelled(Exception):
    """`solve_with_repair` stopped because `should_stop()` turned true (e.g. the client went away)."""


@dataclass(frozen=True)
class Attempt:
    number: int  # 1 = first generation, 2.. = repairs
    temperature: float
    code: str
    validation: Validation

    def to_dict(self) -> dict:
        return {"attempt": self.number, "temperature": self.temperature, "status": self.validation.status,
                "stage": self.validation.stage, "errors": list(self.validation.errors),
                "tests_passed": self.validation.tests_passed, "tests_total": self.validation.tests_total}


@dataclass(frozen=True)
class RepairOutcome:
    code: str  # the last attempt's code
    validation: Validation  # the last attempt's validation
    attempts: tuple[Attempt, ...]
    tests: tuple[str, ...]  # the tests used (given or generated)
    tests_origin: str  # "request" | "generated" | "none"

    @property
    def status(self) -> str:
        return self.validation.status

    def to_dict(self) -> dict:
        """The `code_validation` object of a serving response."""
        return {"status": self.validation.status, "attempts": len(self.attempts),
                "tests_passed": self.validation.tests_passed, "tests_total": self.validation.tests_total,
                "tests_origin": self.tests_origin, "errors": [attempt.to_dict() for attempt in self.attempts]}


def repair_temperature(temperature: float, config: CodeCheckConfig) -> float:
    """Repairs sample more conservatively than the first attempt (never hotter)."""
    return min(temperature, config.repair_temperature)


def _stoppable(call: Callable, should_stop: Callable[[], bool]) -> Callable:
    def checked(*args, **kwargs):
        if should_stop():
            raise RepairCancelled("the code-validation loop was cancelled")
        return call(*args, **kwargs)

    return checked


def solve_with_repair(task: str, generate: Generate, *, tests: str | Sequence[str] | None = None,
                      config: CodeCheckConfig | None = None, validator: Validator | None = None,
                      temperature: float = 0.6, max_repairs: int | None = None,
                      generate_missing_tests: bool = True, should_stop: Callable[[], bool] | None = None) -> RepairOutcome:
    """Write code for `task` with `generate`, validating and repairing until it passes.

    Without `tests`, the model writes them once the first syntactically valid attempt exists
    (it needs the function's signature); doctests in the code are always run too. `should_stop`
    is asked before every generation and validation; once it is true the loop raises
    `RepairCancelled` instead of starting more work.
    """
    config = config or CodeCheckConfig()
    max_repairs = config.max_repairs if max_repairs is None else max_repairs
    if max_repairs < 0:
        raise ValueError(f"max_repairs={max_repairs} must be >= 0")
    used_tests: list[str] | str | None = list(tests) if isinstance(tests, (list, tuple)) else tests
    origin = "request" if tests is not None else "none"
    if validator is None:
        def validator(code: str, tests_now: Sequence[str] | str | None) -> Validation:
            return validate(code, tests_now, config=config, test_origin=origin)
    if should_stop is not None:
        generate, validator = _stoppable(generate, should_stop), _stoppable(validator, should_stop)
    attempts: list[Attempt] = []
    prompt, current_temperature = build_code_prompt(task), temperature
    while True:
        code = extract_code(generate(prompt, temperature=current_temperature))
        if used_tests is None and generate_missing_tests:
            generated = generate_tests(task, code, generate, num_tests=config.num_generated_tests,
                                       temperature=config.repair_temperature)
            if generated:
                used_tests, origin = generated, "generated"
        validation = validator(code, used_tests)
        attempts.append(Attempt(len(attempts) + 1, current_temperature, code, validation))
        repairs_done = len(attempts) - 1
        # No repair helps when the sandbox could not run, or when the request itself is malformed.
        if validation.passed or validation.stage in ("sandbox", "request") or repairs_done >= max_repairs:
            break
        prompt = build_repair_prompt(task, code, validation)
        current_temperature = repair_temperature(temperature, config)
    tests_tuple = (used_tests,) if isinstance(used_tests, str) else tuple(used_tests or ())
    return RepairOutcome(code, attempts[-1].validation, tuple(attempts), tests_tuple, origin)

