"""The engine's first batches after each kind of warm-up, each in a fresh process.

A replica's first users wait for whatever the process has not paid for yet (loading kernels,
choosing them per shape, growing the allocator). This script starts one process per (dtype,
warm-up), warms the engine up that way, then times `--batches` batches of 64 level-1 arithmetic
prompts (greedy, <= 96 new tokens), and prints tokens/s per batch and, for the first batch, where
its time went: prefill vs decode steps, the slowest steps with their rows and attention length.

    python -m bench.first_batch --device cuda [--dtypes fp32,bf16] [--warmups none,short,sweep,full]
                                [--batches 3] [--profile]

Warm-ups: `none`; `short` (one request of two tokens); `sweep` (every decode batch size once,
prompts of one token); `full` (`engine.warmup()`'s default on a GPU: the sweep, then a full batch
of prompts of different lengths, left-padded, decoded for up to 96 tokens). `--profile` runs the
first batch after the sweep under torch.profiler too and prints its most expensive operators.
Informational: it asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time

WARMUPS = ("none", "short", "sweep", "full")


def timed_runner(runner, sync, log):
    """Wrap the runner's prefill and decode calls to log (kind, rows, attention length, ms)."""
    add, step = runner.add, runner.step

    def timed(kind, call):
        def wrapper(seq_ids, tokens):
            sync()
            start = time.perf_counter()
            out = call(seq_ids, tokens)
            sync()
            length = runner.kv.mask.shape[1] if runner.kv.mask is not None else 0
            log.append((kind, len(seq_ids), length, (time.perf_counter() - start) * 1e3))
            return out
        return wrapper

    runner.add, runner.step = timed("prefill", add), timed("decode", step)


def child(args) -> None:
    import torch

    from r1.config import EngineConfig, ModelConfig, SamplingConfig
    from r1.engine import create_engine
    from r1.tasks.arithmetic import generate_problems

    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    started = time.perf_counter()
    engine = create_engine(ModelConfig(model="r1-tiny", device=args.device, dtype=args.dtype), EngineConfig(max_num_seqs=64))
    load_s = time.perf_counter() - started
    start = time.perf_counter()
    if args.warmup == "short":
        engine.warmup(all_batch_sizes=False, full_batch=False)
    elif args.warmup == "sweep":
        engine.warmup(all_batch_sizes=True, full_batch=False)
    elif args.warmup == "full":
        engine.warmup(all_batch_sizes=True, full_batch=True)
    sync()
    warmup_s = time.perf_counter() - start
    greedy = SamplingConfig(temperature=0, max_new_tokens=96)
    log: list[tuple[str, int, int, float]] = []
    timed_runner(engine.runner, sync, log)
    rates, first_log = [], None
    for batch in range(args.batches):
        problems = generate_problems(64, level=1, seed=batch, split="test")
        prompts = [[{"role": "user", "content": p.question}] for p in problems]
        profiling = args.profile and batch == 0
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        log.clear()
        with torch.profiler.profile(activities=activities) if profiling else contextlib.nullcontext() as profiler:
            sync()
            start = time.perf_counter()
            outs = engine.generate_batch(prompts, greedy)
            sync()
            elapsed = time.perf_counter() - start
        if profiling:
            for key in ("self_cpu_time_total",) + (("self_cuda_time_total",) if cuda else ()):
                print(f"--- first batch, top operators by {key}")
                print(profiler.key_averages().table(sort_by=key, row_limit=15))
        rates.append(sum(len(c.token_ids) for c in outs) / elapsed)
        if batch == 0:
            first_log = list(log)
            first_s = elapsed
    engine.shutdown()
    prefill = [entry for entry in first_log if entry[0] == "prefill"]
    decode = [entry for entry in first_log if entry[0] == "decode"]
    print("RESULT " + json.dumps({
        "dtype": args.dtype, "warmup": args.warmup, "load_s": round(load_s, 2), "warmup_s": round(warmup_s, 2),
        "tokens_per_s": [round(r) for r in rates], "first_batch_s": round(first_s, 3),
        "first_prefill_ms": [round(e[3], 1) for e in prefill], "first_prefill_rows": [e[1] for e in prefill],
        "first_decode_steps": len(decode), "first_decode_ms_total": round(sum(e[3] for e in decode), 1),
        "first_decode_slowest": [[rows, length, round(ms, 1)] for _, rows, length, ms in sorted(decode, key=lambda e: -e[3])[:8]],
        "first_decode_median_ms": round(sorted(e[3] for e in decode)[len(decode) // 2], 2) if decode else None,
    }))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda or cpu (default cuda)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16 (default both)")
    parser.add_argument("--warmups", default=",".join(WARMUPS), help=f"comma-separated of {', '.join(WARMUPS)}")
    parser.add_argument("--batches", type=int, default=3, help="batches timed after the warm-up (default 3)")
    parser.add_argument("--profile", action="store_true", help="profile the first batch after the sweep")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    warmups = args.warmups.split(",")
    for warmup in warmups:
        if warmup not in WARMUPS:
            parser.error(f"--warmups: unknown warm-up {warmup!r}; choose from {', '.join(WARMUPS)}")
    failed = 0
    for dtype in args.dtypes.split(","):
        for warmup in warmups:
            cmd = [sys.executable, "-m", "bench.first_batch", "--child", "--device", args.device, "--dtype", dtype,
                   "--warmup", warmup, "--batches", str(args.batches)]
            if args.profile and warmup == "sweep":
                cmd.append("--profile")
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            sys.stdout.write(done.stdout)
            if done.returncode:
                failed += 1
                print(f"FAILED {dtype} {warmup} (exit {done.returncode}):\n{done.stderr[-3000:]}")
            sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
