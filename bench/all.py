"""Run every benchmark and rebuild BENCHMARKS.md with its plots.

    python -m bench.all                          # every benchmark, the recorded commands (long: tens of minutes)
    python -m bench.all --only engine,serving    # some of them; the others keep their stored sections
    python -m bench.all --render-only            # rebuild BENCHMARKS.md from bench/results/*.json
    python -m bench.all --quick                  # smoke run at tiny sizes, written under /tmp (not BENCHMARKS.md)

Each benchmark runs in its own process (`python -m bench.<name> <args> --json ...`), so one that
crashes or hangs cannot take the others down: it is reported, its stored result and section stay
as they were, and the exit status is non-zero once everything else has run and been rendered. A
successful run replaces `bench/results/<name>.json`. Default arguments are the commands the
recorded figures came from; `--args NAME="..."` replaces them for one benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.contract import machine_info, validate
from bench.report import NOTES_DIR, OUTPUT, PLOTS_DIR, RESULTS_DIR, ROOT, render_files

# name -> (default args = the command behind the recorded figures, --quick args = smallest useful sizes)
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "engine": (["--num-requests", "16", "--new-tokens", "64", "--models", "tiny,100m", "--repeats", "5"],
               ["--num-requests", "4", "--new-tokens", "16", "--models", "tiny", "--repeats", "1"]),
    "serving": (["--concurrency", "1,4,16", "--new-tokens", "64", "--requests-per-level", "32"],
                ["--concurrency", "2", "--new-tokens", "16", "--requests-per-level", "4"]),
    "safety": ([], ["--repeats", "1", "--extra-corpora", "", "--presidio", "noop"]),
    "sandbox": (["--runs", "80"], ["--runs", "5"]),
    "sessions": (["--turns", "500", "--concurrency", "16", "--num-partitions", "2"],
                 ["--turns", "50", "--concurrency", "4", "--num-partitions", "1", "--backends", "sqlite-full,sqlite-normal"]),
    "cpu_speed": (["--threads", "1", "--repeats", "3"],
                  ["--models", "tiny", "--variants", "fp32,bf16,int8", "--repeats", "1", "--new-tokens", "8",
                   "--num-requests", "4", "--eval-problems", "10", "--probe-batch", "1", "--probe-context", "64",
                   "--peak-size", "256", "--decode-batches", ""]),
    "prefix_cache": (["--models", "tiny,100m", "--conversations", "4", "--turns", "4", "--repeats", "3"],
                     ["--models", "tiny", "--conversations", "2", "--turns", "2", "--repeats", "1", "--new-tokens", "4",
                      "--system-tokens", "64"]),
    "lora": (["--models", "tiny,100m", "--adapters", "4", "--rank", "16", "--repeats", "3"],
             ["--models", "tiny", "--repeats", "1", "--new-tokens", "8", "--num-requests", "4"]),
    "training": ([], ["--steps", "1", "--warmup", "0", "--rounds", "1", "--num-prompts", "4", "--max-new-tokens", "16"]),
}
QUICK_DIR = Path(tempfile.gettempdir()) / "r1-bench-quick"
LOG_TAIL_LINES = 25


@dataclass
class Outcome:
    name: str
    ok: bool
    elapsed_s: float
    reason: str = ""
    log: Path | None = None


def parse_only(value: str | None) -> list[str]:
    if not value:
        return list(BENCHMARKS)
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"--only: unknown benchmark(s) {unknown}; choose from {','.join(BENCHMARKS)}")
    return names


def parse_overrides(values: list[str]) -> dict[str, list[str]]:
    overrides = {}
    for value in values:
        name, sep, args = value.partition("=")
        if not sep or name not in BENCHMARKS:
            raise SystemExit(f"--args {value!r}: expected NAME=\"ARGS\" with NAME one of {','.join(BENCHMARKS)}")
        overrides[name] = shlex.split(args)
    return overrides


def _stop(process: subprocess.Popen) -> None:
    """Stop a benchmark that ran past --timeout, with everything it started in its process group."""
    for sig, grace_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in lines[-LOG_TAIL_LINES:])


def run_one(name: str, args: list[str], results_dir: Path, log_dir: Path, timeout_s: float, verbose: bool) -> Outcome:
    """Run `python -m bench.<name>`; on success (exit 0 and a valid result) store its JSON."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    json_path = log_dir / f"{name}.json"
    json_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", f"bench.{name}", *args, "--json", str(json_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as log_file:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                   stdout=None if verbose else log_file, stderr=None if verbose else subprocess.STDOUT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop(process)
            return Outcome(name, False, time.perf_counter() - start, f"ran past --timeout {timeout_s:.0f} s", log)
    elapsed = time.perf_counter() - start
    if returncode != 0:
        return Outcome(name, False, elapsed, f"exit status {returncode}", log)
    try:
        result = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return Outcome(name, False, elapsed, f"no readable --json output ({error})", log)
    problems = validate(result)
    if problems:
        return Outcome(name, False, elapsed, f"result breaks the contract: {'; '.join(problems)}", log)
    result.setdefault("machine", machine_info())
    result["elapsed_s"] = round(elapsed, 1)
    results_dir.mkdir(parents=True, exist_ok=True)
    staged = results_dir / f".{name}.json.tmp"
    staged.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(staged, results_dir / f"{name}.json")
    return Outcome(name, True, elapsed, log=log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help=f"comma list of benchmarks to run (default all: {','.join(BENCHMARKS)})")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny sizes for a smoke run; results, plots and BENCHMARKS.md go under {QUICK_DIR} "
                             "unless --results-dir/--plots-dir/--output say otherwise")
    parser.add_argument("--render-only", action="store_true", help="run nothing; rebuild the file from stored results")
    parser.add_argument("--args", action="append", default=[], metavar='NAME="ARGS"',
                        help='replace one benchmark\'s arguments, e.g. --args sandbox="--runs 20"')
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds per benchmark before it is stopped")
    parser.add_argument("--verbose", action="store_true", help="show each benchmark's own output instead of logging it")
    parser.add_argument("--results-dir", type=Path, default=None, help=f"default {RESULTS_DIR.relative_to(ROOT)}")
    parser.add_argument("--notes-dir", type=Path, default=NOTES_DIR)
    parser.add_argument("--plots-dir", type=Path, default=None, help=f"default {PLOTS_DIR.relative_to(ROOT)}")
    parser.add_argument("--output", type=Path, default=None, help=f"default {OUTPUT.relative_to(ROOT)}")
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "r1-bench-logs")
    args = parser.parse_args(argv)
    names = parse_only(args.only)
    args.log_dir = args.log_dir.resolve()
    overrides = parse_overrides(args.args)
    base = QUICK_DIR if args.quick else None
    results_dir = args.results_dir or (base / "results" if base else RESULTS_DIR)
    plots_dir = args.plots_dir or (base / "plots" if base else PLOTS_DIR)
    output = args.output or (base / "BENCHMARKS.md" if base else OUTPUT)

    outcomes: list[Outcome] = []
    if not args.render_only:
        for index, name in enumerate(names, 1):
            default, quick = BENCHMARKS[name]
            bench_args = overrides.get(name, quick if args.quick else default)
            print(f"[{index}/{len(names)}] {name}: python -m bench.{name} {shlex.join(bench_args)}".rstrip(), flush=True)
            outcome = run_one(name, bench_args, results_dir, args.log_dir, args.timeout, args.verbose)
            outcomes.append(outcome)
            if outcome.ok:
                print(f"    ok in {outcome.elapsed_s:.1f} s", flush=True)
            else:
                print(f"    FAILED in {outcome.elapsed_s:.1f} s: {outcome.reason}; its previous section is kept "
                      f"(log: {outcome.log})", flush=True)
                if not args.verbose and outcome.log:
                    print(_tail(outcome.log), flush=True)

    banner = "Smoke run (--quick): sizes far too small for the figures to mean anything." if args.quick else None
    path = render_files(results_dir, args.notes_dir, plots_dir, output, banner)
    print(f"wrote {path} (plots in {plots_dir})")
    failed = [o.name for o in outcomes if not o.ok]
    if failed:
        print(f"{len(failed)} of {len(outcomes)} benchmark(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
