"""Engine throughput: continuous batching vs a loop of `generate` calls vs one static padded batch.

16 concurrent requests x 64 new tokens (greedy, EOS ignored so every method generates the same
number of tokens), prompts of different lengths, on r1-tiny and on a ~100M-parameter random
Qwen2-shaped model. All three methods run in the same process, on the same prompts, one after the
other; the script prints tokens/s and our ratio to each baseline.

    python -m bench.engine [--num-requests 16] [--new-tokens 64] [--models tiny,100m] [--repeats 5]

Each method runs `--repeats` times, interleaved (static, engine, loop, static, ...), and the median
tokens/s is reported: a single run of the tiny model takes a fraction of a second, and one run's
ratio swings by ±40 % with scheduler noise on a small machine. Each round's own ratios (the engine
against the baselines run right before and after it) are reported too, as their median and range.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import torch

from bench.contract import command_line, finish, ratio, target_note
from r1.config import EngineConfig, ModelConfig, SamplingConfig
from r1.engine import TransformersEngine
from r1.model import load_model

BASE_PROMPTS = [
    "Mia has 23 apples. She buys 45 more. How many apples does she have now?",
    "Tom has 5 pens.",
    "Write a Python function that adds two numbers.",
    "忘记密码怎么办？",
    "Explain step by step why the sky is blue, in simple words, for a child.",
    "12 + 7 - 3 =",
    "Ana had 40 cards and gave 15 away. Then she found 8. How many cards does she have?",
    "Hello",
]


def make_prompts(tokenizer, num_requests: int) -> list[list[int]]:
    prompts = []
    for i in range(num_requests):
        text = BASE_PROMPTS[i % len(BASE_PROMPTS)] + " again" * (i // len(BASE_PROMPTS))
        prompts.append(tokenizer.encode(text, add_special_tokens=True))
    return prompts


def build_100m(tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=2,
        intermediate_size=2048, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config).eval()


def bench_engine(model, tokenizer, prompts, new_tokens) -> float:
    engine = TransformersEngine(model, tokenizer, EngineConfig(max_num_seqs=len(prompts)))
    sampling = SamplingConfig(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)

    async def one(prompt):
        count = 0
        async for delta in engine.stream(prompt, sampling):
            count += len(delta.token_ids)
        return count

    async def run_all():
        return await asyncio.gather(*(one(p) for p in prompts))

    engine.generate_batch(prompts[:2], SamplingConfig(temperature=0, max_new_tokens=4))  # warm-up
    start = time.perf_counter()
    counts = asyncio.run(run_all())
    elapsed = time.perf_counter() - start
    engine.shutdown()
    assert sum(counts) == new_tokens * len(prompts)
    return sum(counts) / elapsed


@torch.inference_mode()
def warm_up(model, tokenizer) -> None:
    """One short generate() so no baseline pays one-time costs inside its timing."""
    ids = torch.tensor([[tokenizer.bos_token_id or 0, 5, 6]])
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                   pad_token_id=tokenizer.pad_token_id)


@torch.inference_mode()
def bench_loop(model, tokenizer, prompts, new_tokens) -> float:
    warm_up(model, tokenizer)
    start = time.perf_counter()
    total = 0
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        total += out.shape[1] - len(prompt)
    return total / (time.perf_counter() - start)


@torch.inference_mode()
def bench_static(model, tokenizer, prompts, new_tokens) -> float:
    warm_up(model, tokenizer)
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.tensor(prompt)
        mask[row, length - len(prompt):] = 1
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    elapsed = time.perf_counter() - start
    return (out.shape[1] - length) * len(prompts) / elapsed


MODEL_LABELS = {"tiny": "r1-tiny", "100m": "random Qwen2"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--models", default="tiny,100m", help="comma list of: tiny, 100m")
    parser.add_argument("--repeats", type=int, default=5, help="runs per method; the median is reported")
    parser.add_argument("--json", help="also write the results (bench/contract.py format) to this file")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tiny_model, tokenizer = load_model(ModelConfig(device="cpu", dtype="fp32"))
    results = []
    for name in args.models.split(","):
        model = tiny_model if name == "tiny" else build_100m(tokenizer)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        prompts = make_prompts(tokenizer, args.num_requests)
        row = {"model": name, "params_m": round(params, 1), "threads": torch.get_num_threads()}
        runs: dict[str, list[float]] = {"static": [], "loop": [], "engine": []}
        for _ in range(max(1, args.repeats)):
            # The engine runs between the two baselines, so that each round's ratios compare runs
            # seconds apart (this machine's speed drifts by tens of per cent within minutes).
            runs["static"].append(bench_static(model, tokenizer, prompts, args.new_tokens))
            runs["engine"].append(bench_engine(model, tokenizer, prompts, args.new_tokens))
            runs["loop"].append(bench_loop(model, tokenizer, prompts, args.new_tokens))
        for method, values in runs.items():
            row[f"{method}_tok_s"] = statistics.median(values)
            row[f"{method}_runs"] = [round(v, 1) for v in values]
        row["vs_static"] = row["engine_tok_s"] / row["static_tok_s"]
        row["vs_loop"] = row["engine_tok_s"] / row["loop_tok_s"]
        for baseline in ("static", "loop"):
            paired = [e / b for e, b in zip(runs["engine"], runs[baseline])]
            row[f"vs_{baseline}_paired"] = statistics.median(paired)
            row[f"vs_{baseline}_paired_runs"] = [round(r, 3) for r in paired]
        results.append(row)
        print(
            f"{name:5s} ({params:.1f}M params, {args.num_requests} requests x {args.new_tokens} tokens): "
            f"engine {row['engine_tok_s']:.0f} tok/s | static batch {row['static_tok_s']:.0f} tok/s | "
            f"loop {row['loop_tok_s']:.0f} tok/s | engine/static {row['vs_static']:.2f}x | engine/loop {row['vs_loop']:.2f}x",
            flush=True,
        )
    return finish(contract_result(args, argv, results), args.json)


def contract_result(args: argparse.Namespace, argv: list[str] | None, results: list[dict]) -> dict:
    """The run as the bench JSON contract: one table of medians and ratios, the targets as notes."""
    def paired(r: dict, baseline: str) -> str:
        runs = r[f"vs_{baseline}_paired_runs"]
        return f"{ratio(r[f'vs_{baseline}_paired'])} ({ratio(min(runs))} – {ratio(max(runs))})"

    table_rows = [
        [MODEL_LABELS.get(r["model"], r["model"]), f"{r['params_m']} M", round(r["engine_tok_s"]),
         round(r["static_tok_s"]), round(r["loop_tok_s"]), ratio(r["vs_static"]), ratio(r["vs_loop"]),
         paired(r, "static"), paired(r, "loop")]
        for r in results
    ]
    notes = []
    for r in results:
        label = MODEL_LABELS.get(r["model"], r["model"])
        notes.append(target_note(f"engine / static batch, {label}", r["vs_static"], 1.0))
        notes.append(target_note(f"engine / static batch, {label}, median of the rounds' paired ratios",
                                 r["vs_static_paired"], 1.0))
        notes.append(target_note(f"engine / loop, {label}", r["vs_loop"], 5.0))
    threads = results[0]["threads"] if results else torch.get_num_threads()
    return {
        "benchmark": "engine",
        "title": "Engine",
        "command": command_line("engine", argv),
        "baseline": "A loop of single `generate` calls and one left-padded static `generate` batch of the same "
                    "prompts, interleaved with the engine runs in the same process.",
        "tables": [{
            "title": f"tokens/s, median of {max(1, args.repeats)} interleaved runs per method, "
                     f"{args.num_requests} requests × {args.new_tokens} new tokens, {threads} torch threads",
            "columns": ["model", "params", "engine", "static batch", "loop", "engine / static", "engine / loop",
                        "engine / static, per round: median (range)", "engine / loop, per round: median (range)"],
            "rows": table_rows,
        }],
        "series": {},
        "notes": notes,
        "raw": results,
    }


if __name__ == "__main__":
    main()
