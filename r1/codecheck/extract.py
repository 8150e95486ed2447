"""Find the Python code in a model's output: fenced blocks first, else the bare text.

Reasoning models write `<think>...</think>` before the answer; code inside the reasoning is a
draft, so only text after the last `</think>` is searched when one is present. This module only
finds text; it never runs or judges it.
"""

from __future__ import annotations

import ast
import re

FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)(?:\n[ \t]*```|\Z)", re.DOTALL)
PYTHON_TAGS = {"", "python", "python3", "py", "py3"}
CODE_START = re.compile(r"^(def |class |import |from |@|async def |if __name__|[A-Za-z_][A-Za-z0-9_]* ?=)")


def strip_reasoning(text: str) -> str:
    """The text after the last `</think>` (all of it when there is none)."""
    marker = text.rfind("</think>")
    return text[marker + len("</think>"):] if marker >= 0 else text


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


def extract_code(text: str) -> str:
    """The code to validate: the last Python fenced block that parses (else the last Python
    block), or for bare output, the text from its first code-looking line."""
    text = strip_reasoning(text)
    blocks = [body for tag, body in FENCE.findall(text) if tag.lower() in PYTHON_TAGS]
    if blocks:
        parsing = [block for block in blocks if _parses(block)]
        return (parsing or blocks)[-1].strip("\n")
    lines = text.strip("\n").splitlines()
    start = next((i for i, line in enumerate(lines) if CODE_START.match(line)), 0)
    code_lines = lines[start:]
    # Drop trailing prose ("This function returns ...") while that makes the code parse.
    for end in range(len(code_lines), max(0, len(code_lines) - 20), -1):
        candidate = "\n".join(code_lines[:end])
        if _parses(candidate):
            return candidate.strip("\n")
    return "\n".join(code_lines).strip("\n")
