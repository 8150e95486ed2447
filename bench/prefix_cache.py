"""Prefix caching: multi-turn chats through the engine with and without `engine.prefix_cache_mb`.

`--conversations` chats run side by side, each with the same long system text (`--system-tokens`
of it) and its own questions, for `--turns` turns of `--new-tokens` reply tokens (greedy, EOS
ignored): every turn sends the whole history again, as OpenAI-style clients do. The same workload
runs on an engine with a prefix cache and on one without (the baseline), alternating `--repeats`
times, each run on fresh engines (so every run's first turn finds nothing cached). Per turn: time to
first token (p50 over the chats), prompt tokens and the share of them the cache held; overall:
tokens/s and whether both engines answered with the same tokens.

    python -m bench.prefix_cache [--models tiny,100m] [--conversations 4] [--turns 4] [--system-tokens 320]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import torch

from bench.contract import command_line, finish, ratio
from bench.engine import MODEL_LABELS, build_100m
from r1.config import EngineConfig, ModelConfig, SamplingConfig
from r1.engine import TransformersEngine
from r1.model import load_model

SYSTEM = ("You are a careful assistant for arithmetic word problems. Read the question, reason step by step "
          "inside the thinking block, check each step, then give the final answer as a single number. ")
QUESTIONS = ["Mia has 23 apples and buys 45 more. How many apples?", "Tom has 5 pens and buys 3 more. How many pens?",
             "Ana had 40 cards, gave 15 away and found 8. How many cards?", "What is 12 + 7 - 3?"]


def system_text(tokenizer, tokens: int) -> str:
    text = ""
    while len(tokenizer.encode(text, add_special_tokens=False)) < tokens:
        text += SYSTEM
    return text


async def run_workload(engine: TransformersEngine, system: str, conversations: int, turns: int,
                       sampling: SamplingConfig) -> dict:
    """All chats turn by turn (a turn's requests concurrent); per request (turn, ttft_s, prompt tokens)."""
    histories = [[{"role": "system", "content": system}] for _ in range(conversations)]
    records, answers, tokens = [], [], 0
    start = time.perf_counter()
    for turn in range(turns):
        for chat, history in enumerate(histories):
            history.append({"role": "user", "content": f"{QUESTIONS[(chat + turn) % len(QUESTIONS)]} (turn {turn + 1})"})

        async def one(history):
            request = engine.make_request(history, sampling)
            sent, first, ids, text = time.perf_counter(), None, [], []
            async for delta in engine.stream(request):
                if first is None and delta.token_ids:
                    first = time.perf_counter()
                ids += delta.token_ids
                text.append(delta.text)
            return first - sent, len(request.prompt_token_ids), ids, "".join(text)

        results = await asyncio.gather(*(one(history) for history in histories))
        for history, (ttft, prompt_tokens, ids, text) in zip(histories, results):
            records.append({"turn": turn + 1, "ttft_s": ttft, "prompt_tokens": prompt_tokens})
            answers.append(ids)
            tokens += len(ids)
            history.append({"role": "assistant", "content": text})
    elapsed = time.perf_counter() - start
    return {"records": records, "answers": answers, "tok_s": tokens / elapsed, "elapsed_s": elapsed}


def run_once(model, tokenizer, cache_mb: int, args, system: str) -> dict:
    engine = TransformersEngine(model, tokenizer, EngineConfig(max_num_seqs=args.conversations, prefix_cache_mb=cache_mb))
    sampling = SamplingConfig(temperature=0, max_new_tokens=args.new_tokens, ignore_eos=True)
    engine.generate_batch([[5, 6, 7]], SamplingConfig(temperature=0, max_new_tokens=2))  # warm-up (3 tokens: not cached)
    engine.start()
    try:
        result = asyncio.run(asyncio.wait_for(
            run_workload(engine, system, args.conversations, args.turns, sampling), timeout=1800))
    finally:
        stats = engine.stats()
        engine.shutdown()
    result["hit_tokens"] = stats.get("prefix_cache_hit_tokens", 0)
    result["queried_tokens"] = stats.get("prefix_cache_queried_tokens", 0)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,100m", help="comma list of: tiny, 100m")
    parser.add_argument("--conversations", type=int, default=4, help="chats running side by side")
    parser.add_argument("--turns", type=int, default=4, help="turns per chat")
    parser.add_argument("--system-tokens", type=int, default=320, help="length of the shared system text")
    parser.add_argument("--new-tokens", type=int, default=32, help="reply tokens per turn")
    parser.add_argument("--cache-mb", type=int, default=256, help="engine.prefix_cache_mb of the cached engine")
    parser.add_argument("--repeats", type=int, default=3, help="runs per engine, alternating; medians are reported")
    parser.add_argument("--json", help="also write the results (bench/contract.py format) to this file")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tiny_model, tokenizer = load_model(ModelConfig(device="cpu", dtype="fp32"))
    system = system_text(tokenizer, args.system_tokens)
    rows = []
    for name in args.models.split(","):
        model = tiny_model if name == "tiny" else build_100m(tokenizer)
        runs: dict[str, list[dict]] = {"cached": [], "plain": []}
        for _ in range(max(1, args.repeats)):
            runs["plain"].append(run_once(model, tokenizer, 0, args, system))
            runs["cached"].append(run_once(model, tokenizer, args.cache_mb, args, system))
        same = all(c["answers"] == p["answers"] for c, p in zip(runs["cached"], runs["plain"]))
        row = {"model": name, "threads": torch.get_num_threads(), "same_tokens": same, "turns": []}
        for method in runs:
            row[f"{method}_tok_s"] = statistics.median(r["tok_s"] for r in runs[method])
        cached = runs["cached"][0]
        for turn in range(1, args.turns + 1):
            def ttft(method: str) -> float:
                return statistics.median(statistics.median(r["ttft_s"] for r in run["records"] if r["turn"] == turn)
                                         for run in runs[method])
            prompt = statistics.median(r["prompt_tokens"] for r in cached["records"] if r["turn"] == turn)
            row["turns"].append({"turn": turn, "prompt_tokens": prompt, "plain_ttft_ms": 1000 * ttft("plain"),
                                 "cached_ttft_ms": 1000 * ttft("cached")})
        row["hit_share"] = cached["hit_tokens"] / max(cached["queried_tokens"], 1)
        rows.append(row)
        later = row["turns"][1:]
        speedup = (statistics.median(t["plain_ttft_ms"] / t["cached_ttft_ms"] for t in later) if later else float("nan"))
        print(f"{name}: tok/s {row['cached_tok_s']:.0f} cached vs {row['plain_tok_s']:.0f} plain; "
              f"TTFT after turn 1: {speedup:.2f}x faster (median over turns); prompt tokens from the cache "
              f"{100 * row['hit_share']:.0f} %; same tokens: {same}", flush=True)
    return finish(contract_result(args, argv, rows, system), args.json)


def contract_result(args: argparse.Namespace, argv: list[str] | None, rows: list[dict], system: str) -> dict:
    turn_rows = [[MODEL_LABELS.get(r["model"], r["model"]), t["turn"], round(t["prompt_tokens"]),
                  round(t["plain_ttft_ms"], 1), round(t["cached_ttft_ms"], 1), ratio(t["plain_ttft_ms"] / t["cached_ttft_ms"])]
                 for r in rows for t in r["turns"]]
    overall = [[MODEL_LABELS.get(r["model"], r["model"]), round(r["plain_tok_s"]), round(r["cached_tok_s"]),
                ratio(r["cached_tok_s"] / r["plain_tok_s"]), f"{100 * r['hit_share']:.0f} %",
                "yes" if r["same_tokens"] else "no"] for r in rows]
    threads = rows[0]["threads"] if rows else torch.get_num_threads()
    notes = [f"{MODEL_LABELS.get(r['model'], r['model'])}: the cached engine answered with the same tokens as the "
             f"baseline in every run: {'yes' if r['same_tokens'] else 'NO'}" for r in rows]
    return {
        "benchmark": "prefix_cache",
        "title": "Prefix caching",
        "command": command_line("prefix_cache", argv),
        "baseline": "The same engine without a prefix cache (`engine.prefix_cache_mb: 0`) on the same chats, "
                    "alternating with the cached one in the same process, fresh engines for every run.",
        "tables": [
            {"title": f"time to first token per turn, ms (median over the {args.conversations} chats, then over "
                      f"{max(1, args.repeats)} runs per engine); {args.new_tokens}-token replies, {threads} torch threads",
             "columns": ["model", "turn", "prompt tokens", "no cache", "prefix cache", "speed-up"],
             "rows": turn_rows},
            {"title": f"whole workload ({args.conversations} chats × {args.turns} turns), tokens/s, medians",
             "columns": ["model", "no cache", "prefix cache", "ratio", "prompt tokens from the cache", "same tokens"],
             "rows": overall},
        ],
        "notes": notes,
        "raw": {"rows": rows, "system_chars": len(system)},
    }


if __name__ == "__main__":
    main()
