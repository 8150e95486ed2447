"""Sandbox throughput and per-run overhead: contained runs against a bare subprocess, same run.

    python -m bench.sandbox [--runs 50] [--workers 1] [--levels bwrap,rlimits]

Every iteration runs the same tiny program once per mode, interleaved, so all modes see the same
machine load. "bare" is `subprocess.run([python, -I, -S, -B, -c, code])` with the sandbox's own
interpreter and no isolation; the overhead is a mode's p50 minus bare's p50. `validate` adds the
harness (one request, three asserts) on top of the strongest level. Prints a table; measures,
asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from bench.contract import command_line, finish
from r1.codecheck import Sandbox, validate
from r1.config import CodeCheckConfig

PROGRAM = "total = sum(range(1000))\nprint(total)\n"
SOLUTION = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"]


def _timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="iterations per mode")
    parser.add_argument("--workers", type=int, default=1, help="concurrent runs (threads) per mode")
    parser.add_argument("--levels", default="bwrap,rlimits", help="isolation settings to measure")
    parser.add_argument("--json", help="also write the results (bench/contract.py format) to this file")
    args = parser.parse_args(argv)

    sandboxes = {}
    for level in args.levels.split(","):
        sandbox = Sandbox(CodeCheckConfig(isolation="auto" if level == "bwrap" else level, timeout_s=30.0))
        sandboxes[sandbox.plan().level] = sandbox
    strongest = next(iter(sandboxes.values()))
    interpreter = strongest.plan().interpreter

    def bare() -> None:
        done = subprocess.run([interpreter, "-I", "-S", "-B", "-c", PROGRAM], capture_output=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr

    modes: dict[str, Callable[[], object]] = {"bare": bare}
    for level, sandbox in sandboxes.items():
        def contained(sandbox: Sandbox = sandbox) -> None:
            result = sandbox.run_python(PROGRAM)
            assert result.status == "ok", result.reason
        modes[level] = contained

    def validation() -> None:
        outcome = validate(SOLUTION, TESTS, sandbox=strongest)
        assert outcome.status == "passed", outcome.errors
    modes[f"validate ({strongest.plan().level}, {len(TESTS)} tests)"] = validation

    for call in modes.values():  # warm-up: imports, page cache, uid lock files
        call()
    samples: dict[str, list[float]] = {name: [] for name in modes}
    wall: dict[str, float] = {name: 0.0 for name in modes}
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        for _ in range(max(1, args.runs // args.workers)):
            for name, call in modes.items():
                start = time.perf_counter()
                samples[name] += list(pool.map(lambda _i, call=call: _timed(call), range(args.workers)))
                wall[name] += time.perf_counter() - start

    bare_p50 = statistics.median(samples["bare"])
    print(f"interpreter {interpreter}; {len(samples['bare'])} runs per mode, {args.workers} concurrent")
    print(f"{'mode':34s} {'runs/s':>8s} {'p50 ms':>8s} {'p90 ms':>8s} {'p50 overhead ms':>16s}")
    rows = []
    for name, values in samples.items():
        ordered = sorted(values)
        p50 = statistics.median(ordered)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        overhead = "" if name == "bare" else f"{(p50 - bare_p50) * 1000:+.1f}"
        print(f"{name:34s} {len(values) / wall[name]:8.1f} {p50 * 1000:8.1f} {p90 * 1000:8.1f} {overhead:>16s}")
        rows.append([MODE_LABELS.get(name, name), round(len(values) / wall[name], 1), f"{p50 * 1000:.1f} ms",
                     f"{p90 * 1000:.1f} ms", f"{overhead} ms" if overhead else "—"])
    return finish({
        "benchmark": "sandbox",
        "title": "Sandbox",
        "command": command_line("sandbox", argv),
        "baseline": "A bare `subprocess` running the same program with the sandbox's interpreter and no isolation, "
                    "interleaved with the contained runs so every mode sees the same load.",
        "tables": [{
            "title": f"{len(samples['bare'])} runs per mode, {args.workers} concurrent",
            "columns": ["mode", "runs/s", "p50", "p90", "p50 overhead vs bare"],
            "rows": rows,
        }],
        "series": {"latency_cdf": {MODE_LABELS.get(name, name): [round(v, 5) for v in sorted(values)]
                                   for name, values in samples.items()}},
        "notes": [f"interpreter {interpreter}"],
        "raw": {name: [round(v, 5) for v in values] for name, values in samples.items()},
    }, args.json)


MODE_LABELS = {"bare": "bare subprocess", "rlimits": "uid+rlimits"}


if __name__ == "__main__":
    main()
