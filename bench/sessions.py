"""Session store throughput and the latency a session adds to each chat turn.

Three measurements per backend (SQLite synchronous=full, SQLite synchronous=normal, Redis):

- `backend appends/s`: one process appending 2-message exchanges straight into the backend
  (the storage's own cost: SQLite commits and fsyncs, Redis round trips and Lua);
- `actor appends/s`: the same appends through `SessionClient` and the SessionStore actors, with
  `--concurrency` turns in flight over `--num-sessions` sessions (what the ingress replicas see);
- `added latency per turn`: one turn at a time, `begin_turn` (read window) + `finish_turn`
  (durable append), p50/p95/p99 in milliseconds; this is what sessions add to a chat request;
- `first turn`: the same for the first turn of a new session, p50 in milliseconds: made by the server
  for a request that names none (stored with its exchange: one write) and, interleaved with it, for
  a new id the client names (opened first, then appended: two writes).

Redis: `--redis-url redis://...`, or a local `redis-server` (started here when the binary exists, with
appendonly + appendfsync always, i.e. durable like SQLite full).

    python -m bench.sessions [--turns 2000] [--concurrency 32] [--num-partitions 4] [--backends sqlite-full,sqlite-normal,redis]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from bench.contract import command_line, finish

EXCHANGE = [{"role": "user", "content": "How many apples does Mia have now?"},
            {"role": "assistant", "content": "Mia has 23 + 45 = 68 apples."}]


@contextmanager
def local_redis(workdir: Path):
    """A durable (appendonly, fsync always) redis-server on a free port; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed: pass --redis-url or drop redis from --backends")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
         "--appendfsync", "always", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise SystemExit("redis-server did not start within 10 s") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        process.kill()
        process.wait(timeout=10)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_backend(url: str, synchronous: str, turns: int) -> float:
    """Exchanges appended per second straight into the backend, one writer."""
    from r1.sessions import new_session_id, open_backend

    backend = open_backend(url, idle_ttl_s=3600, max_stored_messages=100_000, sqlite_synchronous=synchronous)
    session_ids = [new_session_id() for _ in range(16)]
    for session_id in session_ids:
        backend.open(session_id, "bench")
    start = time.perf_counter()
    for i in range(turns):
        backend.append(session_ids[i % len(session_ids)], "bench", EXCHANGE, turn_id=f"t{i}")
    elapsed = time.perf_counter() - start
    backend.close()
    return turns / elapsed


async def bench_actors(config, turns: int, concurrency: int, num_sessions: int,
                       latencies_out: list[float] | None = None) -> dict[str, float]:
    """Appends/s through the SessionStore actors and the latency a turn adds; the per-turn latencies
    (ms) are also appended to `latencies_out` when given (for the latency CDF)."""
    from actors.session_store import SessionClient

    client = SessionClient(config)
    await client.ready()
    session_ids = []
    first_turn_ms: dict[str, list[float]] = {"new": [], "named": []}
    for _ in range(num_sessions):
        for kind, named_id in (("new", None), ("named", f"bench-{uuid.uuid4().hex}")):
            start = time.perf_counter()
            turn = await client.begin_turn(named_id, None, "bench", [EXCHANGE[0]])
            await client.finish_turn(turn, EXCHANGE[1]["content"])
            first_turn_ms[kind].append((time.perf_counter() - start) * 1000)
            if named_id is None:
                session_ids.append(turn.session_id)

    # Sequential turns: what one chat request pays for its session.
    latencies_ms = []
    for i in range(min(turns, 300)):
        start = time.perf_counter()
        turn = await client.begin_turn(session_ids[i % num_sessions], None, "bench", [EXCHANGE[0]])
        await client.finish_turn(turn, EXCHANGE[1]["content"])
        latencies_ms.append((time.perf_counter() - start) * 1000)

    # Concurrent appends: the store's throughput under load from many requests.
    semaphore = asyncio.Semaphore(concurrency)
    turn = await client.begin_turn(session_ids[0], None, "bench", [EXCHANGE[0]])

    async def one(i: int) -> None:
        async with semaphore:
            planned = dataclasses.replace(turn, session_id=session_ids[i % num_sessions], turn_id=f"c{i}")
            assert await client.finish_turn(planned, EXCHANGE[1]["content"])

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(turns)))
    appends_per_s = turns / (time.perf_counter() - start)
    if latencies_out is not None:
        latencies_out.extend(latencies_ms)
    return {
        "actor_appends_per_s": round(appends_per_s, 1),
        "turn_added_ms_p50": round(statistics.median(latencies_ms), 2),
        "turn_added_ms_p95": round(percentile(latencies_ms, 0.95), 2),
        "turn_added_ms_p99": round(percentile(latencies_ms, 0.99), 2),
        "first_turn_ms_p50": round(statistics.median(first_turn_ms["new"]), 2),
        "first_turn_named_ms_p50": round(statistics.median(first_turn_ms["named"]), 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--num-sessions", type=int, default=64)
    parser.add_argument("--num-partitions", type=int, default=4)
    parser.add_argument("--backends", default="sqlite-full,sqlite-normal,redis")
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray instance")
    parser.add_argument("--json", help="also write the results (bench/contract.py format) to this file")
    args = parser.parse_args(argv)

    import ray

    from actors.session_store import stop_session_actors
    from r1.config import SessionConfig

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"sqlite-full", "sqlite-normal", "redis"}
    if unknown:
        raise SystemExit(f"unknown backends {sorted(unknown)}; use sqlite-full, sqlite-normal, redis")
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    results = []
    latencies: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="r1-bench-sessions-") as tmp:
        workdir = Path(tmp)
        redis_ctx = local_redis(workdir) if "redis" in backends and args.redis_url is None else None
        redis_url = redis_ctx.__enter__() if redis_ctx else args.redis_url
        try:
            for name in backends:
                url = redis_url if name == "redis" else f"sqlite:///{workdir}/{name}-{uuid.uuid4().hex[:6]}.db"
                synchronous = "normal" if name == "sqlite-normal" else "full"
                config = SessionConfig(backend_url=url, num_partitions=args.num_partitions, sqlite_synchronous=synchronous,
                                       call_timeout_s=60, namespace=f"r1-bench-{uuid.uuid4().hex[:8]}")
                row = {"backend": name, "backend_appends_per_s": round(bench_backend(url, synchronous, args.turns), 1)}
                try:
                    row.update(asyncio.run(bench_actors(config, args.turns, args.concurrency, args.num_sessions,
                                                        latencies.setdefault(name, []))))
                finally:
                    stop_session_actors(config.namespace)
                results.append(row)
                print(json.dumps(row), flush=True)
        finally:
            if redis_ctx:
                redis_ctx.__exit__(None, None, None)
            ray.shutdown()
    print()
    header = ["backend", "backend_appends_per_s", "actor_appends_per_s", "turn_added_ms_p50", "turn_added_ms_p95",
              "turn_added_ms_p99", "first_turn_ms_p50", "first_turn_named_ms_p50"]
    print(" | ".join(header))
    for row in results:
        print(" | ".join(str(row.get(h, "")) for h in header))
    return finish(contract_result(args, argv, results, latencies), args.json)


BACKEND_LABELS = {"sqlite-full": "SQLite, synchronous=FULL (default)", "sqlite-normal": "SQLite, synchronous=NORMAL",
                  "redis": "Redis (appendfsync always)"}


def contract_result(args: argparse.Namespace, argv: list[str] | None, results: list[dict],
                    latencies: dict[str, list[float]]) -> dict:
    """The run as the bench JSON contract: one row per backend, the per-turn latency CDF per backend."""
    rows = [[BACKEND_LABELS.get(r["backend"], r["backend"]), r["backend_appends_per_s"], r["actor_appends_per_s"],
             f"{r['actor_appends_per_s'] / r['backend_appends_per_s']:.2f}×",
             f"{r['turn_added_ms_p50']} / {r['turn_added_ms_p95']} / {r['turn_added_ms_p99']}",
             r["first_turn_ms_p50"], r["first_turn_named_ms_p50"]] for r in results]
    return {
        "benchmark": "sessions",
        "title": "Sessions",
        "command": command_line("sessions", argv),
        "baseline": "The same 2-message appends written straight into the backend by one process (the storage's "
                    "own cost), measured in the same run as the appends through the SessionStore actors.",
        "tables": [{
            "title": f"{args.turns} turns, concurrency {args.concurrency}, {args.num_sessions} sessions, "
                     f"{args.num_partitions} partitions",
            "columns": ["backend", "direct appends/s", "appends/s through actors", "actors / direct",
                        "added ms per turn p50 / p95 / p99", "first turn of a new session, ms p50",
                        "first turn, new id named by the client (open + append), ms p50"],
            "rows": rows,
        }],
        "series": {"latency_cdf": {BACKEND_LABELS.get(name, name): [round(v / 1000, 5) for v in sorted(values)]
                                   for name, values in latencies.items() if values}},
        "notes": [],
        "raw": results,
    }


if __name__ == "__main__":
    main()
