"""Exact-match evaluation on the arithmetic task's held-out split (`r1 eval`).

Greedy decoding with the r1 engine on the test split of one level; reports exact-match accuracy
(the answer after `</think>` equals the reference) and the format rate (R1 format respected).
`paired_comparison` compares two models on the same problems (McNemar's exact test), as
`r1 eval --baseline` prints. This module does not evaluate other tasks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from r1.config import EngineConfig, SamplingConfig


@dataclass
class EvalResult:
    task: str
    level: int
    num_problems: int
    accuracy: float
    format_rate: float
    mean_completion_tokens: float
    # Whether each problem (in generation order) was answered correctly.
    correct: tuple[bool, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        result = asdict(self)
        del result["correct"]
        return result


@dataclass
class PairedComparison:
    """Two models on the same problems: how many the candidate fixed and broke vs the baseline."""

    num_problems: int
    candidate_accuracy: float
    baseline_accuracy: float
    fixed: int  # baseline wrong, candidate right
    broken: int  # baseline right, candidate wrong
    p_value: float  # McNemar's exact two-sided test: P(a split at least this uneven | no difference)

    @property
    def difference(self) -> float:
        return self.candidate_accuracy - self.baseline_accuracy

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "difference": self.difference}


def paired_comparison(candidate: list[bool] | tuple[bool, ...], baseline: list[bool] | tuple[bool, ...]) -> PairedComparison:
    """Compare per-problem correctness of two models on the same problems.

    Only the discordant problems carry information: under "no difference" each of the n = fixed +
    broken is equally likely to go either way, so the exact two-sided p-value is
    min(1, 2 * P(Binomial(n, 1/2) <= min(fixed, broken))).
    """
    if len(candidate) != len(baseline) or not candidate:
        raise ValueError(f"need the same non-empty problems for both models, got {len(candidate)} and {len(baseline)}")
    fixed = sum(1 for c, b in zip(candidate, baseline) if c and not b)
    broken = sum(1 for c, b in zip(candidate, baseline) if b and not c)
    n = fixed + broken
    tail = sum(math.comb(n, k) for k in range(min(fixed, broken) + 1)) / 2**n if n else 1.0
    return PairedComparison(
        num_problems=len(candidate),
        candidate_accuracy=sum(map(bool, candidate)) / len(candidate),
        baseline_accuracy=sum(map(bool, baseline)) / len(baseline),
        fixed=fixed,
        broken=broken,
        p_value=min(1.0, 2 * tail),
    )


def evaluate_arithmetic(
    model: Any,
    tokenizer: Any,
    *,
    num_problems: int = 200,
    level: int = 1,
    seed: int = 0,
    max_new_tokens: int = 96,
    max_num_seqs: int = 64,
) -> EvalResult:
    """Greedy exact match and format rate on `num_problems` held-out problems of `level`."""
    from r1.engine.engine import TransformersEngine
    from r1.tasks.arithmetic import format_ok, generate_problems, is_correct

    if num_problems < 1:
        raise ValueError(f"num_problems={num_problems}; evaluate at least 1 problem")
    problems = generate_problems(num_problems, level=level, seed=seed, split="test")
    was_training = model.training
    model.eval()
    try:
        engine = TransformersEngine(model, tokenizer, EngineConfig(max_num_seqs=max_num_seqs))
        prompts = [[{"role": "user", "content": p.question}] for p in problems]
        with torch.inference_mode():
            completions = engine.generate_batch(prompts, SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens))
    finally:
        model.train(was_training)
    correct = tuple(bool(is_correct(c.text, p.answer)) for c, p in zip(completions, problems))
    formatted = sum(format_ok(c.text) for c in completions)
    return EvalResult(
        task="arithmetic",
        level=level,
        num_problems=num_problems,
        accuracy=sum(correct) / num_problems,
        format_rate=formatted / num_problems,
        mean_completion_tokens=sum(len(c.token_ids) for c in completions) / num_problems,
        correct=correct,
    )
