"""Find the Python code in a model's output: fenced blocks first, else the bare text.

Reasoning models write `<think>...</think>` before the answer; code inside the reasoning is a
draft, so only text after the last `</think>` is searched when one is present. This module only
finds text; it never runs or judges it.
"""

from __future__ import annotations

import ast
import re
import textwrap

# A fence opens with ``` (and a tag); it closes at a line that starts with ``` (indented or not),
# at ``` ending a line of code, or at the end of the text (an unterminated block).
FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)(?:\n[ \t]*```|```(?=[ \t]*(?:\n|\Z))|\Z)", re.DOTALL)
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


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(target.id for target in targets if isinstance(target, ast.Name))
    return names


def _defines(tree: ast.Module) -> bool:
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for node in tree.body)


def _choose(blocks: list[str]) -> str:
    """The solution among several Python blocks: the last one that defines a function or class
    (answers often end with a usage example or tests in a block of their own), preceded by the
    definitions and imports of earlier blocks that it does not define itself (a helper written in
    a block of its own). Earlier blocks' other statements (examples, prints) are left out."""
    trees = []
    for block in blocks:
        try:
            trees.append((block, ast.parse(block)))
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
    if not trees:
        return blocks[-1]
    defining = [(block, tree) for block, tree in trees if _defines(tree)]
    if not defining:
        return trees[-1][0]
    last, last_tree = defining[-1]
    known = _top_level_names(last_tree)
    borrowed: list[str] = []
    for _block, tree in defining[:-1]:
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom)):
                names = _top_level_names(ast.Module(body=[node], type_ignores=[]))
                if not names <= known:
                    try:
                        borrowed.append(ast.unparse(node))
                    except (RecursionError, MemoryError):
                        continue
                    known |= names
    return "\n\n".join([*borrowed, last.strip("\n")]) if borrowed else last


def extract_code(text: str) -> str:
    """The code to validate: from fenced Python blocks (see `_choose`; fences may be indented, as in a
    list item, and their common indentation is removed), or for bare output, the text from its
    first code-looking line."""
    text = strip_reasoning(text)
    blocks = [textwrap.dedent(body) for tag, body in FENCE.findall(text) if tag.lower() in PYTHON_TAGS]
    if blocks:
        return _choose(blocks).strip("\n")
    lines = text.strip("\n").splitlines()
    start = next((i for i, line in enumerate(lines) if CODE_START.match(line)), 0)
    code_lines = lines[start:]
    # Drop trailing prose ("This function returns ...") while that makes the code parse.
    for end in range(len(code_lines), max(0, len(code_lines) - 20), -1):
        candidate = "\n".join(code_lines[:end])
        if _parses(candidate):
            return candidate.strip("\n")
    return "\n".join(code_lines).strip("\n")
