"""GRPO code reward: the fraction of a task's tests a completion passes, via `validate`.

`CodeTestReward` is a plain picklable callable (TRL-style: `reward(completions, tests=[...])`).
Nothing fails silently: every completion's outcome is counted by status in `counts`, the last
reasons are kept in `recent_failures`, and when the sandbox itself breaks (not the completion's
fault) the reward is None — TRL ignores None — and a warning is logged, instead of a quiet 0.0.
Doctests are not counted: the completion writes them itself, so they would reward trivial ones.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from r1.codecheck.extract import extract_code
from r1.codecheck.validate import Validation, validate
from r1.config import CodeCheckConfig, parse_config

logger = logging.getLogger(__name__)
RECENT_FAILURES = 32


@dataclass(frozen=True)
class RewardResult:
    value: float | None  # None: no reward could be computed (the sandbox failed)
    status: str  # the Validation status
    reason: str  # empty when every test passed
    tests_passed: int
    tests_total: int


def completion_text(completion: Any) -> str:
    """A completion as text: a string, or the last message of a conversational completion."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise ValueError(f"completion must be a string or a list of chat messages, got {type(completion).__name__}")


def reward_from(validation: Validation) -> RewardResult:
    reason = "; ".join(validation.errors)[:500]
    if validation.status == "error" and validation.stage == "sandbox":
        return RewardResult(None, validation.status, reason, 0, validation.tests_total)
    return RewardResult(validation.pass_rate, validation.status, reason, validation.tests_passed,
                        validation.tests_total)


class CodeTestReward:
    """Test pass rate of each completion, computed in the sandbox (or by `validator`)."""

    __name__ = "code_test_reward"  # TRL logs reward functions by __name__

    def __init__(self, config: CodeCheckConfig | dict | None = None, *, max_workers: int = 2,
                 validator: Callable[[str, Sequence[str] | str], Validation | dict] | None = None) -> None:
        self.config = config if isinstance(config, CodeCheckConfig) else parse_config(CodeCheckConfig, config)
        if max_workers < 1:
            raise ValueError(f"max_workers={max_workers} must be >= 1")
        self.max_workers = max_workers
        # e.g. a CodeValidator deployment client; returns a Validation or its to_dict().
        self.validator = validator
        self.counts: Counter[str] = Counter()
        self.recent_failures: deque[str] = deque(maxlen=RECENT_FAILURES)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _validate(self, code: str, tests: Sequence[str] | str) -> Validation:
        if self.validator is None:
            return validate(code, tests, config=self.config, include_doctests=False)
        result = self.validator(code, tests)
        return Validation.from_dict(result) if isinstance(result, dict) else result

    def score(self, completions: Sequence[Any], tests: Sequence[Sequence[str] | str]) -> list[RewardResult]:
        """One RewardResult per completion; `tests[i]` are the tests of completion i's task."""
        if len(tests) != len(completions):
            raise ValueError(f"got {len(completions)} completions but {len(tests)} test lists; pass one per completion")
        for index, item in enumerate(tests):
            if not item:
                raise ValueError(f"tests[{index}] is empty; every task needs at least one test")
        codes = [extract_code(completion_text(completion)) for completion in completions]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            validations = list(pool.map(self._validate, codes, tests))
        results = [reward_from(validation) for validation in validations]
        with self._lock:
            for result in results:
                self.counts[result.status] += 1
                if result.value is None:
                    self.counts["no_reward"] += 1
                    logger.warning("code reward not computed (sandbox failure): %s", result.reason)
                if result.status != "passed":
                    self.recent_failures.append(f"{result.status}: {result.reason}")
        return results

    def __call__(self, completions: Sequence[Any], *, tests: Sequence[Sequence[str] | str],
                 **_dataset_columns: Any) -> list[float | None]:
        return [result.value for result in self.score(completions, tests)]
