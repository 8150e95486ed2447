"""The test runner that executes inside the sandbox (source passed as `python -c`; Python 3.8+).

argv: <solution file> <request fd> <result fd>. It reads the request ({"tests": [{"source", "call"}]},
marshal format 4: it comes from the trusted parent) from the request fd, loads the solution as module `solution`, runs each test in a
fresh namespace holding the solution's globals, and writes one JSON line per event to the result
fd: {"load": true|false, "error"}, {"t": i, "c": k, "v": repr} for every value the harness asked
for, {"t": i, "ok": true} or {"t": i, "ok": false, "error"} when test i ends.

This file judges nothing. The harness rewrote `assert EXPR <op> LITERAL` into
`__r1_report__(k, EXPR)`, so the expected literal never enters the sandbox; the parent compares.
Hostile code runs in this same process and can write anything to the result fd; see harness.py
for what that can and cannot forge.

It runs once per validation, so it imports only fast modules: no json (replies are written by
`_json` below; the parent parses them with a real JSON parser), traceback only on failures.
"""

import builtins
import marshal
import os
import sys
import types

MAX_REPR_CHARS = 200000
MAX_ERROR_CHARS = 2000


_ESCAPES = {i: "\\u%04x" % i for i in range(32)}
_ESCAPES.update({ord("\\"): "\\\\", ord('"'): '\\"'})


def _json(value):
    """JSON for the reply messages: dicts of str, int and bool only."""
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, str):
        return '"' + value.translate(_ESCAPES) + '"'
    return "{" + ", ".join(_json(str(k)) + ": " + _json(v) for k, v in value.items()) + "}"


def _send(fd, message):
    data = (_json(message) + "\n").encode("utf-8", "backslashreplace")
    while data:
        written = os.write(fd, data)
        data = data[written:]


def _plain_repr(value, depth=0):
    """repr of plain data only: a user class cannot stand in for a value (e.g. one equal to all)."""
    if depth > 50:
        raise ValueError("value is nested more than 50 levels deep")
    kind = type(value)
    if kind in (bool, int, float, complex, str, bytes, type(None)):
        return repr(value)
    if kind is list:
        return "[" + ", ".join(_plain_repr(item, depth + 1) for item in value) + "]"
    if kind is tuple:
        items = [_plain_repr(item, depth + 1) for item in value]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if kind is dict:
        return "{" + ", ".join(_plain_repr(k, depth + 1) + ": " + _plain_repr(v, depth + 1)
                               for k, v in value.items()) + "}"
    if kind in (set, frozenset):
        inner = ", ".join(sorted(_plain_repr(item, depth + 1) for item in value))
        if kind is set:
            return "{" + inner + "}" if value else "set()"
        return "frozenset({" + inner + "})" if value else "frozenset()"
    raise TypeError("a checked value must be plain data (int, float, str, bytes, bool, None, list, tuple, "
                    "dict, set), got " + kind.__name__)


def _describe(error, solution_path, test_source=None):
    """`Type: message (where)`: the innermost solution line, else the test's line number."""
    import linecache
    import traceback

    if test_source is not None:
        linecache.cache["<test>"] = (len(test_source), None, test_source.splitlines(True), "<test>")
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    frames = traceback.extract_tb(error.__traceback__)
    where = ""
    for frame in reversed(frames):
        if frame.filename == solution_path:
            where = " (solution.py line %s: %s)" % (frame.lineno, (frame.line or "").strip())
            break
    else:
        for frame in reversed(frames):
            if frame.filename == "<test>":
                where = " (test line %s)" % frame.lineno
                break
    return (text + where)[:MAX_ERROR_CHARS]


def main():
    solution_path, request_fd, result_fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    chunks = []
    while True:
        chunk = os.read(request_fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(request_fd)
    request = marshal.loads(b"".join(chunks))
    for fd in range(3, 1024):
        if fd != result_fd:
            try:
                os.close(fd)
            except OSError:
                pass
    builtins.exit = builtins.quit = sys.exit
    sys.argv = [solution_path]
    sys.path.insert(0, os.getcwd())
    module = types.ModuleType("solution")
    module.__file__ = solution_path
    sys.modules["solution"] = module
    try:
        with open(solution_path, encoding="utf-8") as handle:
            source = handle.read()
        exec(compile(source, solution_path, "exec"), module.__dict__)
    except BaseException as error:  # noqa: BLE001 - SystemExit at import is a load failure too
        _send(result_fd, {"load": False, "error": _describe(error, solution_path)})
        os._exit(0)
    _send(result_fd, {"load": True})
    for index, test in enumerate(request["tests"]):

        def report(check_id, value, _index=index):
            _send(result_fd, {"t": _index, "c": check_id, "v": _plain_repr(value)[:MAX_REPR_CHARS]})

        namespace = dict(module.__dict__)
        namespace["__name__"] = "__test__"
        namespace["__r1_report__"] = report
        try:
            exec(compile(test["source"], "<test>", "exec"), namespace)
            if test.get("call"):
                namespace[test["call"]]()
        except BaseException as error:  # noqa: BLE001 - sys.exit() inside a test fails that test
            _send(result_fd, {"t": index, "ok": False, "error": _describe(error, solution_path, test["source"])})
        else:
            _send(result_fd, {"t": index, "ok": True})
    # Do not wait for threads the solution may have left running.
    os._exit(0)


if __name__ == "__main__":
    main()
