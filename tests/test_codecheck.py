"""r1.codecheck: extraction, syntax, test parsing and judging, validation in the sandbox (honest
and hostile solutions), the repair loop (scripted and with the real r1-tiny), the GRPO reward and
the coding task set.
"""

from __future__ import annotations

import json
import pickle
import re
import sys

import pytest
import torch

from r1.codecheck import (
    CODING_TASKS,
    CodeTestReward,
    Sandbox,
    Validation,
    check_syntax,
    doctest_specs,
    extract_code,
    parse_generated_tests,
    parse_tests,
    solve_with_repair,
    validate,
    validate_request,
)
from r1.codecheck.harness import judge
from r1.config import CodeCheckConfig, CodeValidatorConfig

ADD = "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    # Generous limit: a loaded CI machine must not turn a passing run into a timeout.
    return Sandbox(CodeCheckConfig(timeout_s=20.0, memory_mb=256, max_processes=16))


# -- stage 0: extraction --------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    # A python-tagged fence: its body, without the fence.
    ("Here:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1"),
    # Code inside <think> is a draft; the answer after it wins.
    ("<think>\n```python\ndef f(): return 0\n```\n</think>\n```python\ndef f():\n    return 2\n```", "def f():\n    return 2"),
    # Several blocks: the last one that parses.
    ("```python\ndef f(): return 1\n```\nbetter:\n```python\ndef f(:\n```", "def f(): return 1"),
    # A usage example (or tests) in a last block of its own: the block that defines the function.
    ("```python\ndef add(a, b):\n    return a + b\n```\nExample:\n```python\nprint(add(2, 3))\n```",
     "def add(a, b):\n    return a + b"),
    # A draft, then a fixed version: the fix, without the draft's definition.
    ("```python\ndef f(): return 0\n```\nfixed:\n```python\ndef f(): return 1\n```", "def f(): return 1"),
    # A helper in a block of its own: its definition (and imports) come along; its example does not.
    ("```python\nimport math\ndef helper(x):\n    return math.sqrt(x)\nprint(helper(4))\n```\n"
     "```python\ndef f(x):\n    return helper(x) + 1\n```",
     "import math\n\ndef helper(x):\n    return math.sqrt(x)\n\ndef f(x):\n    return helper(x) + 1"),
    # A fence inside a list item is indented: the indentation goes.
    ("1. Code:\n   ```python\n   def f():\n       return 1\n   ```\n2. Done", "def f():\n    return 1"),
    # A closing fence at the end of the last code line.
    ("```python\ndef f(): return 1```\nThat is all.", "def f(): return 1"),
    # Non-Python fences are ignored.
    ("```bash\npip install x\n```\n```py\nx = 1\n```", "x = 1"),
    # Bare code after prose, with trailing prose dropped.
    ("Sure, here it is:\ndef f(x):\n    return x * 2\nThis doubles x.", "def f(x):\n    return x * 2"),
    # An unterminated fence (generation cut off) still yields its body.
    ("```python\ndef f():\n    return 3\n", "def f():\n    return 3"),
])
def test_extract_code(text: str, expected: str) -> None:
    assert extract_code(text) == expected


# -- stage 1: syntax ------------------------------------------------------------------------------

@pytest.mark.parametrize("code, line, column, fragment", [
    # Missing colon: the parser points at the end of the def line.
    ("def add(a, b)\n    return a + b\n", 1, 14, "expected ':'"),
    # Bad indentation on line 3.
    ("def f():\n    x = 1\n      y = 2\n", 3, 6, "unexpected indent"),
    # Unclosed bracket.
    ("x = [1, 2\n", 1, 5, "never closed"),
    # Parses, but the compiler rejects it: `return` outside a function.
    ("return 5\n", 1, 1, "outside function"),
])
def test_syntax_errors_have_line_and_column(code: str, line: int, column: int, fragment: str) -> None:
    issue = check_syntax(code)
    assert issue is not None and (issue.line, issue.column) == (line, column)
    assert fragment in issue.message


def test_valid_code_has_no_syntax_issue() -> None:
    assert check_syntax(ADD) is None
    # Null bytes are reported, not raised.
    assert check_syntax("x = 1\x00") is not None


# -- stage 2: test parsing and judging ------------------------------------------------------------

@pytest.mark.parametrize("tests, names, judged_by", [
    # A list: one test per item; literal comparisons are judged by the harness.
    (["assert add(1, 2) == 3", "assert add(0, 0) == 0"], ["assert add(1, 2) == 3", "assert add(0, 0) == 0"],
     ["harness", "harness"]),
    # One string with several asserts: one test each, setup statements shared.
    ("x = add(1, 1)\nassert x == 2\nassert add(2, 2) >= 4", ["assert x == 2", "assert add(2, 2) >= 4"],
     ["harness", "harness"]),
    # Literal on the left is mirrored; `in` keeps the literal where it is.
    (["assert 3 == add(1, 2)", "assert 3 in [add(1, 2)]"], ["assert 3 == add(1, 2)", "assert 3 in [add(1, 2)]"],
     ["harness", "harness"]),
    # Non-literal comparisons and bare truth asserts run inside the sandbox.
    (["assert add(1, 2) == add(2, 1)", "assert add(1, 2)"], ["assert add(1, 2) == add(2, 1)", "assert add(1, 2)"],
     ["sandbox", "sandbox"]),
    # pytest-style: one test per test_* function.
    ("def test_a():\n    assert add(1, 1) == 2\n\ndef test_b():\n    assert add(2, 2) == 4\n", ["test_a", "test_b"],
     ["harness", "harness"]),
    # A raise-based check inside a test function is decided in the sandbox.
    ("def test_c():\n    if add(1, 1) != 2:\n        raise AssertionError\n", ["test_c"], ["sandbox"]),
    # `is` with a non-singleton literal stays an ordinary assert.
    (["assert add(1, 2) is 3"], ["assert add(1, 2) is 3"], ["sandbox"]),
])
def test_parse_tests(tests, names, judged_by) -> None:
    specs = parse_tests(tests)
    assert [spec.name for spec in specs] == names
    assert [spec.judged_by for spec in specs] == judged_by


def test_expected_values_never_enter_the_sandbox() -> None:
    (spec,) = parse_tests(["assert add(20, 22) == 424242"])
    assert "424242" not in json.dumps(spec.request())


@pytest.mark.parametrize("tests, message", [
    # Not Python: the error names the item and the line.
    (["assert add(1, 2) == 3", "assert add(1,"], "tests[1] is not valid Python"),
    # Empty item.
    (["  "], "tests[0] is empty"),
    # Wrong type.
    ([1, 2], "tests must be a string or a list of strings"),
    # Fixtures are not supported.
    ("def test_x(tmp_path):\n    pass\n", "pytest fixtures are not supported"),
])
def test_bad_tests_raise_value_error(tests, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_tests(tests)


SPECS = parse_tests(["assert add(1, 2) == 3", "assert add(2, 2) == 4"])


def _lines(*messages: dict) -> bytes:
    return "".join(json.dumps(m) + "\n" for m in messages).encode()


@pytest.mark.parametrize("channel, passed, violation", [
    # The honest sequence: load, then a value and an end per test.
    (_lines({"load": True}, {"t": 0, "c": 0, "v": "3"}, {"t": 0, "ok": True}, {"t": 1, "c": 0, "v": "4"},
            {"t": 1, "ok": True}), [True, True], ""),
    # A wrong value fails only its test.
    (_lines({"load": True}, {"t": 0, "c": 0, "v": "5"}, {"t": 0, "ok": True}, {"t": 1, "c": 0, "v": "4"},
            {"t": 1, "ok": True}), [False, True], ""),
    # "ok" without the value the harness asked for is not a pass.
    (_lines({"load": True}, {"t": 0, "ok": True}, {"t": 1, "c": 0, "v": "4"}, {"t": 1, "ok": True}),
     [False, True], ""),
    # A forged second end for a test breaks the protocol: nothing counts.
    (_lines({"load": True}, {"t": 0, "c": 0, "v": "3"}, {"t": 0, "ok": True}, {"t": 0, "ok": True}),
     [False, False], "out of order"),
    # Messages before the load report are forged.
    (_lines({"t": 0, "ok": True}, {"load": True}), [False, False], "before the load report"),
    # Garbage on the channel.
    (b"PASSED\n", [False, False], "not JSON"),
    # A value that is not plain data (the runner never sends one).
    (_lines({"load": True}, {"t": 0, "c": 0, "v": "__import__('os')"}, {"t": 0, "ok": True}), [False, False], ""),
    # Nothing at all: the program died before loading.
    (b"", [False, False], ""),
])
def test_judge(channel: bytes, passed: list[bool], violation: str) -> None:
    judgement = judge(SPECS, channel)
    assert [result.passed for result in judgement.results] == passed
    assert violation in judgement.violation


def test_doctest_examples_become_tests() -> None:
    code = ('def add(a, b):\n    """\n    >>> x = 2\n    >>> add(x, 3)\n    5\n    >>> print(add(1, 1), "apples")\n'
            '    2 apples\n    >>> add\n    <function add>\n    """\n    return a + b\n')
    specs, notes = doctest_specs(code)
    assert [spec.origin for spec in specs] == ["doctest", "doctest"]
    assert "add(x, 3)" in specs[0].name and specs[0].judged_by == "harness"
    # print shows str() of its arguments: the printed text is compared with them, judged by the harness
    assert "print(add(1, 1)" in specs[1].name and specs[1].judged_by == "harness"
    assert list(specs[1].checks.values())[0].expected == "2 apples"
    assert len(notes) == 1 and "not a literal" in notes[0]  # `add` shows a repr that is not a literal


def test_doctests_with_print_pass_and_fail_like_doctest(sandbox: Sandbox) -> None:
    right = 'def add(a, b):\n    """\n    >>> print(add(1, 2))\n    3\n    """\n    return a + b\n'
    assert validate(right, sandbox=sandbox).status == "passed"
    wrong = right.replace("a + b", "a - b")
    failed = validate(wrong, sandbox=sandbox)
    assert (failed.status, failed.tests_passed) == ("failed", 0) and "got '-1'" in failed.errors[0]


# -- stage 2: validation in the sandbox -----------------------------------------------------------

@pytest.mark.parametrize("code, tests, status, passed, total", [
    # Correct code.
    (ADD, ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"], "passed", 2, 2),
    # Wrong code: each failing test is counted.
    ("def add(a, b):\n    return a - b\n", ["assert add(2, 3) == 5", "assert add(0, 0) == 0"], "failed", 1, 2),
    # Syntax error: stage 1 stops it, nothing runs.
    ("def add(a, b)\n    return a + b\n", ["assert add(1, 2) == 3"], "syntax_error", 0, 0),
    # Import-time exception: a load error.
    ("import not_a_module\n" + ADD, ["assert add(1, 2) == 3"], "error", 0, 1),
    # A hanging function: the run times out, the test is not counted.
    ("def add(a, b):\n    while True:\n        pass\n", ["assert add(1, 2) == 3"], "timeout", 0, 1),
    # No tests and no doctests: an error that says so.
    (ADD, None, "error", 0, 0),
    # Doctests alone are tests.
    ('def add(a, b):\n    """\n    >>> add(2, 2)\n    4\n    """\n    return a + b\n', None, "passed", 1, 1),
    # pytest-style functions with a module-level helper.
    (ADD, "def _twice(x):\n    return add(x, x)\n\ndef test_twice():\n    assert _twice(3) == 6\n", "passed", 1, 1),
    # Plain values compare by value: floats, tuples, sets, None, nan handled.
    ("def f():\n    return (0.5, {1, 2}, None, float('nan'))\n",
     ["assert f()[0] == 0.5", "assert f()[1] == {2, 1}", "assert f()[2] is None", "assert f()[3] != 0.0"], "passed", 4, 4),
])
def test_validate(code, tests, status: str, passed: int, total: int, sandbox: Sandbox) -> None:
    timeout_s = 2.0 if status == "timeout" else None
    validation = validate(code, tests, sandbox=sandbox, timeout_s=timeout_s)
    assert (validation.status, validation.tests_passed, validation.tests_total) == (status, passed, total), \
        validation.errors
    if status != "passed":
        assert validation.errors


def test_failure_message_shows_the_actual_value(sandbox: Sandbox) -> None:
    validation = validate("def add(a, b):\n    return a * b\n", ["assert add(2, 5) == 7"], sandbox=sandbox)
    assert validation.errors == ("test assert add(2, 5) == 7: assert add(2, 5) == 7: got 10",)


HOSTILE_SOLUTIONS = [
    # Exits 0 at import, before any test: exit codes never mean "passed".
    "import os\nprint('all tests passed', flush=True)\nos._exit(0)\n",
    # sys.exit(0) at import is a load failure, not a pass.
    "import sys\nsys.exit(0)\n",
    # Exits inside the function under test.
    "import sys\ndef add(a, b):\n    sys.exit(0)\n",
    # An object equal to everything.
    "class Any:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Any()\n",
    # An int subclass equal to everything: only its plain value is compared.
    "class Sly(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
    "def add(a, b):\n    return Sly(0)\n",
    # Writes fake results to every fd it can find, then returns garbage.
    "import json, os\ndef add(a, b):\n    for fd in range(3, 64):\n        try:\n"
    "            os.write(fd, (json.dumps({'t': 0, 'ok': True}) + '\\n').encode())\n        except OSError:\n"
    "            pass\n    return 0\n",
    # Guesses values into the channel for the harness-judged check: it still has to know them.
    "import json, os\ndef add(a, b):\n    for fd in range(3, 64):\n        try:\n"
    "            os.write(fd, (json.dumps({'t': 0, 'c': 0, 'v': '0'}) + '\\n').encode())\n        except OSError:\n"
    "            pass\n    return 0\n",
    # Silences the runner: without its messages nothing can pass.
    "import os\nos.write = lambda fd, data: len(data)\ndef add(a, b):\n    return 0\n",
    # Fork bomb inside the function under test.
    "import os\ndef add(a, b):\n    while True:\n        try:\n            os.fork()\n        except OSError:\n"
    "            pass\n",
    # Kills every process it can reach from inside the test.
    "import os, signal\ndef add(a, b):\n    for pid in range(1, 200):\n        try:\n"
    "            os.kill(pid, signal.SIGKILL)\n        except OSError:\n            pass\n    return 0\n",
]


@pytest.mark.parametrize("code", HOSTILE_SOLUTIONS, ids=range(len(HOSTILE_SOLUTIONS)))
def test_hostile_solution_never_passes(code: str, sandbox: Sandbox) -> None:
    validation = validate(code, ["assert add(1, 2) == 3"], sandbox=sandbox, timeout_s=3.0)
    assert validation.status != "passed" and validation.tests_passed == 0
    assert validation.errors
    # The sandbox is still usable afterwards.
    assert validate(ADD, ["assert add(1, 2) == 3"], sandbox=sandbox).status == "passed"


@pytest.mark.parametrize("code, tests, timeout_s, fragment", [
    # Code must be text.
    (123, None, None, "code must be a string"),
    # A request cannot raise the configured time limit.
    (ADD, ["assert add(1, 2) == 3"], 1e6, "timeout_s=1000000.0"),
    # A test that is not Python names the item.
    (ADD, ["assert add(1,"], None, "tests[0] is not valid Python"),
])
def test_validate_request_reports_bad_requests(code, tests, timeout_s, fragment: str, sandbox: Sandbox) -> None:
    validation = validate_request(code, tests, timeout_s=timeout_s, sandbox=sandbox)
    assert (validation.status, validation.stage) == ("error", "request")
    assert fragment in validation.errors[0]


def test_validation_round_trips_as_plain_data(sandbox: Sandbox) -> None:
    validation = validate("def add(a, b):\n    return 0\n", ["assert add(1, 2) == 3"], sandbox=sandbox)
    data = validation.to_dict()
    assert json.loads(json.dumps(data)) == data
    again = Validation.from_dict(data)
    assert (again.status, again.tests_passed, again.errors, again.tests) == (
        validation.status, validation.tests_passed, validation.errors, validation.tests)
    assert data["isolation"]["level"] == validation.run.isolation.level


# -- stage 2: generated tests ---------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    # Asserts in a fence; the one not calling the function is dropped.
    ("```python\nassert add(1, 2) == 3\nassert True\nassert add(0, 0) == 0\n```", ["assert add(1, 2) == 3",
                                                                                 "assert add(0, 0) == 0"]),
    # A broken line does not cost the good ones; duplicates are removed.
    ("assert add(1, 1) == 2\nassert add(1, == 3\nassert add(1, 1) == 2\nassert add(2, 2) == 4",
     ["assert add(1, 1) == 2", "assert add(2, 2) == 4"]),
    # Nothing usable.
    ("I cannot write tests.", []),
])
def test_parse_generated_tests(text: str, expected: list[str]) -> None:
    assert parse_generated_tests(text, "add", max_tests=5) == expected


# -- stage 3: the repair loop ---------------------------------------------------------------------

class Scripted:
    """A `generate` callable that answers from a script and records every call."""

    def __init__(self, answers: list[str], tests_answer: str = "") -> None:
        self.answers = list(answers)
        self.tests_answer = tests_answer
        self.calls: list[tuple[str, float]] = []

    def __call__(self, prompt: str, *, temperature: float) -> str:
        self.calls.append((prompt, temperature))
        if prompt.startswith("Write unit tests"):
            return self.tests_answer
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


BROKEN = "```python\ndef add(a, b)\n    return a + b\n```"
FIXED = "```python\ndef add(a, b):\n    return a + b\n```"
WRONG = "```python\ndef add(a, b):\n    return a - b\n```"
TASK = "Write a function `add(a, b)` that returns the sum of two integers."


def test_repair_fixes_a_broken_first_attempt(sandbox: Sandbox) -> None:
    generate = Scripted([BROKEN, FIXED])
    config = CodeCheckConfig(max_repairs=2, repair_temperature=0.2, timeout_s=20.0)
    outcome = solve_with_repair(TASK, generate, tests=["assert add(2, 3) == 5"], config=config, temperature=0.8,
                                validator=lambda code, tests: validate(code, tests, sandbox=sandbox))
    assert outcome.status == "passed" and len(outcome.attempts) == 2
    assert [a.validation.status for a in outcome.attempts] == ["syntax_error", "passed"]
    # The repair prompt carries the error with its position, and samples cooler.
    repair_prompt, repair_temperature = generate.calls[1]
    assert "expected ':' at line 1, column 14" in repair_prompt and "def add(a, b)" in repair_prompt
    assert (generate.calls[0][1], repair_temperature) == (0.8, 0.2)
    assert outcome.to_dict()["attempts"] == 2


def test_repair_stops_at_max_repairs_and_records_every_attempt(sandbox: Sandbox) -> None:
    generate = Scripted([BROKEN, WRONG])
    outcome = solve_with_repair(TASK, generate, tests=["assert add(2, 3) == 5"], max_repairs=3,
                                validator=lambda code, tests: validate(code, tests, sandbox=sandbox))
    assert len(outcome.attempts) == 4 and len(generate.calls) == 4
    assert [a.validation.status for a in outcome.attempts] == ["syntax_error", "failed", "failed", "failed"]
    assert all(a.validation.errors for a in outcome.attempts)
    report = outcome.to_dict()
    assert report["status"] == "failed" and [e["attempt"] for e in report["errors"]] == [1, 2, 3, 4]
    assert "got -1" in report["errors"][1]["errors"][0]


def test_repair_does_not_retry_sandbox_failures() -> None:
    generate = Scripted([FIXED])
    broken_sandbox = Validation("error", 0, 1, ("sandbox: sandbox failed to start",), "sandbox")
    outcome = solve_with_repair(TASK, generate, tests=["assert add(1, 2) == 3"], max_repairs=3,
                                validator=lambda code, tests: broken_sandbox)
    assert len(outcome.attempts) == 1 and outcome.status == "error"


def test_repair_does_not_retry_a_malformed_request() -> None:
    generate = Scripted([FIXED])
    malformed = Validation("error", 0, 0, ("request: tests[0] is empty; remove it or write an assert",), "request")
    outcome = solve_with_repair(TASK, generate, tests=[""], max_repairs=3, validator=lambda code, tests: malformed)
    assert len(outcome.attempts) == 1 and len(generate.calls) == 1


def test_repair_stops_starting_work_once_asked_to() -> None:
    from r1.codecheck.repair import RepairCancelled

    stop = []
    validations = []

    def validator(code, tests):  # the client goes away during the first validation
        validations.append(code)
        stop.append(True)
        return Validation("failed", 0, 1, ("tests: assert failed",), "tests")

    generate = Scripted([WRONG])
    with pytest.raises(RepairCancelled):
        solve_with_repair(TASK, generate, tests=["assert add(2, 3) == 5"], max_repairs=5, validator=validator,
                          should_stop=lambda: bool(stop))
    assert len(generate.calls) == 1 and len(validations) == 1  # no repair round started after it


def test_repair_generates_tests_when_none_are_given(sandbox: Sandbox) -> None:
    generate = Scripted([FIXED], tests_answer="```python\nassert add(2, 2) == 4\nassert add(-1, 1) == 0\n```")
    outcome = solve_with_repair(TASK, generate, validator=lambda code, tests: validate(code, tests, sandbox=sandbox))
    assert outcome.tests_origin == "generated" and outcome.tests == ("assert add(2, 2) == 4", "assert add(-1, 1) == 0")
    assert outcome.status == "passed" and outcome.validation.tests_total == 2


@pytest.fixture(scope="module")
def tiny_generate(tiny):
    """`generate` backed by the shipped r1-tiny (greedy at temperature 0)."""
    model, tokenizer = tiny
    max_new_tokens = 24
    limit = model.config.max_position_embeddings - max_new_tokens
    prompts: list[str] = []

    def generate(prompt: str, *, temperature: float) -> str:
        prompts.append(prompt)
        ids = tokenizer(prompt, return_tensors="pt").input_ids[:, -limit:]
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        torch.manual_seed(0)
        # One intra-op thread: on a busy 2-core machine two spinning threads make this ~50x slower.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                     **sampling)
        finally:
            torch.set_num_threads(threads)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    generate.prompts = prompts
    return generate


def test_repair_loop_with_r1_tiny(tiny_generate, sandbox: Sandbox) -> None:
    calls = []

    def generate(prompt: str, *, temperature: float) -> str:
        calls.append(temperature)
        if len(calls) == 1:
            return BROKEN  # a deliberately broken first attempt
        return tiny_generate(prompt, temperature=temperature)

    config = CodeCheckConfig(max_repairs=2, repair_temperature=0.0, timeout_s=20.0)
    outcome = solve_with_repair(TASK, generate, tests=["assert add(2, 3) == 5"], config=config, temperature=0.7,
                                validator=lambda code, tests: validate(code, tests, sandbox=sandbox))
    assert outcome.attempts[0].validation.status == "syntax_error"
    # The tiny model either fixed it (the loop stops there) or the loop used every repair.
    assert outcome.status == "passed" or len(outcome.attempts) == 3
    assert calls[1:] == [0.0] * (len(outcome.attempts) - 1)
    # The model saw the error of the attempt before.
    assert "line 1, column 14" in tiny_generate.prompts[0]
    assert all(attempt.validation.status in ("passed", "failed", "syntax_error", "error", "timeout")
               for attempt in outcome.attempts)


# -- GRPO reward and tasks ------------------------------------------------------------------------

def test_reference_solutions_pass_and_stubs_fail(sandbox: Sandbox) -> None:
    assert len(CODING_TASKS) >= 10
    for task in CODING_TASKS:
        good = validate(task.solution, list(task.tests), sandbox=sandbox)
        assert good.status == "passed" and good.tests_total == len(task.tests), (task.name, good.errors)
        assert all(result.judged_by == "harness" for result in good.tests), task.name
        stub = validate(f"def {task.function_name}(*args):\n    raise NotImplementedError\n", list(task.tests),
                        sandbox=sandbox)
        assert stub.tests_passed == 0, task.name


def test_code_test_reward(sandbox: Sandbox) -> None:
    reward = CodeTestReward(CodeCheckConfig(timeout_s=20.0, memory_mb=256))
    tests = [list(CODING_TASKS[0].tests)] * 4
    completions = [
        FIXED,  # all three tests pass
        "```python\ndef add(a, b):\n    return 0\n```",  # passes add(-4, 4) and add(0, 0)
        BROKEN,  # syntax error: 0.0, counted with its reason
        [{"role": "assistant", "content": FIXED}],  # conversational completion
    ]
    assert reward(completions, tests=tests) == [1.0, 2 / 3, 0.0, 1.0]
    assert reward.counts == {"passed": 2, "failed": 1, "syntax_error": 1}
    assert any(reason.startswith("syntax_error: syntax: line 1") for reason in reward.recent_failures)
    # Picklable (Ray ships it to training workers) and still working after the trip.
    again = pickle.loads(pickle.dumps(reward))
    assert again([FIXED], tests=[["assert add(1, 1) == 2"]]) == [1.0]


def test_code_test_reward_reports_sandbox_failures() -> None:
    failing = Validation("error", 0, 1, ("sandbox: sandbox failed to start: bwrap: boom",), "sandbox")
    reward = CodeTestReward(validator=lambda code, tests: failing)
    # No reward instead of a silent 0.0, and the failure is counted.
    assert reward([FIXED], tests=[["assert add(1, 2) == 3"]]) == [None]
    assert reward.counts["no_reward"] == 1 and "bwrap: boom" in reward.recent_failures[-1]


def test_reward_rejects_mismatched_tests() -> None:
    with pytest.raises(ValueError, match="one per completion"):
        CodeTestReward()([FIXED, FIXED], tests=[["assert add(1, 2) == 3"]])


def test_reward_ignores_self_written_doctests(sandbox: Sandbox) -> None:
    gamed = '```python\ndef add(a, b):\n    """\n    >>> 1\n    1\n    """\n    return 0\n```'
    reward = CodeTestReward(CodeCheckConfig(timeout_s=20.0))
    assert reward([gamed], tests=[["assert add(1, 2) == 3"]]) == [0.0]


@pytest.mark.parametrize("model, values, message", [
    # A uid range past what bubblewrap accepts.
    (CodeCheckConfig, {"sandbox_uid_base": 2_147_480_000, "sandbox_uid_count": 60000}, "sandbox uid range ends at"),
    # Autoscaling bounds out of order.
    (CodeValidatorConfig, {"min_replicas": 5, "max_replicas": 2}, "min_replicas=5 exceeds max_replicas=2"),
    # Unknown keys are errors.
    (CodeCheckConfig, {"timeout": 3}, "Extra inputs are not permitted"),
])
def test_config_errors(model, values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model(**values)


def test_library_does_not_import_ray() -> None:
    assert "r1.codecheck" in sys.modules
    import subprocess

    code = "import sys, r1.codecheck, r1.codecheck.reward; print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


# -- odd but honest solutions and tests; hostile values ---------------------------------------------

@pytest.mark.parametrize("code, tests", [
    # Subclasses of plain types are compared as their base type's value.
    ("from collections import defaultdict\ndef f():\n    d = defaultdict(list)\n    d['a'].append(1)\n    return d\n",
     ["assert f() == {'a': [1]}"]),
    ("from collections import Counter\ndef f():\n    return Counter('aab')\n", ["assert f() == {'a': 2, 'b': 1}"]),
    ("from collections import namedtuple\nP = namedtuple('P', 'x y')\ndef f():\n    return P(1, 2)\n",
     ["assert f() == (1, 2)"]),
    ("import enum\nclass C(enum.IntEnum):\n    RED = 1\ndef f():\n    return C.RED\n", ["assert f() == 1"]),
    # An int past Python's 4300-digit limit on decimal text.
    ("def f():\n    return 2 ** 20000\n", ["assert f() > 0", "assert f() % 2 == 0"]),
    # An assert in a branch the test does not take never runs, and that is fine.
    ("def f(n):\n    return n * n\n",
     ["def test_a():\n    r = f(3)\n    if r is None:\n        assert f(0) == 1\n    else:\n        assert r == 9\n"]),
    # A chatty solution: output past the cap is dropped, its writes keep working.
    ("def f(n):\n    t = 0\n    for i in range(n):\n        t += i\n        print('step', i, 'total', t)\n    return t\n",
     ["assert f(10) == 45", "assert f(20000) == 199990000"]),
    # pytest's raises and approx work in the sandbox (its interpreter cannot import an installed pytest).
    ("def f(x):\n    if x < 0:\n        raise ValueError('negative: %s' % x)\n    return x / 3\n",
     ["import pytest\ndef test_f():\n    with pytest.raises(ValueError, match='negative'):\n        f(-1)\n"
      "    assert f(1) == pytest.approx(0.3333333)\n    assert pytest.raises(ValueError, f, -2).value.args\n"]),
])
def test_honest_solutions_pass(code: str, tests: list[str], sandbox: Sandbox) -> None:
    result = validate(code, tests, sandbox=sandbox)
    assert result.status == "passed", result.errors


def test_pytest_stand_in_fails_wrong_code(sandbox: Sandbox) -> None:
    tests = ["import pytest\ndef test_f():\n    with pytest.raises(ValueError):\n        f(-1)\n"]
    result = validate("def f(x):\n    return x\n", tests, sandbox=sandbox)
    assert result.status == "failed" and "DID NOT RAISE" in result.errors[0]


def test_a_test_whose_checks_are_all_conditional_is_judged_in_the_sandbox() -> None:
    spec, = parse_tests(["def test_a():\n    if f(1):\n        assert f(1) == 1\n"])
    assert spec.required == () and spec.judged_by == "sandbox"  # skipping the branch could be forged
    spec, = parse_tests(["def test_a():\n    assert f(2) == 4\n    for i in []:\n        assert f(i) == 0\n"])
    assert len(spec.required) == 1 and spec.judged_by == "harness"


@pytest.mark.parametrize("tests, message", [
    ("", "holds no code"),
    ("   \n# todo\n", "holds no code"),
    (["# todo"], "holds no code"),
    (["pass"], "checks nothing"),
    ("x = add(1, 2)", "checks nothing"),
    (["assert add(" + "+".join(["1"] * 600) + ") == 600"], "nested too deeply"),
])
def test_tests_that_check_nothing_are_request_errors(tests, message: str, sandbox: Sandbox) -> None:
    with pytest.raises(ValueError, match=message):
        validate(ADD, tests, sandbox=sandbox)
    result = validate_request(ADD, tests, sandbox=sandbox)
    assert (result.status, result.stage) == ("error", "request") and message in result.errors[0]


def test_deeply_nested_generated_tests_are_dropped() -> None:
    deep = "assert add(" + "+".join(["1"] * 600) + ") == 600"
    text = f"```python\n{deep}\nassert add(1, 2) == 3\n```"
    assert parse_generated_tests(text, "add", 5) == ["assert add(1, 2) == 3"]


def test_values_too_large_to_compare_fail_without_being_parsed(sandbox: Sandbox) -> None:
    code = "def f():\n    return list(range(100000))\n"
    result = validate(code, ["assert f() == [1]", "assert len(f()) == 100000"], sandbox=sandbox)
    assert (result.status, result.tests_passed) == ("failed", 1)
    assert "too large to compare" in result.errors[0] and "len(" in result.errors[0]
    # A hostile program writing one huge value straight into the channel: refused by its size, not
    # parsed (parsing megabytes of literal would take the calling process gigabytes).
    spec, = parse_tests(["assert f() == 1"])
    channel = b'{"load": true}\n{"t": 0, "c": 0, "v": "[' + b"1," * 4_000_000 + b']"}\n{"t": 0, "ok": true}\n'
    verdict = judge([spec], channel).results[0]
    assert not verdict.passed and "too large to compare" in verdict.error


def test_a_cut_result_channel_fails_unfinished_tests_saying_why(sandbox: Sandbox) -> None:
    big = "x" * 150_000
    code = f"def s():\n    return {big!r}\n"
    tests = [f"def test_many():\n    for i in range(60):\n        assert s() == {big!r}\n    assert s() == {big!r}\n"]
    result = validate(code, tests, sandbox=sandbox)  # 60 values of 150 kB: past the channel's 8 MB
    assert result.status == "failed" and "more than 8 MB" in result.errors[0]


def test_lone_surrogates_from_the_sandbox_do_not_reach_the_result(sandbox: Sandbox) -> None:
    code = "def f():\n    raise ValueError(chr(0xd800) + 'x')\n"
    result = validate(code, ["assert f() == 1", "def test_b():\n    assert f()\n"], sandbox=sandbox)
    assert result.status == "failed"
    json.dumps(result.to_dict(), ensure_ascii=False).encode("utf-8")  # a JSON response can carry it
    for error in result.errors:
        error.encode("utf-8")
