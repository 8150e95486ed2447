"""Arithmetic word problems with step-by-step `<think>` solutions, and their checker.

The task trains, evaluates and rewards the embedded tiny model (SFT, then GRPO) on CPU, so texts are
short and regular, numbers small and every result (also every intermediate one) non-negative:

- level 1: two operands 1-99, one `+` or `-`;
- level 2: three operands 1-99, two operations from `+`/`-`;
- level 3: a small product (2-9 boxes of 2-12 objects) then one `+`/`-` with an operand 1-99.

A solution has one line per operation (`"23 + 45 = 68\\n68 - 12 = 56"`); `Problem.completion` is
what the model writes after the chat template's pre-filled `"<think>\\n"`.

Train and test splits are disjoint by construction: a hash of the solution lines (the computation,
not only the wording) decides the split, so no test computation appears in training with other names.

The checker reads the answer from the content after `</think>` only; it does not judge the
reasoning itself, and a completion that never closes its reasoning has no answer.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Any, Literal

from r1.reasoning import THINK_CLOSE, THINK_OPEN, split_reasoning

LEVELS = (1, 2, 3)
# Share of computations that go to the test split (by hash, so stable across runs and seeds).
TEST_SHARE_PERCENT = 10

# (name, subject pronoun)
_PEOPLE = (
    ("Mia", "she"), ("Leo", "he"), ("Sara", "she"), ("Tom", "he"),
    ("Ana", "she"), ("Ben", "he"), ("Lily", "she"), ("Max", "he"),
)
_OBJECTS = ("apples", "books", "coins", "pens", "cards", "stickers", "marbles", "cookies")
# Sentence tails after the pronoun; {n} is the operand.
_ADD_PHRASES = ("buys {n} more", "finds {n} more", "gets {n} more")
_SUB_PHRASES = ("gives away {n}", "loses {n}", "sells {n}")

_ANSWER_IS = re.compile(r"answer is\s*:?\s*\$?\s*(?:\\boxed\{)?\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{\s*(-?\d[\d,]*(?:\.\d+)?)\s*\}")
# A minus sign counts only where it cannot be a binary minus ("10-3" is 10 and 3).
_NUMBER = re.compile(r"(?:(?<![\w)\]])-)?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class Problem:
    """One word problem; plain data, picklable."""

    question: str
    think: str  # one "a op b = c" line per operation, no trailing newline
    answer: int
    level: int

    @property
    def completion(self) -> str:
        """The assistant text after the pre-filled "<think>\\n": reasoning, close tag, answer."""
        return f"{self.think}\n{THINK_CLOSE}\nThe answer is {self.answer}."


def _split_of(think: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(think.encode()).digest()[:4], "big") % 100
    return "test" if bucket < TEST_SHARE_PERCENT else "train"


def _step(rng: random.Random, total: int) -> tuple[str, int]:
    """One +/- step on `total` that keeps the result non-negative: (operator, operand)."""
    if total >= 1 and rng.random() < 0.5:
        return "-", rng.randint(1, min(99, total))
    return "+", rng.randint(1, 99)


def _sentence(pronoun: str, operator: str, operand: int, rng: random.Random) -> str:
    phrases = _ADD_PHRASES if operator == "+" else _SUB_PHRASES
    return f"{pronoun.capitalize()} {rng.choice(phrases).format(n=operand)}."


def _sample_problem(rng: random.Random, level: int) -> Problem:
    name, pronoun = rng.choice(_PEOPLE)
    objects = rng.choice(_OBJECTS)
    sentences: list[str] = []
    lines: list[str] = []
    if level == 3:
        num_boxes, per_box = rng.randint(2, 9), rng.randint(2, 12)
        total = num_boxes * per_box
        sentences.append(f"{name} has {num_boxes} boxes of {per_box} {objects}.")
        lines.append(f"{num_boxes} * {per_box} = {total}")
        num_steps = 1
    else:
        total = rng.randint(1, 99)
        sentences.append(f"{name} has {total} {objects}.")
        num_steps = level
    for _ in range(num_steps):
        operator, operand = _step(rng, total)
        result = total + operand if operator == "+" else total - operand
        sentences.append(_sentence(pronoun, operator, operand, rng))
        lines.append(f"{total} {operator} {operand} = {result}")
        total = result
    assert total >= 0
    sentences.append(f"How many {objects} does {pronoun} have now?")
    return Problem(question=" ".join(sentences), think="\n".join(lines), answer=total, level=level)


def generate_problems(
    num_problems: int, *, level: int, seed: int, split: Literal["train", "test"] = "train"
) -> list[Problem]:
    """`num_problems` distinct problems of one level and split; the same arguments give the same list."""
    if level not in LEVELS:
        raise ValueError(f"level={level!r} is not a known level; use one of {LEVELS}")
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is not a split; use 'train' or 'test'")
    if num_problems < 0:
        raise ValueError(f"num_problems={num_problems} is negative; use 0 or more")
    rng = random.Random(f"arithmetic:{level}:{seed}:{split}")
    problems: list[Problem] = []
    seen: set[str] = set()
    max_attempts = 200 * num_problems + 1000
    for _ in range(max_attempts):
        if len(problems) == num_problems:
            return problems
        problem = _sample_problem(rng, level)
        if problem.question in seen or _split_of(problem.think) != split:
            continue
        seen.add(problem.question)
        problems.append(problem)
    if len(problems) == num_problems:
        return problems
    raise ValueError(
        f"could only find {len(problems)} distinct level-{level} {split} problems, "
        f"not num_problems={num_problems}; ask for fewer"
    )


def _parse_int(number: str) -> int | None:
    """'1,234' -> 1234, '68.0' -> 68, '68.5' -> None (not an integer answer)."""
    number = number.replace(",", "")
    if "." in number:
        whole, fraction = number.split(".", 1)
        if fraction.strip("0"):
            return None
        number = whole
    return int(number)


def extract_answer(completion: str) -> int | None:
    """The final integer answer in the content after `</think>`, or None.

    Looks, in order, for the last `\\boxed{N}`, the last "answer is N", then the last number in the
    content. Numbers inside the reasoning never count: a completion without `</think>` (the
    template pre-fills `<think>`) has no answer.
    """
    _, content = split_reasoning(completion, think_prefilled=True)
    for pattern in (_BOXED, _ANSWER_IS, _NUMBER):
        matches = pattern.findall(content)
        if matches:
            return _parse_int(matches[-1])
    return None


def is_correct(completion: str, answer: int) -> bool:
    """Whether the completion's final answer equals `answer`."""
    extracted = extract_answer(completion)
    return extracted is not None and extracted == answer


def format_ok(completion: str) -> bool:
    """R1 format: non-empty reasoning, one `</think>`, then a non-empty answer.

    The opening `<think>` may be absent (the template pre-fills it) or present once at the start;
    any other think tag (a second `</think>`, a nested `<think>`) breaks the format.
    """
    reasoning, content = split_reasoning(completion, think_prefilled=True)
    if not reasoning.strip() or not content.strip():
        return False
    return not any(tag in part for tag in (THINK_OPEN, THINK_CLOSE) for part in (reasoning, content))


def to_chat_example(problem: Problem) -> dict[str, Any]:
    """An SFT record: `{"messages": [user question, assistant "<think>\\n...</think>\\nThe answer is N."]}`."""
    return {
        "messages": [
            {"role": "user", "content": problem.question},
            {"role": "assistant", "content": f"{THINK_OPEN}\n{problem.completion}"},
        ]
    }
