"""CPU speed options of the transformers engine: bf16, int8, prepack, torch.compile, SDPA vs eager attention.

On r1-tiny and on the ~100M-parameter random Qwen2 of `bench.engine`, with the same prompts,
`--num-requests` requests x `--new-tokens` new tokens (greedy, EOS ignored) go through the engine
(`generate_batch`, all requests in one batch) for each variant:

- fp32: the baseline; bf16: the model cast to bfloat16 (`dtype: bf16`);
- int8: `quantization: int8` (int8 Linear layers, LM head kept in fp32);
- compile: fp32 with `compile: true` (decode steps through torch.compile, inductor);
- prepack / bf16-prepack: fp32 / bf16 with `prepack: true` (oneDNN Linear layers, weights packed once).

Variants run interleaved (fp32, bf16, int8, compile, fp32, ...) `--repeats` times; tables show
medians and every ratio is to fp32 measured in the same run. Per-step decode latency is the time of
the runner's batched decode forward with every request running (one token per request).

Also measured: r1-tiny's arithmetic exact match (level 1, held-out split) for fp32 / bf16 / int8;
peak memory of one batched prefill at a long context with SDPA and with eager attention (one child
process per variant, see `attention_probe`); the achieved batched-decode FLOP/s of the 100M model
against the peak matmul throughput of the same dtype (best of a few 2048³ matmuls, each with
torch's default GEMM and with oneDNN's packed Linear, the faster counting), measured right
before and right after each of its runs: this kind of machine's speed drifts by up to 1.5x within
minutes, so a step and a peak measured apart would mostly compare two machine states (the
percentage against the run's best peak is shown too); and the 100M model's fp32 decode step at
longer contexts with the engine's KV cache (grown in place, `GrowingLayer`) against transformers'
concatenating cache, stepped alternately from one prefill (`--kv-contexts`).

    python -m bench.cpu_speed [--models tiny,100m] [--repeats 3] [--threads 1] [--json PATH]

The compile variant's warm-up column is a cold compile: the run uses a fresh inductor cache
directory unless TORCHINDUCTOR_CACHE_DIR is set (a warm on-disk cache roughly halves it).

`--threads` sets torch's CPU threads for everything measured (peak matmul included). On a machine
shared with other work, one thread gives steady numbers; more threads than idle cores make OpenMP
wait on descheduled threads and every step slows down by a large, random factor.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.contract import command_line, finish, ratio, target_note  # noqa: E402
from bench.engine import build_100m, make_prompts  # noqa: E402
from r1.config import EngineConfig, ModelConfig, SamplingConfig  # noqa: E402
from r1.engine import TransformersEngine  # noqa: E402
from r1.engine.optimize import (  # noqa: E402
    Int8DynamicLinear,
    apply_engine_options,
    prepack_applies,
    prepack_unsupported,
)
from r1.model import load_model  # noqa: E402

VARIANTS = {
    # name: (dtype the model is cast to, engine options applied to it)
    "fp32": (torch.float32, EngineConfig(prepack=False)),
    "bf16": (torch.bfloat16, EngineConfig(prepack=False)),
    "int8": (torch.float32, EngineConfig(quantization="int8")),
    "compile": (torch.float32, EngineConfig(compile=True)),
    "prepack": (torch.float32, EngineConfig(prepack=True)),
    "bf16-prepack": (torch.bfloat16, EngineConfig(prepack=True)),
}
# The matmul dtype whose peak each variant is compared with (int8 keeps its LM head in fp32).
PEAK_DTYPE = {"fp32": "fp32", "bf16": "bf16", "int8": "int8", "compile": "fp32", "prepack": "fp32", "bf16-prepack": "bf16"}
DECODE_TARGET_PERCENT = 30.0
# A peak measurement stops after this many seconds of matmuls (its best try so far counts).
PEAK_BUDGET_S = 10.0
# Eager variants in the larger-batch sweep, and those the >= 30 %-of-peak target is checked for.
SWEEP_VARIANTS = ("fp32", "bf16", "int8", "prepack", "bf16-prepack")
TARGET_VARIANTS = ("fp32", "bf16", "prepack", "bf16-prepack")


# -- machine ---------------------------------------------------------------------------------------
def default_fp32_variant() -> str:
    """The variant `EngineConfig()` runs an fp32 CPU model as on this machine: `prepack` where
    `prepack: auto` packs it, else `fp32`."""
    return "prepack" if prepack_applies(nn.Sequential(nn.Linear(8, 8)), EngineConfig()) else "fp32"


def cpu_features() -> dict[str, Any]:
    """AMX / AVX-512 flags from /proc/cpuinfo and torch's own view of the CPU."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx_flags": sorted(f for f in flags if f.startswith("amx")),
        "avx512_bf16": "avx512_bf16" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "bf16_matmul_kernel": bf16_matmul_kernel(),
        # What the engine's default options (`prepack: auto`) make of an fp32 CPU model here.
        "default_fp32_variant": default_fp32_variant(),
    }


def bf16_matmul_kernel() -> str:
    """The oneDNN kernel a bf16 Linear runs on here (e.g. 'brg_matmul:avx10_1_512_amx' means AMX)."""
    code = ("import torch; l = torch.nn.Linear(256, 256).bfloat16(); x = torch.randn(16, 256).bfloat16()\n"
            "with torch.inference_mode(): l(x)")
    try:
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ONEDNN_VERBOSE": "1"},
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown ({type(error).__name__})"
    for line in out.stdout.splitlines():
        parts = line.split(",")
        if len(parts) > 6 and parts[2] == "primitive" and parts[3] == "exec":
            return parts[6]
    return "not oneDNN (no verbose line)"


def peak_matmul_gflops(dtype: str, size: int, tries: int) -> float:
    """Best GFLOP/s (GOP/s for int8) of one size x size x size matmul over `tries` runs, fewer when they
    take more than PEAK_BUDGET_S together (bf16 without AVX-512 kernels: about a minute per matmul).

    fp32 and bf16 take the faster of two kernels: torch's default GEMM (`a @ b`) and oneDNN's Linear
    on a packed weight (what `prepack: true` runs). On an AMD EPYC with AVX-512, torch's default
    fp32 GEMM reached 111 GFLOP/s on one core and oneDNN's 216 (`tests/test_bench_cpu_speed.py`
    checks the peak is the faster one), so the default alone understated the core's peak by half
    and let the packed decode steps exceed "the peak"."""
    if dtype == "int8":
        a = torch.randint(-127, 127, (size, size), dtype=torch.int8)
        b = torch.randint(-127, 127, (size, size), dtype=torch.int8)
        return _best_gflops(lambda: torch._int_mm(a, b.t()), size, tries)
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    a, b = torch.randn(size, size, dtype=torch_dtype), torch.randn(size, size, dtype=torch_dtype)
    best = _best_gflops(lambda: a @ b, size, tries)
    if prepack_unsupported(torch_dtype) is None:
        packed = torch.ops.mkldnn._reorder_linear_weight(b, size)
        best = max(best, _best_gflops(
            lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""), size, tries))
    return best


def _best_gflops(product: Callable[[], torch.Tensor], size: int, tries: int) -> float:
    start = time.perf_counter()
    product()  # the first call sets up the kernels; it counts only when it alone exceeds the budget
    first = time.perf_counter() - start
    if first > PEAK_BUDGET_S:
        return 2 * size**3 / first / 1e9
    best, spent = float("inf"), 0.0
    for _ in range(tries):
        start = time.perf_counter()
        product()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent > PEAK_BUDGET_S:
            break
    return 2 * size**3 / best / 1e9


def peaked(dtype: str, args: argparse.Namespace, measure: Callable[[], dict[str, Any]],
           peaks: dict[str, list[float]]) -> dict[str, Any]:
    """`measure()` with the peak matmul throughput of `dtype` measured right before and right after it.

    The result gets `peak_gflops`, the mean of the two. A shared machine's speed drifts by up to 1.5x
    within minutes, so the ratio of a step and a peak measured minutes apart mostly measures the
    drift. Both peaks are also appended to `peaks[dtype]` (the run's best peak is reported too).
    """
    before = peak_matmul_gflops(dtype, args.peak_size, args.peak_tries)
    result = measure()
    after = peak_matmul_gflops(dtype, args.peak_size, args.peak_tries)
    peaks.setdefault(dtype, []).extend([before, after])
    return {**result, "peak_gflops": (before + after) / 2}


# -- models ----------------------------------------------------------------------------------------
def matmul_weights(model: nn.Module) -> int:
    """Weights that take part in a matmul per token: every Linear (int8 ones too), LM head included."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += module.in_features * module.out_features
        elif isinstance(module, Int8DynamicLinear):
            total += module.in_features * module.out_features
    return total


def make_variant(base: nn.Module, name: str) -> nn.Module:
    dtype, options = VARIANTS[name]
    model = copy.deepcopy(base).to(dtype)
    return apply_engine_options(model, options).eval()


def run_engine(model: nn.Module, tokenizer: Any, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """One batch through the engine: tokens/s, per-step decode latency at full batch, the tokens."""
    engine = TransformersEngine(model, tokenizer, EngineConfig(max_num_seqs=len(prompts)))
    step_times: list[float] = []
    plain_step = engine.runner.step

    def timed_step(seq_ids: list[str], token_ids: list[int]) -> torch.Tensor:
        start = time.perf_counter()
        logits = plain_step(seq_ids, token_ids)
        if len(seq_ids) == len(prompts):
            step_times.append(time.perf_counter() - start)
        return logits

    engine.runner.step = timed_step
    sampling = SamplingConfig(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    completions = engine.generate_batch(prompts, sampling)
    elapsed = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for c in completions)
    assert tokens == new_tokens * len(prompts)
    return {"tok_s": tokens / elapsed, "step_s": statistics.median(step_times) if step_times else float("nan"),
            "elapsed_s": elapsed, "tokens": [c.token_ids for c in completions]}


def bench_model(name: str, base: nn.Module, tokenizer: Any, args: argparse.Namespace,
                peaks: dict[str, list[float]]) -> dict[str, Any]:
    prompts = make_prompts(tokenizer, args.num_requests)
    variants = [v for v in args.variants.split(",") if v]
    models, first_call_s = {}, {}
    for variant in variants:
        models[variant] = make_variant(base, variant)
        start = time.perf_counter()  # warm-up at full batch: compile's graphs are built here
        run_engine(models[variant], tokenizer, prompts, args.warmup_tokens)
        first_call_s[variant] = time.perf_counter() - start
        print(f"  {name} {variant}: warm-up ({args.num_requests} x {args.warmup_tokens} tokens) "
              f"{first_call_s[variant]:.1f} s", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for _ in range(max(1, args.repeats)):
        for variant in variants:
            measure = functools.partial(run_engine, models[variant], tokenizer, prompts, args.new_tokens)
            # The 100M model's decode is compared with the peak matmul: measured around each run.
            runs[variant].append(peaked(PEAK_DTYPE[variant], args, measure, peaks) if name == "100m" else measure())
    sweep = decode_sweep(models, tokenizer, args, peaks) if name == "100m" else []
    reference = runs["fp32"][0]["tokens"] if "fp32" in runs else None
    rows = {}
    for variant, values in runs.items():
        tokens = values[0]["tokens"]
        same = (sum(a == b for a, b in zip(tokens, reference)) / len(tokens)) if reference else float("nan")
        rows[variant] = {
            "tok_s": statistics.median(v["tok_s"] for v in values),
            "step_ms": 1e3 * statistics.median(v["step_s"] for v in values),
            "first_call_s": first_call_s[variant],
            "same_tokens_as_fp32": same,
            "tok_s_runs": [round(v["tok_s"], 1) for v in values],
            "step_ms_runs": [round(1e3 * v["step_s"], 2) for v in values],
        }
        if "peak_gflops" in values[0]:
            rows[variant]["peak_gflops_runs"] = [round(v["peak_gflops"], 2) for v in values]
    return {"model": name, "params_m": sum(p.numel() for p in base.parameters()) / 1e6,
            "matmul_weights": matmul_weights(base), "variants": rows, "sweep": sweep}


def decode_sweep(models: dict[str, nn.Module], tokenizer: Any, args: argparse.Namespace,
                 peaks: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Decode-step latency at larger batches (the 100M model, eager variants): when does it get compute-bound?"""
    rows = []
    for batch in [int(b) for b in args.decode_batches.split(",") if b]:
        prompts = make_prompts(tokenizer, batch)
        for variant in SWEEP_VARIANTS:
            if variant not in models:
                continue
            measure = functools.partial(run_engine, models[variant], tokenizer, prompts, args.sweep_tokens)
            runs = [peaked(PEAK_DTYPE[variant], args, measure, peaks) for _ in range(max(1, args.repeats))]
            rows.append({"batch": batch, "variant": variant,
                         "step_ms": 1e3 * statistics.median(r["step_s"] for r in runs),
                         "step_ms_runs": [round(1e3 * r["step_s"], 2) for r in runs],
                         "peak_gflops_runs": [round(r["peak_gflops"], 2) for r in runs]})
            print(f"  100m decode batch {batch} {variant}: step {rows[-1]['step_ms']:.1f} ms", flush=True)
    return rows


def _concatenating_copy(kv: Any) -> Any:
    """A copy of a BatchedKVCache whose layers are transformers' concatenating DynamicLayers."""
    from transformers.cache_utils import DynamicLayer

    from r1.engine.runner import BatchedKVCache, new_cache

    copy_kv = BatchedKVCache()
    copy_kv.cache = new_cache(growing=False)
    for layer in kv.cache.layers:
        plain = DynamicLayer()
        plain.lazy_initialization(layer.keys, layer.values)
        plain.keys, plain.values = layer.keys.clone(), layer.values.clone()
        copy_kv.cache.layers.append(plain)
    copy_kv.mask, copy_kv.positions, copy_kv.order = kv.mask.clone(), kv.positions.clone(), list(kv.order)
    return copy_kv


def kv_cache_growth(model: nn.Module, tokenizer: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Decode-step latency of the 100M model (fp32) at each context of `--kv-contexts`, with the
    engine's in-place KV cache and with a concatenating one: one prefill, the cache copied into
    concatenating layers, then `--kv-steps` steps of each, alternating (first step of each pair
    rotating), on the same tokens; medians. Both must give the same logits."""
    from r1.engine.runner import LocalModelRunner

    rows = []
    for context in [int(c) for c in args.kv_contexts.split(",") if c]:
        generator = torch.Generator().manual_seed(context)
        prompts = torch.randint(8, tokenizer.vocab_size, (args.num_requests, context), generator=generator).tolist()
        seq_ids = [f"s{i}" for i in range(args.num_requests)]
        growing = LocalModelRunner(model, tokenizer.pad_token_id, growing_cache=True)
        tokens = growing.add(seq_ids, prompts).argmax(-1).tolist()
        concatenating = LocalModelRunner(model, tokenizer.pad_token_id, growing_cache=False)
        concatenating.kv = _concatenating_copy(growing.kv)
        times: dict[str, list[float]] = {"growing": [], "concatenating": []}
        runners = {"growing": growing, "concatenating": concatenating}
        for step in range(args.kv_steps + 2):
            outputs = {}
            for name in (("growing", "concatenating") if step % 2 else ("concatenating", "growing")):
                start = time.perf_counter()
                outputs[name] = runners[name].step(seq_ids, tokens)
                if step >= 2:  # two warm-up steps (the growing cache's first step moves the prefill in)
                    times[name].append(time.perf_counter() - start)
            if not torch.equal(outputs["growing"], outputs["concatenating"]):
                raise AssertionError(f"KV cache variants disagree at context {context}, step {step}")
            tokens = outputs["growing"].argmax(-1).tolist()
        row = {"context": context, "batch": args.num_requests,
               **{f"{name}_ms": 1e3 * statistics.median(t) for name, t in times.items()}}
        rows.append(row)
        print(f"  100m KV cache at context {context}: step {row['growing_ms']:.1f} ms in place vs "
              f"{row['concatenating_ms']:.1f} ms concatenating", flush=True)
        del growing, concatenating
        gc.collect()
    return rows


def tiny_accuracy(base: nn.Module, tokenizer: Any, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from r1.train.evaluate import evaluate_arithmetic

    results = {}
    for variant in ("fp32", "bf16", "int8"):
        model = make_variant(base, variant)
        start = time.perf_counter()
        result = evaluate_arithmetic(model, tokenizer, num_problems=args.eval_problems, level=1)
        results[variant] = {"accuracy": result.accuracy, "format_rate": result.format_rate,
                            "seconds": time.perf_counter() - start}
        print(f"  r1-tiny arithmetic level 1 ({args.eval_problems} problems) {variant}: "
              f"exact match {result.accuracy:.3f}, format {result.format_rate:.3f}", flush=True)
    return results


# -- attention memory ------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Set this process's RSS high-water mark (VmHWM) back to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def attention_probe(attn: str, batch: int, context: int, threads: int | None) -> dict[str, Any]:
    """Peak memory one batched prefill adds, in a fresh process: VmHWM after minus RSS before.

    Why this measures the attention's activations: the model, the tokenizer and a warm-up forward are
    resident before the measurement starts, and the high-water mark is reset to the current RSS
    then; the prefill runs through the engine's runner (logits for the last position only), so what
    it adds at its peak is the KV cache it keeps, the transient activations of one layer, and, with
    eager attention, the [batch, heads, context, context] score and probability matrices that SDPA's
    fused kernel never builds. Large blocks come from mmap and go back to the OS when freed, and
    the high-water mark still sees them. Where the mark cannot be reset, ru_maxrss is used and
    `measurement_valid` says whether the prefill's peak rose above the model load's.
    """
    from r1.engine.runner import LocalModelRunner
    from r1.model import load_tokenizer

    if threads:
        torch.set_num_threads(threads)
    tokenizer = load_tokenizer(ModelConfig())
    model = build_100m(tokenizer)
    model.set_attn_implementation(attn)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(8, tokenizer.vocab_size, (batch, context), generator=generator).tolist()
    LocalModelRunner(model, tokenizer.pad_token_id).add(["w"], [prompts[0][:16]])  # warm-up
    gc.collect()
    reset = _reset_peak_rss()
    rss_before_kb = _status_kb("VmRSS")
    maxrss_before_kb = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runner = LocalModelRunner(model, tokenizer.pad_token_id)
    start = time.perf_counter()
    runner.add([f"s{i}" for i in range(batch)], prompts)
    seconds = time.perf_counter() - start
    peak_kb = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    kv_cache = 2 * config.num_hidden_layers * batch * config.num_key_value_heads * context * head_dim * 4
    return {
        "attn": attn, "batch": batch, "context": context, "prefill_s": seconds,
        "peak_added_mb": (peak_kb - rss_before_kb) / 1024,
        "method": "VmHWM reset via /proc/self/clear_refs" if reset else "ru_maxrss",
        "measurement_valid": peak_kb > maxrss_before_kb,
        "kv_cache_mb": kv_cache / 2**20,
        "one_score_matrix_mb": batch * config.num_attention_heads * context * context * 4 / 2**20,
    }


def attention_memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for attn in ("sdpa", "eager"):
        command = [sys.executable, "-m", "bench.cpu_speed", "--attention-probe", attn,
                   "--probe-batch", str(args.probe_batch), "--probe-context", str(args.probe_context)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        # A fixed mmap threshold: glibc otherwise raises it after each large free, keeps later blocks
        # in the heap, and the high-water mark then depends on allocation history (±50 % run to run).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env,
                             cwd=Path(__file__).resolve().parents[1])
        if out.returncode != 0:
            raise RuntimeError(f"attention probe {attn} failed: {out.stderr[-2000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(result)
        print(f"  attention {attn}: prefill {args.probe_batch} x {args.probe_context} tokens adds "
              f"{result['peak_added_mb']:.0f} MB at peak ({result['prefill_s']:.1f} s)", flush=True)
    return results


# -- report ----------------------------------------------------------------------------------------
def build_result(args: argparse.Namespace, argv: list[str] | None, features: dict[str, Any],
                 models: list[dict[str, Any]], peaks: dict[str, float], accuracy: dict[str, Any] | None,
                 attention: list[dict[str, Any]] | None, kv_growth: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    tables, notes = [], []
    speed_rows = []
    for entry in models:
        fp32 = entry["variants"].get("fp32")
        for variant, row in entry["variants"].items():
            speed_rows.append([
                entry["model"], variant, round(row["tok_s"], 1), ratio(row["tok_s"] / fp32["tok_s"]) if fp32 else "-",
                round(row["step_ms"], 2), ratio(fp32["step_ms"] / row["step_ms"]) if fp32 else "-",
                round(row["first_call_s"], 1), f"{100 * row['same_tokens_as_fp32']:.0f} %",
            ])
    tables.append({
        "title": f"Engine speed per option ({args.num_requests} requests x {args.new_tokens} new tokens, "
                 f"{args.threads or torch.get_num_threads()} thread(s), medians of {args.repeats})",
        "columns": ["model", "variant", "tok/s", "tok/s vs fp32", "decode step ms", "step speed-up vs fp32",
                    "warm-up s (compile included)", "same tokens as fp32"],
        "rows": speed_rows,
    })
    peak_rows = []

    def peak_row(label: str, variant: str, step_ms_runs: list[float], peak_runs: list[float], batch: int,
                 tok_s_runs: list[float] | None, flops_per_token: float, target: bool) -> None:
        """One row of the FLOP/s table, and the target's note: the median % of the peak measured around each run."""
        dtype = PEAK_DTYPE[variant]
        step_flops = [flops_per_token * batch / (ms / 1e3) / 1e9 for ms in step_ms_runs]
        paired = [100 * f / p for f, p in zip(step_flops, peak_runs)]
        peak, flops, percent = statistics.median(peak_runs), statistics.median(step_flops), statistics.median(paired)
        e2e_flops = round(flops_per_token * statistics.median(tok_s_runs) / 1e9, 1) if tok_s_runs else "-"
        row = [label, dtype, round(peak, 1), round(flops, 1)]
        if max(paired) > 100:
            # The big matmul ran slower than the decode's own: this CPU has no fast kernel for it
            # (bf16 or int8 without AVX-512/AMX), so the figure is no peak and no percentage is shown.
            peak_rows.append(row + ["- (no peak)", "-", "-", e2e_flops, "-"])
            if target:
                notes.append(f"100M batched decode at batch {batch}, {variant}: not measurable on this CPU, whose "
                             f"{args.peak_size}³ {dtype} matmul ({peak:.1f} GFLOP/s) is slower than the decode's own "
                             f"matmuls ({flops:.1f} GFLOP/s), so it is no peak (no fast {dtype} GEMM kernel here)")
            return
        of_best = 100 * flops / peaks[dtype]
        spread = f"{min(paired):.1f} – {max(paired):.1f} %"
        e2e = [100 * flops_per_token * t / 1e9 / p for t, p in zip(tok_s_runs, peak_runs)] if tok_s_runs else []
        peak_rows.append(row + [f"{percent:.1f} %", spread, f"{of_best:.1f} %", e2e_flops,
                                f"{statistics.median(e2e):.1f} %" if e2e else "-"])
        if target:
            notes.append(target_note(f"100M batched decode at batch {batch}, {variant}, % of the {dtype} peak matmul "
                                     "measured around the same runs (median)", percent, DECODE_TARGET_PERCENT, unit="%")
                         + f"; runs {spread}, {of_best:.1f} % of the run's best peak")
            if variant == features.get("default_fp32_variant") and batch == args.num_requests:
                how = "packs it on this CPU" if variant == "prepack" else "leaves it unpacked on this CPU"
                notes.append(target_note(f"the default engine options (an fp32 model; `prepack: auto`, which {how}) "
                                         f"decode as the {variant} variant: 100M batched decode at batch {batch}, % of "
                                         "the fp32 peak matmul (median)", percent, DECODE_TARGET_PERCENT, unit="%"))

    for entry in models:
        if entry["model"] != "100m":
            continue
        flops_per_token = 2 * entry["matmul_weights"]
        for variant, row in entry["variants"].items():
            peak_row(f"{variant} (batch {args.num_requests}, {args.new_tokens} tokens)", variant, row["step_ms_runs"],
                     row["peak_gflops_runs"], args.num_requests, row["tok_s_runs"], flops_per_token,
                     variant in TARGET_VARIANTS)
        for row in entry.get("sweep") or []:
            peak_row(f"{row['variant']} (batch {row['batch']}, {args.sweep_tokens} tokens)", row["variant"],
                     row["step_ms_runs"], row["peak_gflops_runs"], row["batch"], None, flops_per_token,
                     row["variant"] in TARGET_VARIANTS and row["batch"] != args.num_requests)
    if peak_rows:
        tables.append({
            "title": "100M model: batched decode FLOP/s vs peak matmul FLOP/s of the same dtype, the peak measured "
                     "right before and after each run (FLOP per token = 2 x weights of all Linear layers incl. LM head; "
                     f"medians of {args.repeats} runs)",
            "columns": ["variant", "peak dtype", f"peak GFLOP/s ({args.peak_size}³ matmul, around the runs)",
                        "decode-step GFLOP/s", "% of peak (decode step, paired)", "paired, range over runs",
                        "% of the run's best peak (decode step)", "end-to-end GFLOP/s", "% of peak (end-to-end, paired)"],
            "rows": peak_rows,
        })
    if accuracy:
        fp32_acc = accuracy["fp32"]["accuracy"]
        tables.append({
            "title": f"r1-tiny arithmetic exact match, level 1, {args.eval_problems} held-out problems (greedy)",
            "columns": ["variant", "exact match", "format rate", "change vs fp32 (points)"],
            "rows": [[v, round(r["accuracy"], 3), round(r["format_rate"], 3), round(100 * (r["accuracy"] - fp32_acc), 1)]
                     for v, r in accuracy.items()],
        })
        for variant in ("bf16", "int8"):
            if variant in accuracy:
                drop = 100 * (fp32_acc - accuracy[variant]["accuracy"])
                notes.append(f"r1-tiny exact match {variant} vs fp32: {accuracy[variant]['accuracy']:.3f} vs "
                             f"{fp32_acc:.3f} ({-drop:+.1f} points)")
    if attention:
        sdpa = next(a for a in attention if a["attn"] == "sdpa")
        tables.append({
            "title": f"100M model: peak memory of one prefill, batch {args.probe_batch} x context {args.probe_context} "
                     "(child process per variant: RSS high-water mark after - RSS before)",
            "columns": ["attention", "peak added MB", "vs sdpa", "prefill s", "KV cache MB (kept)",
                        "one layer's score matrix MB", "measurement valid"],
            "rows": [[a["attn"], round(a["peak_added_mb"]), ratio(a["peak_added_mb"] / sdpa["peak_added_mb"]),
                      round(a["prefill_s"], 2), round(a["kv_cache_mb"]), round(a["one_score_matrix_mb"]),
                      a["measurement_valid"]] for a in attention],
        })
    if kv_growth:
        tables.append({
            "title": f"100M model, fp32: decode step with the KV cache grown in place vs concatenated "
                     f"(batch {args.num_requests}, {args.kv_steps} alternating steps, medians)",
            "columns": ["context (tokens)", "in place (GrowingLayer) ms", "concatenating (DynamicLayer) ms", "speed-up"],
            "rows": [[r["context"], round(r["growing_ms"], 1), round(r["concatenating_ms"], 1),
                      ratio(r["concatenating_ms"] / r["growing_ms"])] for r in kv_growth],
        })
    tables.append({
        "title": "CPU",
        "columns": ["torch CPU capability", "AMX flags", "avx512_bf16", "avx512_vnni", "bf16 matmul kernel (oneDNN)"],
        "rows": [[features["torch_cpu_capability"], " ".join(features["amx_flags"]) or "none",
                  features["avx512_bf16"], features["avx512_vnni"], features["bf16_matmul_kernel"]]],
    })
    notes.append(f"measured with {args.threads or torch.get_num_threads()} CPU thread(s); the machine's load average "
                 "is in `machine` (a shared machine makes single runs noisy, hence medians of interleaved runs)")
    return {
        "benchmark": "cpu_speed",
        "title": "CPU speed options: bf16, int8, prepack, torch.compile, SDPA vs eager",
        "command": command_line("cpu_speed", argv),
        "baseline": "The same engine on the same model in fp32, eager, no quantization, measured in the same run.",
        "tables": tables,
        "notes": notes,
        "raw": {"features": features, "models": models, "peaks_gflops": peaks, "accuracy": accuracy,
                "attention": attention, "kv_growth": kv_growth, "threads": args.threads or torch.get_num_threads(),
                "platform": platform.platform()},
    }


def print_tables(result: dict[str, Any]) -> None:
    for table in result["tables"]:
        print(f"\n{table['title']}")
        widths = [max(len(str(c)), *(len(str(r[i])) for r in table["rows"])) for i, c in enumerate(table["columns"])]
        print("  " + " | ".join(str(c).ljust(w) for c, w in zip(table["columns"], widths)))
        for row in table["rows"]:
            print("  " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    for note in result["notes"]:
        print(f"- {note}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,100m", help="comma list of: tiny, 100m")
    parser.add_argument("--variants", default="fp32,bf16,int8,compile,prepack,bf16-prepack",
                        help="comma list of: " + ", ".join(VARIANTS))
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--warmup-tokens", type=int, default=8, help="tokens of the untimed first run per variant")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per variant; medians are reported")
    parser.add_argument("--eval-problems", type=int, default=200, help="r1-tiny arithmetic problems; 0 skips")
    parser.add_argument("--probe-batch", type=int, default=4, help="attention memory: prefill batch; 0 skips")
    parser.add_argument("--probe-context", type=int, default=1024, help="attention memory: prompt tokens per row")
    parser.add_argument("--decode-batches", default="64",
                        help="100M model: extra decode batch sizes for the FLOP/s table (comma list; empty skips)")
    parser.add_argument("--sweep-tokens", type=int, default=16, help="new tokens per request in that sweep")
    parser.add_argument("--kv-contexts", default="128,1024",
                        help="100M model: contexts for the in-place vs concatenating KV cache table (comma list; empty skips)")
    parser.add_argument("--kv-steps", type=int, default=16, help="timed decode steps per KV cache variant and context")
    parser.add_argument("--peak-size", type=int, default=2048, help="side of the square peak-throughput matmul")
    parser.add_argument("--peak-tries", type=int, default=3, help="peak matmul runs per round (best counts)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--attention-probe", choices=["sdpa", "eager"], help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the result (bench JSON contract) to this file")
    args = parser.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; use some of {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.attention_probe:  # child process of attention_memory
        result = attention_probe(args.attention_probe, args.probe_batch, args.probe_context, args.threads)
        print(json.dumps(result))
        return result
    fresh_cache = None
    if "compile" in args.variants and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        # A fresh kernel cache: the warm-up column shows a cold compile, not one served from earlier runs.
        fresh_cache = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="r1-bench-inductor-")
    try:
        result = run(args, argv)
    finally:
        if fresh_cache:
            shutil.rmtree(fresh_cache, ignore_errors=True)
            del os.environ["TORCHINDUCTOR_CACHE_DIR"]
    print_tables(result)
    return finish(result, args.json)


def run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    features = cpu_features()
    print(f"CPU: torch capability {features['torch_cpu_capability']}, AMX flags {features['amx_flags'] or 'none'}, "
          f"bf16 matmul kernel {features['bf16_matmul_kernel']}, {torch.get_num_threads()} thread(s)", flush=True)
    # Variants this CPU cannot run (bf16 weight packing needs AVX-512 or AVX-NE-CONVERT) are left out, saying why.
    unavailable = {v: reason for v in args.variants.split(",") if v and VARIANTS[v][1].prepack
                   and (reason := prepack_unsupported(VARIANTS[v][0])) is not None}
    for variant, reason in unavailable.items():
        print(f"  {variant}: not run, this CPU cannot: {reason}", flush=True)
    args.variants = ",".join(v for v in args.variants.split(",") if v and v not in unavailable)
    peaks_runs: dict[str, list[float]] = {}  # every peak measured, per dtype (around the 100M model's runs)
    tiny, tokenizer = load_model(ModelConfig(device="cpu", dtype="fp32"))
    models = []
    kv_growth = None
    for name in args.models.split(","):
        base = tiny if name == "tiny" else build_100m(tokenizer)
        models.append(bench_model(name, base, tokenizer, args, peaks_runs))
        if name == "100m" and args.kv_contexts:
            kv_growth = kv_cache_growth(base, tokenizer, args)
    peaks = {d: max(v) for d, v in peaks_runs.items()}
    accuracy = tiny_accuracy(tiny, tokenizer, args) if args.eval_problems > 0 else None
    attention = attention_memory(args) if args.probe_batch > 0 else None
    result = build_result(args, argv, features, models, peaks, accuracy, attention, kv_growth)
    result["notes"].extend(f"{variant} not measured: this CPU cannot run it ({reason})" for variant, reason in unavailable.items())
    result["raw"]["peak_runs_gflops"] = peaks_runs
    return result


if __name__ == "__main__":
    main()
