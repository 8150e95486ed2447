"""Tests for r1.tasks.arithmetic: generator determinism, splits, solution format and the checker."""

from __future__ import annotations

import json
import pickle
import re

import pytest

from r1.tasks.arithmetic import (
    Problem,
    extract_answer,
    format_ok,
    generate_problems,
    is_correct,
    to_chat_example,
)

_LINE = re.compile(r"^(\d+) ([-+*]) (\d+) = (\d+)$")


@pytest.mark.parametrize("level", [1, 2, 3])
def test_generation_is_deterministic_per_seed(level: int) -> None:
    first = generate_problems(50, level=level, seed=7)
    assert first == generate_problems(50, level=level, seed=7)
    # A different seed gives a different set (otherwise the seed would be ignored).
    assert first != generate_problems(50, level=level, seed=8)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_train_and_test_splits_are_disjoint(level: int) -> None:
    # Different seeds too: disjointness must come from construction, not from one shared stream.
    train = generate_problems(2000, level=level, seed=0, split="train")
    test = generate_problems(300, level=level, seed=1, split="test")
    assert len(test) == 300 and len({p.question for p in test}) == 300
    assert not {p.question for p in train} & {p.question for p in test}
    # The computation itself is held out, not only its wording.
    assert not {p.think for p in train} & {p.think for p in test}


@pytest.mark.parametrize("level", [1, 2, 3])
def test_solutions_are_correct_small_and_non_negative(level: int) -> None:
    for problem in generate_problems(500, level=level, seed=3):
        lines = problem.think.split("\n")
        assert len(lines) == (1 if level == 1 else 2)
        previous_result = None
        for index, line in enumerate(lines):
            left, operator, right, result = _LINE.match(line).groups()
            left, right, result = int(left), int(right), int(result)
            assert result == {"+": left + right, "-": left - right, "*": left * right}[operator]
            assert result >= 0
            if operator == "*":
                assert level == 3 and index == 0 and 2 <= left <= 9 and 2 <= right <= 12
            else:
                assert 1 <= right <= 99
            if previous_result is not None:
                assert left == previous_result  # each line continues from the last result
            previous_result = result
        if level in (1, 2):
            assert 1 <= int(lines[0].split()[0]) <= 99
            assert "*" not in problem.think
        else:
            assert "*" in lines[0]
        assert problem.answer == previous_result
        # The question names exactly the operands, in order, so it is solvable from its text.
        operands = [lines[0].split()[0]] + [line.split()[2] for line in lines]
        assert re.findall(r"\d+", problem.question) == operands
        assert problem.question.endswith("have now?") and len(problem.question) < 140


def test_completion_format_and_chat_example() -> None:
    problem = Problem(question="Mia has 23 apples. She buys 45 more. How many apples does she have now?",
                      think="23 + 45 = 68", answer=68, level=1)
    assert problem.completion == "23 + 45 = 68\n</think>\nThe answer is 68."
    example = to_chat_example(problem)
    assert example == {
        "messages": [
            {"role": "user", "content": problem.question},
            {"role": "assistant", "content": "<think>\n23 + 45 = 68\n</think>\nThe answer is 68."},
        ]
    }
    assert json.loads(json.dumps(example)) == example  # one JSONL line
    assert pickle.loads(pickle.dumps(problem)) == problem  # crosses process boundaries


@pytest.mark.parametrize("level", [1, 2, 3])
def test_generated_completions_pass_their_own_checker(level: int) -> None:
    for problem in generate_problems(100, level=level, seed=5):
        assert format_ok(problem.completion)
        assert is_correct(problem.completion, problem.answer)
        assert not is_correct(problem.completion, problem.answer + 1)
        # With the opener written out (as in the SFT record) it is the same answer.
        assert extract_answer("<think>\n" + problem.completion) == problem.answer


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # Unknown level names the allowed ones.
        ({"level": 4, "seed": 0}, "level=4"),
        # A typo in the split must not silently produce training data.
        ({"level": 1, "seed": 0, "split": "val"}, "split='val'"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        generate_problems(3, **kwargs)


def test_negative_count_raises() -> None:
    # A negative count is a caller mistake, not an empty list.
    with pytest.raises(ValueError, match="num_problems=-1"):
        generate_problems(-1, level=1, seed=0)


# (completion, expected extract_answer, expected format_ok)
CHECKER_CASES = [
    # The trained format.
    ("23 + 45 = 68\n</think>\nThe answer is 68.", 68, True),
    # Wrong answer still extracts (is_correct decides).
    ("23 + 45 = 67\n</think>\nThe answer is 67.", 67, True),
    # Explicit opener at the start is allowed.
    ("<think>\n23 + 45 = 68\n</think>\nThe answer is 68.", 68, True),
    # Boxed answer, DeepSeek-R1 style.
    ("so 68\n</think>\n**Final Answer**\n\\boxed{68}", 68, True),
    # Boxed wins over other numbers after it.
    ("x\n</think>\n\\boxed{12} because 5 + 7 is 12 and 3 cats", 12, True),
    # "answer is" wins over a later number.
    ("x\n</think>\nThe answer is 56, from 2 steps.", 56, True),
    # No "answer is" or box: the last number of the content.
    ("x\n</think>\nMia has 56 apples", 56, True),
    # Negative answers parse as negative (and are then simply wrong for this task).
    ("x\n</think>\nThe answer is -5.", -5, True),
    # A binary minus is not a sign: "10-3" ends in 3, not -3.
    ("x\n</think>\nIt is 10-3", 3, True),
    # Thousands separators.
    ("x\n</think>\nThe answer is 1,234.", 1234, True),
    # A whole number written as a decimal.
    ("x\n</think>\nThe answer is 68.0", 68, True),
    # A non-integer answer is not an integer answer.
    ("x\n</think>\nThe answer is 6.5", None, True),
    # Content without any number: no answer, but the format is fine.
    ("x\n</think>\nI do not know.", None, True),
    # Answer only inside the reasoning (never closed): no answer, bad format.
    ("23 + 45 = 68\nThe answer is 68.", None, False),
    # Closed reasoning with nothing after it: no answer, bad format.
    ("23 + 45 = 68\n</think>\n  \n", None, False),
    # Empty reasoning: the answer counts, but the format needs reasoning.
    ("</think>\nThe answer is 68.", 68, False),
    # A second </think> breaks the format (answer read from the content after the first).
    ("a\n</think>\nb\n</think>\nThe answer is 68.", 68, False),
    # A nested <think> inside the reasoning breaks the format.
    ("a <think> b\n</think>\nThe answer is 68.", 68, False),
    # Empty completion.
    ("", None, False),
    # The answer in the reasoning does not leak into the content's fallback.
    ("The answer is 68\n</think>\nno idea", None, True),
]


@pytest.mark.parametrize(("completion", "expected_answer", "expected_format"), CHECKER_CASES)
def test_checker_table(completion: str, expected_answer: int | None, expected_format: bool) -> None:
    assert extract_answer(completion) == expected_answer
    assert format_ok(completion) is expected_format
    if expected_answer is None:
        assert not is_correct(completion, 0) and not is_correct(completion, 68)
    else:
        assert is_correct(completion, expected_answer)
        assert not is_correct(completion, expected_answer + 1)
