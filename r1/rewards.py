"""Rule rewards for GRPO, and their weighted sum with failure accounting.

A reward is a plain picklable callable (TRL's convention, so it can also run in another process):

    reward(completions: list[str], *, prompts: list[str], answers: list[Any]) -> list[float]

`completions` are the generated texts as the model wrote them after the chat template's pre-filled
`<think>\\n`. Built in: `FormatReward` (reasoning closed by `</think>`, then a non-empty answer),
`AccuracyReward` (the task's answer checker) and `RewardModelReward` (the scalar score of a model
trained with `r1 train reward`).

`WeightedReward` combines terms. A term that raises, returns the wrong number of scores or a
non-finite score does not become 0.0: the affected samples get NaN, the failure is counted per term
with its reason, and GRPO drops those samples' groups from the loss (see `r1.train.grpo_stage`).

This module does not judge code or free-form answers; only the arithmetic task has a checker.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

RewardFn = Callable[..., list[float]]

# How many distinct failure reasons a score keeps per term (the count is always exact).
MAX_ERRORS_KEPT = 3


class FormatReward:
    """1.0 when the completion is `<reasoning></think><answer>` (R1 format), else 0.0."""

    name = "format"

    def __call__(self, completions: list[str], **_: Any) -> list[float]:
        from r1.tasks.arithmetic import format_ok

        return [1.0 if format_ok(text) else 0.0 for text in completions]


_INTEGER = re.compile(r"[+-]?[0-9]+")


def integer_answer(value: Any) -> int | None:
    """`value` as the integer answer the accuracy reward compares with: an int, an integral float
    (5.0) or a string of one ("-12"); None for anything else (4.7, True, None, "x")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value)
    return None


class AccuracyReward:
    """1.0 when the answer after `</think>` equals the reference answer, else 0.0."""

    name = "accuracy"

    def __init__(self, task: str = "arithmetic"):
        if task != "arithmetic":
            raise ValueError(f"no answer checker for task={task!r}; the accuracy reward supports task=arithmetic")
        self.task = task

    def __call__(self, completions: list[str], *, answers: list[Any], **_: Any) -> list[float]:
        from r1.tasks.arithmetic import is_correct

        if len(answers) != len(completions):
            raise ValueError(f"got {len(answers)} answers for {len(completions)} completions")
        expected = [integer_answer(answer) for answer in answers]
        for answer, value in zip(answers, expected):
            if value is None:
                raise ValueError(f"the accuracy reward needs integer answers, got {answer!r}")
        return [1.0 if is_correct(text, value) else 0.0 for text, value in zip(completions, expected)]


class RewardModelReward:
    """The scalar score of a Bradley–Terry reward model on (prompt, completion).

    Loads the model lazily on first call and drops it when pickled, so the callable ships cheaply
    to another process. `prompts` are the user prompts; each is rendered with the reward model's
    chat template exactly as in training (`r1.train.reward_model.render_response`).
    """

    name = "reward_model"

    def __init__(self, model_path: str, device: str = "cpu", max_seq_len: int = 512, batch_size: int = 16):
        self.model_path = model_path
        self.device = device
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self._loaded: tuple[Any, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_loaded"] = None
        return state

    def __call__(self, completions: list[str], *, prompts: list[str], **_: Any) -> list[float]:
        from r1.train.reward_model import load_reward_model, render_response, score_texts

        if self._loaded is None:
            self._loaded = load_reward_model(self.model_path, device=self.device)
        model, tokenizer = self._loaded
        texts = [render_response(tokenizer, prompt, completion) for prompt, completion in zip(prompts, completions)]
        return score_texts(model, tokenizer, texts, max_seq_len=self.max_seq_len, batch_size=self.batch_size)


@dataclass
class RewardScores:
    """Scores of one batch: the weighted total (NaN where any term failed) and each term's values."""

    total: list[float]
    per_term: dict[str, list[float]]
    failures: dict[str, int]
    errors: dict[str, list[str]] = field(default_factory=dict)

    def term_means(self) -> dict[str, float]:
        """Mean of each term over the samples it scored (NaN if it scored none)."""
        means = {}
        for name, values in self.per_term.items():
            finite = [v for v in values if not math.isnan(v)]
            means[name] = sum(finite) / len(finite) if finite else float("nan")
        return means

    @property
    def num_failed(self) -> int:
        return sum(1 for value in self.total if math.isnan(value))


@dataclass
class RewardTerm:
    name: str
    fn: RewardFn
    weight: float


class WeightedReward:
    """sum_k weight_k * reward_k(completion), computed term by term with failures counted."""

    def __init__(self, terms: Sequence[RewardTerm]):
        if not terms:
            raise ValueError("a weighted reward needs at least one term")
        names = [term.name for term in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"reward term names must be unique, got {names}")
        self.terms = list(terms)

    def __call__(self, completions: list[str], *, prompts: list[str], answers: list[Any]) -> RewardScores:
        num = len(completions)
        per_term: dict[str, list[float]] = {}
        failures: dict[str, int] = {}
        errors: dict[str, list[str]] = {}
        for term in self.terms:
            values, reasons = _run_term(term, completions, prompts, answers)
            per_term[term.name] = values
            failures[term.name] = sum(1 for v in values if math.isnan(v))
            if reasons:
                errors[term.name] = reasons[:MAX_ERRORS_KEPT]
                logger.warning("reward %s failed on %d/%d samples: %s", term.name, failures[term.name], num, reasons[0])
        total = [sum(term.weight * per_term[term.name][i] for term in self.terms) for i in range(num)]
        return RewardScores(total=total, per_term=per_term, failures=failures, errors=errors)


def _run_term(
    term: RewardTerm, completions: list[str], prompts: list[str], answers: list[Any]
) -> tuple[list[float], list[str]]:
    num = len(completions)
    try:
        raw = term.fn(completions, prompts=prompts, answers=answers)
    except Exception as error:  # a broken reward must be visible, not a silent 0.0
        return [float("nan")] * num, [f"{type(error).__name__}: {error}"]
    if raw is None or len(raw) != num:
        got = "None" if raw is None else f"{len(raw)} scores"
        return [float("nan")] * num, [f"returned {got} for {num} completions"]
    values: list[float] = []
    reasons: list[str] = []
    for value in raw:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not math.isfinite(number):
            reasons.append(f"non-finite or non-numeric score {value!r}")
            number = float("nan")
        values.append(number)
    return values, reasons


class CodeTestsReward:
    """Share of each prompt's unit tests (its `answer`) the completion's code passes, in the sandbox.

    `validator(code, tests) -> Validation` runs them elsewhere (CodeValidator actors, see
    `actors/code_validator.py: ActorPoolValidator`); None runs them in this process's own sandbox.
    A completion whose tests could not be run (a sandbox failure, not the completion's fault) scores
    None, which the weighted reward counts and logs as a failure instead of scoring it 0.
    """

    __name__ = "code_tests"

    def __init__(self, validator: Callable[..., Any] | None = None, max_workers: int = 4) -> None:
        from r1.codecheck.reward import CodeTestReward

        self.reward = CodeTestReward(validator=validator, max_workers=max_workers)

    def __call__(self, completions: list[str], *, answers: Sequence[Any], **_: Any) -> list[float | None]:
        return self.reward(completions, tests=list(answers))


def build_reward(specs: Sequence[Any], *, device: str = "cpu", code_validator: Callable[..., Any] | None = None) -> WeightedReward:
    """A `WeightedReward` from config specs (`r1.config.GRPORewardSpec`: name, weight, model_path).

    `code_validator` runs the `code_tests` reward's sandbox runs elsewhere (None: in this process).
    """
    terms = []
    for spec in specs:
        if spec.name == "format":
            fn: RewardFn = FormatReward()
        elif spec.name == "accuracy":
            fn = AccuracyReward()
        elif spec.name == "reward_model":
            fn = RewardModelReward(spec.model_path, device=device)
        elif spec.name == "code_tests":
            fn = CodeTestsReward(code_validator)
        else:
            raise ValueError(f"unknown reward {spec.name!r}; use format, accuracy, reward_model or code_tests")
        terms.append(RewardTerm(name=spec.name, fn=fn, weight=spec.weight))
    return WeightedReward(terms)
