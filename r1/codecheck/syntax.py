"""Stage 1 of code validation: does the code parse and compile? Nothing is executed.

`ast.parse` catches grammar errors; compiling the tree also catches what the parser accepts but
the compiler rejects (`return` outside a function, `nonlocal` at module level, ...).
"""

from __future__ import annotations

import ast
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class SyntaxIssue:
    """Where and why the code does not compile. `line`/`column` are 1-based; None if unknown."""

    message: str
    line: int | None
    column: int | None
    text: str = ""  # the offending source line

    def __str__(self) -> str:
        where = f"line {self.line}, column {self.column}: " if self.line is not None else ""
        shown = f"\n    {self.text.rstrip()}" if self.text.strip() else ""
        return f"{where}{self.message}{shown}"

    def to_dict(self) -> dict:
        return asdict(self)


def check_syntax(code: str, filename: str = "solution.py") -> SyntaxIssue | None:
    """None when `code` compiles, else the first problem found."""
    try:
        tree = ast.parse(code, filename=filename)
        compile(tree, filename, "exec", dont_inherit=True)
    except SyntaxError as error:
        line_text = error.text or ""
        if not line_text and error.lineno and 0 < error.lineno <= len(code.splitlines()):
            line_text = code.splitlines()[error.lineno - 1]
        return SyntaxIssue(error.msg, error.lineno, error.offset, line_text)
    except ValueError as error:  # e.g. null bytes in the source
        return SyntaxIssue(str(error), None, None)
    except (RecursionError, MemoryError):
        return SyntaxIssue("code is nested too deeply to parse", None, None)
    return None
