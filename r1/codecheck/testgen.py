"""Stage 2 without given tests: ask the model to write tests for the function (auto-generated
tests, as the guide describes), and keep only well-formed asserts that call it.

Generated tests are the model's own belief about the right answers; they can be wrong. They are
marked `origin="generated"` in results so callers can weigh them accordingly.
"""

from __future__ import annotations

import ast
from collections.abc import Callable

from r1.codecheck.extract import extract_code, strip_reasoning
from r1.codecheck.prompts import build_test_prompt

Generate = Callable[..., str]  # generate(prompt: str, *, temperature: float) -> str


def main_function(code: str) -> ast.FunctionDef | None:
    """The first top-level public function in `code` (None if the code does not parse)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    public = [node for node in functions if not node.name.startswith("_")]
    return (public or functions or [None])[0]


def signature_of(function: ast.FunctionDef) -> str:
    return f"def {function.name}({ast.unparse(function.args)})"


def parse_generated_tests(text: str, function_name: str, max_tests: int) -> list[str]:
    """Asserts in `text` that call `function_name`, one statement each, deduplicated."""
    code = extract_code(text) if "```" in text else strip_reasoning(text)
    statements: list[ast.stmt] = []
    try:
        statements = ast.parse(code).body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        # One bad line should not cost the good ones: parse line by line.
        for line in code.splitlines():
            try:
                statements += ast.parse(line.strip()).body
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                continue
    tests: list[str] = []
    for statement in statements:
        if not isinstance(statement, ast.Assert):
            continue
        calls = [node for node in ast.walk(statement.test)
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == function_name]
        try:
            source = ast.unparse(ast.Assert(test=statement.test, msg=None))
        except (RecursionError, MemoryError):  # nested deeper than unparse's recursion: not a usable test
            continue
        if calls and source not in tests:
            tests.append(source)
        if len(tests) >= max_tests:
            break
    return tests


def generate_tests(task: str, code: str, generate: Generate, *, num_tests: int = 5,
                   temperature: float = 0.2) -> list[str]:
    """Ask the model for tests of the main function in `code`; [] if there is none to test."""
    function = main_function(code)
    if function is None:
        return []
    text = generate(build_test_prompt(task, signature_of(function), num_tests), temperature=temperature)
    return parse_generated_tests(text, function.name, num_tests)
