"""Exact-match evaluation on the arithmetic task's held-out split (`r1 eval`).

Greedy decoding with the r1 engine on the test split of one level; reports exact-match accuracy
(the answer after `</think>` equals the reference) and the format rate (R1 format respected).
This module does not evaluate other tasks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    correct = sum(is_correct(c.text, p.answer) for c, p in zip(completions, problems))
    formatted = sum(format_ok(c.text) for c in completions)
    return EvalResult(
        task="arithmetic",
        level=level,
        num_problems=num_problems,
        accuracy=correct / num_problems,
        format_rate=formatted / num_problems,
        mean_completion_tokens=sum(len(c.token_ids) for c in completions) / num_problems,
    )
