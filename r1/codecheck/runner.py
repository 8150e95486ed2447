"""The test runner that executes inside the sandbox (source passed as `python -c`; Python 3.8+).

argv: <solution file> <request fd> <result fd>. It reads the request ({"tests": [{"source", "call"}]},
marshal format 4: it comes from the trusted parent) from the request fd, loads the solution as module `solution`, runs each test in a
fresh namespace holding the solution's globals, and writes one JSON line per event to the result
fd: {"load": true|false, "error"}, {"t": i, "c": k, "v": repr} for every value the harness asked
for ({"t": i, "c": k, "big": length} when the repr is over MAX_REPR_CHARS), {"t": i, "ok": true} or
{"t": i, "ok": false, "error"} when test i ends. Tests may `import pytest` (a stand-in, see `_install_pytest`).

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
    """repr of plain data only: a user class cannot stand in for a value (e.g. one equal to all).

    Subclasses of the plain types (defaultdict, Counter, OrderedDict, namedtuple, IntEnum, str
    subclasses) are sent as their base type's value, read through the base type's own methods, so
    an override cannot change what is sent. Integers past 10,000 bits go as hex literals: the
    parent reads them back without Python's 4300-digit limit on decimal strings.
    """
    if depth > 50:
        raise ValueError("value is nested more than 50 levels deep")
    if value is None or value is True or value is False:
        return repr(value)
    if isinstance(value, int):
        if int.bit_length(value) > 10000:
            return int.__format__(value, "#x")
        return int.__repr__(value)
    for kind in (float, complex, str, bytes):
        if isinstance(value, kind):
            return kind.__repr__(value)
    if isinstance(value, list):
        return "[" + ", ".join(_plain_repr(item, depth + 1) for item in list.__iter__(value)) + "]"
    if isinstance(value, tuple):
        items = [_plain_repr(item, depth + 1) for item in tuple.__iter__(value)]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(_plain_repr(k, depth + 1) + ": " + _plain_repr(v, depth + 1)
                               for k, v in dict.items(value)) + "}"
    for kind, empty in ((set, "set()"), (frozenset, "frozenset()")):
        if isinstance(value, kind):
            items = sorted(_plain_repr(item, depth + 1) for item in kind.__iter__(value))
            if not items:
                return empty
            inner = "{" + ", ".join(items) + "}"
            return inner if kind is set else "frozenset(" + inner + ")"
    raise TypeError("a checked value must be plain data (int, float, str, bytes, bool, None, list, tuple, "
                    "dict, set), got " + type(value).__name__ + "; convert it first (e.g. float(x), list(x))")


class _Raises(object):
    """`pytest.raises(Exc, match=...)` as a context manager; `.value` and `.type` after the block."""

    def __init__(self, expected, match=None):
        self.expected, self.match, self.value, self.type = expected, match, None, None

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None:
            raise AssertionError("DID NOT RAISE " + repr(self.expected))
        if not issubclass(kind, self.expected):
            return False
        if self.match is not None:
            import re

            if not re.search(self.match, str(value)):
                raise AssertionError("Regex pattern %r did not match %r" % (self.match, str(value)))
        self.value, self.type = value, kind
        return True


class _Approx(object):
    """`pytest.approx` for numbers and (nested) lists, tuples and dicts of numbers."""

    def __init__(self, expected, rel=None, abs=None):
        self.expected, self.rel, self.abs = expected, 1e-6 if rel is None else rel, 1e-12 if abs is None else abs

    def _close(self, actual, expected):
        if isinstance(expected, dict):
            return (isinstance(actual, dict) and set(actual) == set(expected)
                    and all(self._close(actual[key], expected[key]) for key in expected))
        if isinstance(expected, (list, tuple)):
            return (isinstance(actual, (list, tuple)) and len(actual) == len(expected)
                    and all(self._close(a, e) for a, e in zip(actual, expected)))
        if actual == expected:
            return True
        try:
            return abs(actual - expected) <= max(self.rel * abs(expected), self.abs)
        except TypeError:
            return False

    def __eq__(self, actual):
        return self._close(actual, self.expected)

    def __ne__(self, actual):
        return not self.__eq__(actual)

    __hash__ = None

    def __repr__(self):
        return "approx(%r)" % (self.expected,)


def _install_pytest():
    """Tests may `import pytest` for raises/approx/fail: the sandbox interpreter runs with -I -S,
    so an installed pytest is out of reach and this small stand-in takes its place."""

    def raises(expected, *args, **kwargs):
        match = kwargs.pop("match", None)
        context = _Raises(expected, match)
        if not args:
            return context
        with context:
            args[0](*args[1:], **kwargs)
        return context

    def fail(reason=""):
        raise AssertionError(reason or "failed")

    module = types.ModuleType("pytest")
    module.raises, module.approx, module.fail = raises, _Approx, fail
    sys.modules["pytest"] = module


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
    _install_pytest()
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
            text = _plain_repr(value)
            if len(text) > MAX_REPR_CHARS:  # the parent would refuse it; say how big instead
                _send(result_fd, {"t": _index, "c": check_id, "big": len(text)})
            else:
                _send(result_fd, {"t": _index, "c": check_id, "v": text})

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
