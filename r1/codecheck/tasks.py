"""A small set of function-writing tasks with tests: for the GRPO code reward and for tests.

Each task names the function, states it in one sentence, carries asserts comparing calls with
literals (so the harness judges them, see harness.py) and a reference solution that passes them.
Deliberately tiny: it exercises the pipeline, it does not measure a model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CodingTask:
    name: str
    function_name: str
    prompt: str
    tests: tuple[str, ...]
    solution: str

    def to_example(self) -> dict:
        """A dataset row: the prompt and the tests (the reward reads the `tests` column)."""
        return {"prompt": self.prompt, "tests": list(self.tests), "task": self.name}


CODING_TASKS: tuple[CodingTask, ...] = (
    CodingTask(
        "add", "add", "Write a function `add(a, b)` that returns the sum of two integers.",
        ("assert add(2, 3) == 5", "assert add(-4, 4) == 0", "assert add(0, 0) == 0"),
        "def add(a, b):\n    return a + b\n"),
    CodingTask(
        "is_palindrome", "is_palindrome",
        "Write a function `is_palindrome(s)` that returns True if the string reads the same backwards.",
        ("assert is_palindrome('racecar') is True", "assert is_palindrome('ab') is False",
         "assert is_palindrome('') is True"),
        "def is_palindrome(s):\n    return s == s[::-1]\n"),
    CodingTask(
        "factorial", "factorial", "Write a function `factorial(n)` that returns n! for n >= 0.",
        ("assert factorial(0) == 1", "assert factorial(5) == 120", "assert factorial(10) == 3628800"),
        "def factorial(n):\n    result = 1\n    for k in range(2, n + 1):\n        result *= k\n    return result\n"),
    CodingTask(
        "fibonacci", "fibonacci",
        "Write a function `fibonacci(n)` that returns the n-th Fibonacci number, with fibonacci(0) == 0.",
        ("assert fibonacci(0) == 0", "assert fibonacci(1) == 1", "assert fibonacci(10) == 55",
         "assert fibonacci(50) == 12586269025"),
        "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"),
    CodingTask(
        "count_vowels", "count_vowels",
        "Write a function `count_vowels(s)` that counts the vowels (a, e, i, o, u, any case) in a string.",
        ("assert count_vowels('hello') == 2", "assert count_vowels('AEIOU') == 5", "assert count_vowels('xyz') == 0"),
        "def count_vowels(s):\n    return sum(ch in 'aeiouAEIOU' for ch in s)\n"),
    CodingTask(
        "reverse_words", "reverse_words",
        "Write a function `reverse_words(s)` that reverses the order of the words in a sentence.",
        ("assert reverse_words('hello world') == 'world hello'", "assert reverse_words('a') == 'a'",
         "assert reverse_words('one two three') == 'three two one'"),
        "def reverse_words(s):\n    return ' '.join(reversed(s.split()))\n"),
    CodingTask(
        "is_prime", "is_prime", "Write a function `is_prime(n)` that returns True if n is a prime number.",
        ("assert is_prime(2) is True", "assert is_prime(1) is False", "assert is_prime(97) is True",
         "assert is_prime(91) is False"),
        "def is_prime(n):\n    if n < 2:\n        return False\n    k = 2\n    while k * k <= n:\n"
        "        if n % k == 0:\n            return False\n        k += 1\n    return True\n"),
    CodingTask(
        "second_largest", "second_largest",
        "Write a function `second_largest(xs)` that returns the second largest distinct value in a list, "
        "or None if there is none.",
        ("assert second_largest([1, 5, 3]) == 3", "assert second_largest([4, 4]) is None",
         "assert second_largest([-1, -2, -3]) == -2"),
        "def second_largest(xs):\n    values = sorted(set(xs))\n    return values[-2] if len(values) > 1 else None\n"),
    CodingTask(
        "flatten", "flatten", "Write a function `flatten(xs)` that flattens arbitrarily nested lists into one list.",
        ("assert flatten([1, [2, [3, 4]], 5]) == [1, 2, 3, 4, 5]", "assert flatten([]) == []",
         "assert flatten([[[]]]) == []"),
        "def flatten(xs):\n    out = []\n    for x in xs:\n        if isinstance(x, list):\n"
        "            out.extend(flatten(x))\n        else:\n            out.append(x)\n    return out\n"),
    CodingTask(
        "run_length", "run_length",
        "Write a function `run_length(s)` that returns the run-length encoding of a string as a list of "
        "(character, count) tuples.",
        ("assert run_length('aaabcc') == [('a', 3), ('b', 1), ('c', 2)]", "assert run_length('') == []",
         "assert run_length('x') == [('x', 1)]"),
        "def run_length(s):\n    out = []\n    for ch in s:\n        if out and out[-1][0] == ch:\n"
        "            out[-1] = (ch, out[-1][1] + 1)\n        else:\n            out.append((ch, 1))\n    return out\n"),
    CodingTask(
        "gcd", "gcd", "Write a function `gcd(a, b)` that returns the greatest common divisor of two non-negative integers.",
        ("assert gcd(12, 18) == 6", "assert gcd(7, 5) == 1", "assert gcd(0, 9) == 9"),
        "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a\n"),
)


def task_by_name(name: str) -> CodingTask:
    for task in CODING_TASKS:
        if task.name == name:
            return task
    raise ValueError(f"unknown coding task {name!r}; known: {', '.join(t.name for t in CODING_TASKS)}")


def task_dataset() -> list[dict]:
    """Every task as a dataset row ({"prompt", "tests", "task"})."""
    return [task.to_example() for task in CODING_TASKS]
