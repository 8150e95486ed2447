"""Prompts for code generation: a few-shot example of the expected code structure (the guide's
"example-guided" prompting), the repair prompt that feeds errors back, and the test-writing prompt.

Only text is built here; nothing calls a model.
"""

from __future__ import annotations

from r1.codecheck.validate import Validation

# One worked example showing the structure we want back: a fenced block, one typed function with
# a docstring and a doctest, edge cases handled, no I/O.
FEW_SHOT_TASK = "Write a function `count_words(text)` that returns how many words the string contains."
FEW_SHOT_ANSWER = '''```python
def count_words(text: str) -> int:
    """Return the number of whitespace-separated words in `text`.

    >>> count_words("hello big world")
    3
    """
    if not text:
        return 0
    return len(text.split())
```'''

CODE_INSTRUCTIONS = (
    "Answer with one ```python fenced block that defines the requested function. Use only the standard "
    "library, do not read input or print, and handle edge cases."
)
MAX_FEEDBACK_ERRORS = 5
MAX_ERROR_CHARS = 400


def build_code_prompt(task: str) -> str:
    """The first-attempt prompt: instructions, one worked example, then the task."""
    return (f"{CODE_INSTRUCTIONS}\n\n"
            f"Task: {FEW_SHOT_TASK}\n{FEW_SHOT_ANSWER}\n\n"
            f"Task: {task.strip()}\n")


def _feedback(validation: Validation) -> str:
    if validation.status == "syntax_error" and validation.syntax is not None:
        issue = validation.syntax
        return (f"The code does not compile: {issue.message} at line {issue.line}, column {issue.column}:\n"
                f"    {issue.text.rstrip()}\nFix the syntax; keep the rest of the function.")
    lines = [f"The code {validation.status.replace('_', ' ')} "
             f"({validation.tests_passed}/{validation.tests_total} tests passed):"]
    for error in validation.errors[:MAX_FEEDBACK_ERRORS]:
        lines.append(f"- {error[:MAX_ERROR_CHARS]}")
    if validation.status == "timeout":
        lines.append("It ran out of time: look for infinite loops or exponential work.")
    return "\n".join(lines)


def build_repair_prompt(task: str, previous_code: str, validation: Validation) -> str:
    """A repair prompt: the task, the previous attempt and what went wrong with it."""
    return (f"{CODE_INSTRUCTIONS}\n\n"
            f"Task: {task.strip()}\n\n"
            f"Previous attempt:\n```python\n{previous_code.rstrip()}\n```\n\n"
            f"{_feedback(validation)}\n\n"
            "Write the corrected function.\n")


def build_test_prompt(task: str, signature: str, num_tests: int) -> str:
    """Ask for `num_tests` assert statements exercising the function (the auto-generated tests)."""
    return ("Write unit tests as plain `assert` statements, one per line, comparing a call with its "
            "exact expected value. Cover normal cases and edge cases.\n\n"
            "Task: Write a function `square(x)` that returns x squared.\n"
            "Function: def square(x)\n"
            "```python\nassert square(3) == 9\nassert square(0) == 0\nassert square(-2) == 4\n```\n\n"
            f"Task: {task.strip()}\nFunction: {signature}\n"
            f"Write {num_tests} asserts.\n")
