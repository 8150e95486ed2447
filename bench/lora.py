"""What serving LoRA adapters beside the base model costs the engine.

16 concurrent streams × 64 new tokens (greedy, EOS ignored) through the continuous-batching engine,
in one process, for: the base model with no adapters loaded (the baseline), the same model with
`--adapters` adapters attached (rank `--rank`, on every Linear layer of the decoder) serving base
requests only, every request of one adapter, and the requests spread over all adapters (each step's
batch mixes them). Rounds interleave the four; medians of `--repeats`. An adapter merged into its
model (`r1 model merge-lora`) runs at the baseline's speed, being a plain model.

    python -m bench.lora [--models tiny,100m] [--adapters 4] [--rank 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.contract import command_line, finish
from bench.engine import build_100m, make_prompts
from r1.config import EngineConfig, ModelConfig, SamplingConfig
from r1.engine import TransformersEngine
from r1.engine.lora import attach_adapters
from r1.model import load_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ["no adapters loaded", "adapters loaded, base requests", "one adapter for all requests",
           "requests spread over the adapters"]


def write_random_adapter(model, out_dir: Path, seed: int, targets: list[str], rank: int, alpha: float,
                         scale: float, **lora: Any) -> Any:
    """Write a peft LoRA adapter of `model` (which it wraps: pass a copy to keep the model) to
    `out_dir`, as `r1 train` with lora.enabled writes one, and return the peft model. peft starts B
    at zero (an adapter that changes nothing); here A and B are random (× `scale`), so the adapter
    changes the answers. Also used by the LoRA tests."""
    from peft import LoraConfig, get_peft_model

    generator = torch.Generator().manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, **lora))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    peft_model.save_pretrained(str(out_dir))
    return peft_model


def write_adapters(model, count: int, rank: int, root: Path) -> dict[str, str]:
    """`count` adapters of `model` on every decoder Linear layer: {name: directory}."""
    paths = {f"adapter-{index}": str(root / f"adapter-{index}") for index in range(count)}
    for index, path in enumerate(paths.values()):
        write_random_adapter(copy.deepcopy(model), Path(path), index, TARGETS, rank, 2 * rank, 0.02)
    return paths


def run_streams(engine, prompts, adapters, new_tokens) -> float:
    """Tokens/s of all prompts streamed at once, prompt i with adapters[i]."""
    sampling = SamplingConfig(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)

    async def one(prompt, adapter):
        count = 0
        async for delta in engine.stream(engine.make_request(prompt, sampling, adapter=adapter)):
            count += len(delta.token_ids)
        return count

    async def run_all():
        return await asyncio.gather(*(one(p, a) for p, a in zip(prompts, adapters)))

    start = time.perf_counter()
    counts = asyncio.run(run_all())
    elapsed = time.perf_counter() - start
    assert sum(counts) == new_tokens * len(prompts)
    return sum(counts) / elapsed


def bench_model(label, model, tokenizer, args, root: Path) -> dict:
    paths = write_adapters(model, args.adapters, args.rank, root / label)
    prompts = make_prompts(tokenizer, args.num_requests)
    plain = TransformersEngine(model, tokenizer, EngineConfig(max_num_seqs=len(prompts)))
    wrapped = copy.deepcopy(model)
    lora = TransformersEngine(wrapped, tokenizer, EngineConfig(max_num_seqs=len(prompts)),
                              adapters=attach_adapters(wrapped, paths))
    names = list(paths)
    runs = {
        METHODS[0]: (plain, [None] * len(prompts)),
        METHODS[1]: (lora, [None] * len(prompts)),
        METHODS[2]: (lora, [names[0]] * len(prompts)),
        METHODS[3]: (lora, [names[i % len(names)] for i in range(len(prompts))]),
    }
    for engine in (plain, lora):
        engine.start()
        run_streams(engine, prompts[:2], [None, None], 4)  # warm-up
    samples: dict[str, list[float]] = {method: [] for method in METHODS}
    try:
        for _ in range(args.repeats):
            for method, (engine, adapters) in runs.items():
                samples[method].append(run_streams(engine, prompts, adapters, args.new_tokens))
    finally:
        plain.shutdown()
        lora.shutdown()
    medians = {method: statistics.median(values) for method, values in samples.items()}
    row = {"model": label, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
           "adapter_params_m": round(sum(b.numel() for m in wrapped.modules() if hasattr(m, "lora_a")
                                         for b in (m.lora_a[1], m.lora_b[1])) / 1e6, 2),
           "tok_s": {m: round(v, 1) for m, v in medians.items()}, "runs": samples}
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,100m", help="tiny (r1-tiny) and/or 100m (a random ~100M Qwen2)")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--json", help="also write the results (bench/contract.py format) to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tiny, tokenizer = load_model(ModelConfig(model="r1-tiny", device="cpu", dtype="fp32"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="r1-bench-lora-") as tmp:
        for label in [m.strip() for m in args.models.split(",") if m.strip()]:
            if label not in ("tiny", "100m"):
                raise SystemExit(f"--models: unknown model {label!r}; use tiny and/or 100m")
            model = tiny if label == "tiny" else build_100m(tokenizer)
            rows.append(bench_model(label, model, tokenizer, args, Path(tmp)))
    return finish(contract_result(args, argv, rows), args.json)


def contract_result(args: argparse.Namespace, argv: list[str] | None, rows: list[dict]) -> dict:
    names = {"tiny": "r1-tiny", "100m": "random Qwen2"}
    table_rows = []
    notes = []
    for row in rows:
        base = row["tok_s"][METHODS[0]]
        for method in METHODS:
            value = row["tok_s"][method]
            table_rows.append([names[row["model"]], f"{row['params_m']} M", method, value, f"{value / base:.2f}×"])
        notes.append(f"{names[row['model']]}: {row['adapter_params_m']} M parameters per adapter; requests spread over "
                     f"{args.adapters} adapters run at {row['tok_s'][METHODS[3]] / base:.2f}× the plain model, base "
                     f"requests beside loaded adapters at {row['tok_s'][METHODS[1]] / base:.2f}×")
    return {
        "benchmark": "lora",
        "title": "LoRA adapters beside the base model",
        "command": command_line("lora", argv),
        "baseline": "The same engine and model with no adapters loaded, same prompts, rounds interleaved in the same run.",
        "tables": [{
            "title": f"{args.num_requests} streams × {args.new_tokens} tokens, {args.adapters} adapters of rank "
                     f"{args.rank} on every decoder Linear layer, {args.threads} torch threads, medians of {args.repeats}",
            "columns": ["model", "params", "requests", "tok/s", "vs no adapters"],
            "rows": table_rows,
        }],
        "notes": notes,
        "raw": rows,
    }


if __name__ == "__main__":
    main()
