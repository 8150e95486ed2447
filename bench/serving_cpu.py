"""Where the CPU goes while the stack serves concurrent streams: CPU seconds per process.

Starts the same stack as `bench/serving.py` (one replica each, the default served config or the
`--set` overrides), warms it up with one round, then sends `--requests` chat requests of
`--new-tokens` tokens (greedy, EOS ignored) at `--concurrency` streams, `--rounds` times. For each
round it prints the wall time, the tokens per second and the CPU seconds (user + system, from the
kernel's accounting of each process) that every Ray process, the raylet, the GCS and this client
used meanwhile, largest first. CPU time is a measure a busy machine inflates far less than wall
time, so it shows which process a change made cheaper even when throughput moves by a third
between runs.

    python -m bench.serving_cpu [--concurrency 16] [--requests 64] [--new-tokens 64] [--rounds 2] [--set KEY=VALUE]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os

import httpx
import psutil

from bench.serving import run_level, stack_request, start_stack


def process_label(process: psutil.Process, me: int) -> str | None:
    """A stable name for a process of the stack (None: not one of them). A Ray worker's title
    names the method it runs at the moment ("ray::ServeController.listen_for_change"): the class
    part is kept."""
    name = process.name() or ""
    if name.startswith("ray::"):
        return name[len("ray::"):].split(".")[0]
    if process.pid == me:
        return "benchmark client"
    command = " ".join(process.cmdline())
    for part, label in (("raylet", "raylet"), ("gcs_server", "gcs_server"), ("haproxy", "haproxy")):
        if part in command:
            return label
    return None


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (label, CPU seconds so far), for every process of the stack on this machine."""
    seconds = {}
    me = os.getpid()
    for process in psutil.process_iter():
        try:
            label = process_label(process, me)
            if label is not None:
                times = process.cpu_times()
                seconds[process.pid] = (label, times.user + times.system)
        except psutil.Error:  # gone meanwhile
            pass
    return seconds


def used_between(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> collections.Counter:
    """CPU seconds per label between two `cpu_seconds()` readings, matched by pid (a process
    started meanwhile counts whole, under its later label)."""
    used: collections.Counter = collections.Counter()
    for pid, (label, total) in after.items():
        used[label] += total - before.get(pid, (label, 0.0))[1]
    return used


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=8125)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override the served config, e.g. --set stream_messages_per_s=100")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start_stack(args.port, args.set)
    prompts = [[{"role": "user", "content": f"{i} + {i + 3} = ?"}] for i in range(args.requests)]

    async def rounds() -> None:
        async with httpx.AsyncClient(timeout=600) as http:
            one = stack_request(http, f"http://127.0.0.1:{args.port}/v1/chat/completions", args.new_tokens)
            await run_level(one, prompts[: args.concurrency], args.concurrency)  # warm-up
            for index in range(args.rounds):
                before = cpu_seconds()
                records, elapsed = await run_level(one, list(prompts), args.concurrency)
                used = used_between(before, cpu_seconds())
                tokens = sum(r.get("tokens", 0) for r in records)
                errors = sum(not r["ok"] for r in records)
                print(f"round {index + 1}: {elapsed:.2f} s, {tokens / elapsed:.0f} tokens/s, {errors} errors; "
                      f"CPU seconds ({sum(used.values()):.2f} in all, {os.cpu_count()} cores):", flush=True)
                for label, seconds in used.most_common():
                    if seconds >= 0.01:
                        print(f"  {seconds:6.2f}  {label}", flush=True)

    from ray import serve

    try:
        asyncio.run(rounds())
    finally:
        serve.shutdown()


if __name__ == "__main__":
    main()
