#!/usr/bin/env bash
# Device checks for r1-cluster training on a machine with one NVIDIA GPU.
#
#   bash bench/gpu_check.sh            # from the repository root, in the project's Python environment
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh
#
# Prints PASS/FAIL per check (logs of failures are shown) and exits non-zero if any check failed:
#   nccl_allreduce      torch.distributed NCCL process group (torchrun, world size 1), all-reduce on the GPU
#   bf16_autocast_step  one SFT step of r1-tiny on the GPU under bf16 autocast (r1.train.precision)
#   deepspeed_zero2     one SFT step through r1's DeepSpeed strategy, ZeRO stage 2, bf16 (torchrun)
#   lora_bf16_step      SFT steps of r1-tiny with LoRA adapters on the GPU, bf16: only the adapters train, all move
#   reward_bf16_step    Bradley-Terry reward-model steps on the GPU, bf16, on generated preference pairs
#   ray_train_nccl_bf16 `r1 train sft` as a Ray Train job: 1 GPU worker, NCCL backend, bf16, 6 steps
#   ray_train_grpo_ds   `r1 train grpo` with DeepSpeed ZeRO-2 on the GPU worker, bf16, 2 steps
#   bench_training      bench/training.py (r1 GRPO vs TRL) on the GPU; informational, prints the ratio
#   first_batch         bench/first_batch.py: r1's engine's first 64-prompt batches after each warm-up, fp32
#                       and bf16, each in a fresh process, with the first batch's slowest steps and
#                       (after the sweep) its top operators; informational
#   engine_cuda         r1's own (transformers) engine on the GPU, 64 arithmetic prompts at once:
#                       fp32 greedy tokens vs one-sequence-at-a-time decoding with the model's own KV
#                       cache (PASS >= 58/64 equal), bf16 and bf16 + torch.compile accuracy vs fp32's
#                       (PASS within 0.1), tokens/s of each (after engine.warmup() and one untimed
#                       batch; the first batch after the warm-up is printed too), a stop string and an abort
#                       mid-stream freeing the request; fp32 structured output (an enum schema, 16/16 valid)
#                       and logprobs (within 1e-3 of a plain forward pass); guided choice/regex,
#                       allowed_token_ids, bad_words and thinking_token_budget on the GPU's logits
#   engine_lora_cuda    r1's engine on the GPU with two LoRA adapters beside the model (engine.lora_adapters):
#                       16 prompts each for the base model and both adapters streamed at once (mixed
#                       batches), greedy tokens vs each merged model's engine, fp32 (PASS >= 44/48 equal)
#                       and bf16 (printed), tokens/s of the mixed batch and of base requests alone
#   serve_gpu           `r1 serve` with its LLM-server replicas on the GPU (fp32, 0.25 GPU each), then with
#                       pipeline_stages=2 (ModelShard actors on the GPU): 16 concurrent greedy chat
#                       completions through the stock openai client vs the in-process engine's (PASS >= 14/16
#                       equal, reasoning_content split), a stream equal to its non-streamed answer with usage,
#                       and GPU memory grown by the replicas' CUDA contexts
# GPU engines, each printed as SKIP when its package is not importable (FP8 ones also below sm_89):
#   vllm_engine         engine=vllm through create_engine vs the transformers engine, greedy, r1-tiny:
#                       share of equal texts (PASS >= 0.75: both bf16, but the kernels differ), a
#                       stop string in a stream, an abort mid-stream freeing the request
#   vllm_fp8_engine     engine=vllm quantization=fp8: exact-match accuracy on 64 held-out arithmetic
#                       problems vs the transformers engine's (PASS within 0.15)
#   vllm_lora_engine    engine=vllm with two LoRA adapters (vLLM's multi-LoRA) vs r1's own engine serving the
#                       same adapters: 48 greedy chat answers (base and both adapters at once), PASS >= 0.75
#                       equal and the adapters changing answers
#   trtllm_engine       engine=trtllm, as vllm_engine
#   trtllm_fp8_engine   engine=trtllm quantization=fp8 (FP8 engine build, r1's offline calibration
#                       text), as vllm_fp8_engine
# NCCL cannot put two ranks on one GPU, so multi-rank NCCL needs a machine with >= 2 GPUs.
# Each check is stopped after CHECK_TIMEOUT seconds (default 300) and then counts as failed.
# ONLY="name name ..." runs only the checks named (e.g. ONLY="lora_bf16_step first_batch").
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LOGS=${LOG_DIR:-$(mktemp -d)}
RUNS=$(mktemp -d)
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/r1-cluster/torch_extensions}
CHECK_TIMEOUT=${CHECK_TIMEOUT:-300}
ONLY=${ONLY:-}
failed=0

selected() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }

check() {
  local name=$1 start=$SECONDS; shift
  selected "$name" || return 0
  if timeout -k 10 "$CHECK_TIMEOUT" "$@" >"$LOGS/$name.log" 2>&1; then
    echo "PASS $name ($((SECONDS - start)) s)"
  else
    echo "FAIL $name after $((SECONDS - start)) s (log: $LOGS/$name.log)"
    tail -n 25 "$LOGS/$name.log" | sed 's/^/    /'
    failed=1
  fi
}

cat >"$RUNS/nccl.py" <<'EOF'
import os, torch, torch.distributed as dist
dist.init_process_group("nccl")
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
x = torch.full((1024,), float(dist.get_rank() + 1), device="cuda")
dist.all_reduce(x)
expected = sum(range(1, dist.get_world_size() + 1))
assert torch.allclose(x, torch.full_like(x, expected)), x[:4]
print("nccl", torch.cuda.nccl.version(), "world", dist.get_world_size(), "ok")
dist.destroy_process_group()
EOF

cat >"$RUNS/step.py" <<'EOF'
"""Three training steps of r1-tiny in one process on the GPU, bf16: SFT (ddp or deepspeed), SFT with
LoRA adapters, or the Bradley-Terry reward model. R1_CHECK_DEVICE=cpu runs it without a GPU."""
import json, math, os, sys, tempfile
import torch
from r1.config import RewardTrainConfig, SFTTrainConfig, parse_config
from r1.tasks.arithmetic import generate_problems
from r1.train.reward_stage import RewardStage
from r1.train.sft import SFTStage
from r1.train.stage import WorkerInfo
variant = sys.argv[1]  # ddp | deepspeed | lora | reward
device = torch.device(os.environ.get("R1_CHECK_DEVICE", "cuda"), 0)
cfg = {"model": {"model": "r1-tiny"}, "precision": "bf16", "scaling": {"use_gpu": device.type == "cuda", "num_workers": 1},
       "data": {"task": "arithmetic", "num_examples": 64, "max_seq_len": 128}, "batch_size_per_worker": 8, "max_steps": 3}
if variant == "deepspeed":
    import torch.distributed as dist
    dist.init_process_group("nccl")
    cfg["strategy"] = {"name": "deepspeed", "zero_stage": 2}
if variant == "lora":
    cfg["lora"] = {"enabled": True}
if variant == "reward":
    # Preference pairs: the right answer after the reasoning is chosen over a wrong one.
    prefs = os.path.join(tempfile.mkdtemp(), "prefs.jsonl")
    with open(prefs, "w") as f:
        for p in generate_problems(64, level=1, seed=0, split="train"):
            answer = int(p.answer)
            f.write(json.dumps({"prompt": p.question, "chosen": f"{p.question} = {answer}</think>{answer}",
                                "rejected": f"{p.question} = {answer + 7}</think>{answer + 7}"}) + "\n")
    cfg["data"] = {"path": prefs, "eval_fraction": 0.25}
    stage = RewardStage(parse_config(RewardTrainConfig, cfg), WorkerInfo(device=device))
else:
    stage = SFTStage(parse_config(SFTTrainConfig, cfg), WorkerInfo(device=device))
module = stage.strategy.module
trainable = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
if variant != "reward":
    with stage.strategy.autocast():
        logits = stage.strategy.model(input_ids=torch.tensor([[0, 2, 5]], device=device)).logits
    assert logits.dtype == torch.bfloat16, logits.dtype
for step in range(3):
    m = stage.run_step(step)
    assert math.isfinite(m["loss"]), m
    print({k: round(v, 4) for k, v in m.items()})
moved = sum(not torch.equal(p.detach(), trainable[n]) for n, p in module.named_parameters() if n in trainable)
total = sum(1 for _ in module.parameters())
print(f"{variant}: {len(trainable)} of {total} parameter tensors trainable, {moved} changed by the steps")
if variant == "deepspeed":  # bf16 weights: an update below bf16's resolution can leave a tensor as it was
    assert moved > 0, moved
else:
    assert moved == len(trainable) > 0, (moved, len(trainable))
if variant == "lora":
    assert all("lora_" in n for n in trainable) and len(trainable) < total, sorted(trainable)[:4]
print(variant, "ok, peak memory MB", round(m["peak_memory_mb"], 1))
EOF

cat >"$RUNS/engine_checks.py" <<'EOF'
"""Shared by the engine scripts below: timing a batch, a stop string, an abort freeing its slot."""
import asyncio, time
import torch
from r1.config import SamplingConfig

def timed(engine, prompts, sampling):
    """The completions of one generate_batch call and its tokens/s (the GPU synchronized around it)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = engine.generate_batch(prompts, sampling)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return outs, sum(len(c.token_ids) for c in outs) / (time.perf_counter() - start)

async def stream_text(engine, prompt, sampling):
    deltas = [d async for d in engine.stream(prompt, sampling)]
    return "".join(d.text for d in deltas), deltas[-1]

def write_adapters(base):
    """Two LoRA adapters of `base` (other targets each, random A and B so they change answers) in a
    temporary directory: ({name: directory}, {name: the model with it merged})."""
    import copy, tempfile
    from peft import LoraConfig, get_peft_model
    root = tempfile.mkdtemp()
    paths, merged = {}, {}
    for index, targets in enumerate((["q_proj", "v_proj"], ["o_proj", "gate_proj", "down_proj"])):
        generator = torch.Generator().manual_seed(index)
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
        name = f"adapter{index}"
        paths[name] = f"{root}/{name}"
        peft_model.save_pretrained(paths[name])
        merged[name] = peft_model.merge_and_unload()
    return paths, merged

async def abort_frees(engine, prompt):
    stream = engine.stream(prompt, SamplingConfig(temperature=0, max_new_tokens=512, ignore_eos=True))
    for _ in range(3):
        await anext(stream)
    await stream.aclose()
    for _ in range(1000):  # 10 s
        if engine.stats()["running"] == 0:
            return True
        await asyncio.sleep(0.01)
    return False

def check_streams(engine, name, prompts, greedy, full):
    """A stop string ends a stream with the text cut before it; an abort mid-stream frees the request."""
    ok = True
    cut = full.find("</think>")
    if cut >= 0:
        text, last = asyncio.run(stream_text(engine, prompts[0], greedy.model_copy(update={"stop": ["</think>"]})))
        print(f"RESULT {name}: stop string: finish={last.finish_reason}, text cut before it: {text == full[:cut]}")
        ok = text == full[:cut] and last.finish_reason == "stop"
    freed = asyncio.run(abort_frees(engine, prompts[1]))
    print(f"RESULT {name}: abort mid-stream frees the request: {freed}")
    return ok and freed
EOF

cat >"$RUNS/engine_check.py" <<'EOF'
"""One GPU engine through r1's create_engine, against the transformers engine on r1-tiny."""
import sys
import torch
from r1.config import EngineConfig, ModelConfig, SamplingConfig
from r1.engine import create_engine
from r1.tasks.arithmetic import generate_problems, is_correct
from engine_checks import check_streams, timed

def main():
    name, quantization = sys.argv[1], sys.argv[2]
    if quantization == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        print("SKIP: FP8 needs compute capability >= 8.9")
        return 0
    problems = generate_problems(64, level=1, seed=0, split="test")
    prompts = [[{"role": "user", "content": p.question}] for p in problems]
    greedy = SamplingConfig(temperature=0, max_new_tokens=96)
    base = create_engine(ModelConfig(model="r1-tiny", device="cuda"), EngineConfig(max_num_seqs=64))
    reference, base_rate = timed(base, prompts, greedy)
    base.shutdown()
    del base
    torch.cuda.empty_cache()
    engine = create_engine(ModelConfig(model="r1-tiny"), EngineConfig(
        engine=name, quantization=quantization, max_num_seqs=64, gpu_memory_utilization=0.3))
    engine.generate_batch(prompts[:2], greedy)  # warm-up
    got, rate = timed(engine, prompts, greedy)
    accuracy = lambda outs: sum(is_correct(c.text, p.answer) for c, p in zip(outs, problems)) / len(problems)
    print(f"RESULT {name} {quantization}: accuracy {accuracy(got):.3f} (transformers {accuracy(reference):.3f}); "
          f"{rate:.0f} tokens/s (transformers {base_rate:.0f}), {len(prompts)} prompts at once")
    if quantization == "fp8":
        ok = accuracy(got) >= accuracy(reference) - 0.15
    else:
        same = sum(a.text == b.text for a, b in zip(got, reference))
        print(f"RESULT {name}: greedy texts equal to the transformers engine's: {same}/{len(got)}")
        ok = same >= 0.75 * len(got)
        ok = check_streams(engine, name, prompts, greedy, got[0].text) and ok
    engine.shutdown()
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
EOF

cat >"$RUNS/engine_lora.py" <<'EOF'
"""LoRA adapters served beside the model (r1/engine/lora.py) on the GPU: mixed batches vs merged models."""
import asyncio, copy, sys, time
import torch
from r1.config import EngineConfig, ModelConfig, SamplingConfig
from r1.engine import TransformersEngine
from r1.model import load_model
from r1.tasks.arithmetic import generate_problems
from engine_checks import write_adapters

device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
base_cpu, tokenizer = load_model(ModelConfig(model="r1-tiny", device="cpu", dtype="fp32"))
paths, merged_cpu = write_adapters(base_cpu)
prompts = [[{"role": "user", "content": p.question}] for p in generate_problems(16, level=1, seed=3, split="test")]
sampling = SamplingConfig(temperature=0, max_new_tokens=48, ignore_eos=True)
failed = False
for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    engine = TransformersEngine.from_config(ModelConfig(model="r1-tiny", device=device, dtype=dtype_name),
                                            EngineConfig(lora_adapters=paths))
    expected = {None: [c.token_ids for c in TransformersEngine(copy.deepcopy(base_cpu).to(device, dtype), tokenizer)
                       .generate_batch(prompts, sampling)]}
    for name, model in merged_cpu.items():
        expected[name] = [c.token_ids for c in TransformersEngine(copy.deepcopy(model).to(device, dtype), tokenizer)
                          .generate_batch(prompts, sampling)]
    combos = [(i, adapter) for adapter in (None, *paths) for i in range(len(prompts))]

    async def streams(pairs):
        async def one(i, adapter):
            request = engine.make_request(prompts[i], sampling, adapter=adapter)
            return [t async for d in engine.stream(request) for t in d.token_ids]
        return await asyncio.gather(*(one(i, a) for i, a in pairs))

    engine.start()
    asyncio.run(streams(combos[:2]))  # warm-up
    start = time.perf_counter()
    answers = asyncio.run(streams(combos))
    mixed = sum(map(len, answers)) / (time.perf_counter() - start)
    start = time.perf_counter()
    alone = asyncio.run(streams(combos[:16]))
    base_only = sum(map(len, alone)) / (time.perf_counter() - start)
    engine.shutdown()
    equal = sum(tokens == expected[adapter][i] for (i, adapter), tokens in zip(combos, answers))
    print(f"RESULT lora {dtype_name}: {equal}/{len(combos)} greedy answers equal to the merged models' "
          f"(base and two adapters, 48 streams at once); {mixed:.0f} tok/s mixed, {base_only:.0f} tok/s for 16 base requests")
    if dtype_name == "fp32" and equal < 44:
        failed = True
sys.exit(1 if failed else 0)
EOF

cat >"$RUNS/vllm_lora.py" <<'EOF'
"""engine=vllm with engine.lora_adapters (vLLM's multi-LoRA) against r1's own engine serving the same adapters."""
import asyncio, sys
from r1.config import EngineConfig, ModelConfig, SamplingConfig
from r1.engine import create_engine
from r1.model import load_model
from r1.tasks.arithmetic import generate_problems
from engine_checks import write_adapters

paths, _ = write_adapters(load_model(ModelConfig(model="r1-tiny", device="cpu", dtype="fp32"))[0])
prompts = [[{"role": "user", "content": p.question}] for p in generate_problems(16, level=1, seed=5, split="test")]
sampling = SamplingConfig(temperature=0, max_new_tokens=64)
combos = [(i, adapter) for adapter in (None, *paths) for i in range(len(prompts))]

def answers(engine):
    async def run():
        async def one(i, adapter):
            request = engine.make_request(prompts[i], sampling, adapter=adapter)
            return "".join([d.text async for d in engine.stream(request)])
        return await asyncio.gather(*(one(i, a) for i, a in combos))
    engine.start()
    try:
        return asyncio.run(run())
    finally:
        engine.shutdown()

reference = answers(create_engine(ModelConfig(model="r1-tiny", device="cuda"), EngineConfig(lora_adapters=paths)))
got = answers(create_engine(ModelConfig(model="r1-tiny"), EngineConfig(engine="vllm", lora_adapters=paths,
                                                                       gpu_memory_utilization=0.3)))
same = sum(a == b for a, b in zip(got, reference))
differs = sum(got[i] != got[i + len(prompts) * k] for k in (1, 2) for i in range(len(prompts)))
print(f"RESULT vllm lora: {same}/{len(combos)} greedy texts equal to r1's engine with the same adapters "
      f"(base and two adapters, all at once); {differs}/{2 * len(prompts)} adapter answers differ from the base's")
sys.exit(0 if same >= 0.75 * len(combos) and differs > 0 else 1)
EOF

cat >"$RUNS/engine_cuda.py" <<'EOF'
"""r1's own engine on the GPU: fp32 exactness, bf16 (and torch.compile) accuracy and speed."""
import sys, time
import torch
from r1.config import EngineConfig, ModelConfig, SamplingConfig
from r1.engine import create_engine
from r1.tasks.arithmetic import generate_problems, is_correct
from engine_checks import check_streams, timed

@torch.inference_mode()
def reference(model, ids, max_new_tokens, eos):
    """Greedy decoding of one sequence alone with the model's own KV cache."""
    out = model(torch.tensor([ids], device=model.device), use_cache=True)
    tokens = []
    for _ in range(max_new_tokens):
        tokens.append(int(out.logits[0, -1].argmax()))
        if tokens[-1] in eos:
            break
        out = model(torch.tensor([[tokens[-1]]], device=model.device), past_key_values=out.past_key_values, use_cache=True)
    return tokens

def check_structured_and_logprobs(engine, prompts):
    """Structured output (the grammar's bitmask applied to logits on the GPU) and logprobs (against a
    plain forward pass of the model), fp32."""
    import json
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    outs = engine.generate_batch(prompts[:16], SamplingConfig(temperature=0, max_new_tokens=96, json_schema=schema))
    parsed = 0
    for c in outs:
        try:
            parsed += json.loads(c.text.rpartition("</think>")[2])["answer"] in ("yes", "no") and c.finish_reason == "stop"
        except ValueError:
            pass
    print(f"RESULT engine fp32: structured output (enum schema after the reasoning): {parsed}/16 valid")
    out = engine.generate_batch(prompts[:1], SamplingConfig(temperature=0, max_new_tokens=16, logprobs=2, ignore_eos=True))[0]
    ids = engine.make_request(prompts[0], SamplingConfig()).prompt_token_ids
    with torch.inference_mode():
        logits = engine.model(torch.tensor([ids + out.token_ids], device=engine.model.device)).logits[0].float()
    expected = logits[len(ids) - 1 : -1].log_softmax(-1)
    worst = max(abs(e.logprob - float(expected[i, t])) for i, (e, t) in enumerate(zip(out.logprobs, out.token_ids)))
    print(f"RESULT engine fp32: logprobs vs a plain forward pass: largest difference {worst:.2e}")
    return parsed == 16 and worst < 1e-3

def check_masks_and_budget(engine, prompts):
    """The sampler's masks on the GPU's logits, fp32: guided choice and regex (xgrammar bitmasks),
    allowed_token_ids, bad_words, and thinking_token_budget forcing </think>."""
    import re
    tokenizer = engine.tokenizer
    greedy = SamplingConfig(temperature=0, max_new_tokens=64)
    choices = ["正确", "错误"]
    chosen = engine.generate_batch(prompts[:8], greedy.model_copy(update={"choice": choices}))
    regexed = engine.generate_batch(prompts[:8], greedy.model_copy(update={"regex": r"[0-9]{1,3}"}))
    valid = sum(c.text.rpartition("</think>")[2] in choices for c in chosen)
    valid += sum(bool(re.fullmatch(r"[0-9]{1,3}", c.text.rpartition("</think>")[2])) for c in regexed)
    digits = [tokenizer.convert_tokens_to_ids(d) for d in "0123456789"]
    allowed = engine.generate_batch(prompts[:8], greedy.model_copy(update={"allowed_token_ids": digits, "ignore_eos": True,
                                                                           "max_new_tokens": 8}))
    only_digits = sum(set(c.token_ids) <= set(digits) for c in allowed)
    banned = engine.generate_batch(prompts[:8], greedy.model_copy(update={"bad_words": ["answer"]}))
    no_word = sum("answer" not in c.text for c in banned)
    close = tokenizer.convert_tokens_to_ids("</think>")
    cut = engine.generate_batch(prompts[:8], greedy.model_copy(update={"thinking_token_budget": 5}))
    at_budget = sum(close in c.token_ids and c.token_ids.index(close) <= 5 for c in cut)
    print(f"RESULT engine fp32: guided choice/regex {valid}/16 valid, allowed_token_ids {only_digits}/8, "
          f"bad_words {no_word}/8, thinking_token_budget 5: </think> by token 6 in {at_budget}/8")
    return valid == 16 and only_digits == 8 and no_word == 8 and at_budget == 8

def check_prefix_cache(device, prompts):
    """The prefix cache on the GPU, fp32: chats' second turns prefilled from their first turns'
    cached blocks (a batch with padding between a row's prefix and its rest) answer with the tokens
    of an engine without the cache."""
    greedy = SamplingConfig(temperature=0, max_new_tokens=48)
    model = ModelConfig(model="r1-tiny", device=device, dtype="fp32")
    cached = create_engine(model, EngineConfig(max_num_seqs=64, prefix_cache_mb=64))
    plain = create_engine(model, EngineConfig(max_num_seqs=64, prefix_cache_mb=0))
    first = cached.generate_batch(prompts[:16], greedy)
    second = [p + [{"role": "assistant", "content": c.text.rpartition("</think>")[2]},
                   {"role": "user", "content": "Check it once more, step by step."}] for p, c in zip(prompts[:16], first)]
    got, expected = cached.generate_batch(second, greedy), plain.generate_batch(second, greedy)
    same = sum(a.token_ids == b.token_ids for a, b in zip(got, expected))
    stats = cached.stats()
    print(f"RESULT engine fp32 prefix cache: second turns equal to no cache {same}/16; "
          f"{stats['prefix_cache_hit_tokens']} of {stats['prefix_cache_queried_tokens']} prompt tokens from the cache")
    cached.shutdown(), plain.shutdown()
    return same >= 15 and stats["prefix_cache_hit_tokens"] > 0

def main():
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    problems = generate_problems(64, level=1, seed=0, split="test")
    prompts = [[{"role": "user", "content": p.question}] for p in problems]
    greedy = SamplingConfig(temperature=0, max_new_tokens=96)
    accuracy = lambda outs: sum(is_correct(c.text, p.answer) for c, p in zip(outs, problems)) / len(problems)
    ok, results = True, {}
    for label, dtype, compile_ in (("fp32", "fp32", False), ("bf16", "bf16", False), ("bf16+compile", "bf16", True)):
        # No prefix cache: the second timed batch repeats the first's prompts (check_prefix_cache covers it).
        engine = create_engine(ModelConfig(model="r1-tiny", device=device, dtype=dtype),
                               EngineConfig(max_num_seqs=64, compile=compile_, prefix_cache_mb=0))
        start = time.perf_counter()
        engine.warmup()  # every decode batch size once (and compilation)
        warm = time.perf_counter() - start
        first_rate = timed(engine, prompts, greedy)[1]  # the first full batch still loads kernels
        outs, rate = timed(engine, prompts, greedy)
        results[label] = outs
        print(f"RESULT engine {label}: accuracy {accuracy(outs):.3f}, {rate:.0f} tokens/s, 64 prompts at once "
              f"(the first batch after the {warm:.1f} s warm-up: {first_rate:.0f} tokens/s)")
        if label == "fp32":
            ok = check_structured_and_logprobs(engine, prompts) and ok
            ok = check_masks_and_budget(engine, prompts) and ok
            ok = check_prefix_cache(device, prompts) and ok
            eos = set(engine.stop_token_ids)
            same = sum(
                list(c.token_ids) == reference(engine.model, engine.make_request(p, greedy).prompt_token_ids, 96, eos)
                for c, p in zip(outs, prompts))
            print(f"RESULT engine fp32: batched greedy tokens equal to one-at-a-time decoding: {same}/64")
            ok = ok and same >= 58
        else:
            ok = ok and accuracy(outs) >= accuracy(results["fp32"]) - 0.1
        if label == "bf16":
            ok = check_streams(engine, "engine bf16", prompts, greedy, outs[0].text) and ok
        engine.shutdown()
        del engine
        if device == "cuda":
            torch.cuda.empty_cache()
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
EOF

cat >"$RUNS/serve_check.py" <<'EOF'
"""`r1 serve` on the GPU over HTTP with the stock openai client: unsharded, then pipeline_stages=2."""
import concurrent.futures, glob, os, signal, subprocess, sys, threading, time
import openai, torch
from r1.config import EngineConfig, ModelConfig, SamplingConfig
from r1.engine import create_engine
from r1.reasoning import split_reasoning
from r1.tasks.arithmetic import generate_problems

PORT, MAX_TOKENS = 8011, 96

def used_mb(device):
    if device != "cuda":
        return 0.0
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20

def start(device, gpus, stages, log):
    """`r1 serve` in its own process group; returns it once it printed its ready line (or raises)."""
    sets = {"model.device": device, "model.dtype": "fp32", "code_validator": "null", "pipeline_stages": stages,
            "llm.min_replicas": 2, "llm.num_gpus": gpus if stages == 1 else 0, "shards.num_gpus": gpus}
    cmd = [sys.executable, "-m", "cluster.cli", "serve", "--port", str(PORT), "--ready-timeout-s", "150"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    ready = threading.Event()
    def pump():
        for line in proc.stdout:
            log.write(line)
            if "is ready" in line:
                ready.set()
    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + 170
    while not ready.wait(1.0):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"r1 serve did not get ready (exit code {proc.poll()}); see its log")
    return proc

def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True, timeout=60)

def warm_up_lines():
    """The LLM server replicas' warm-up log lines of the running Ray session ("... warmed up in ...")."""
    found = []
    for path in glob.glob("/tmp/ray/session_latest/logs/serve/replica_*LLMServer*.log"):
        with open(path, errors="replace") as f:
            found += sorted({line.split(" -- ", 1)[-1].strip() for line in f if "warmed up in" in line})
    return found

def ask(client, prompt):
    r = client.chat.completions.create(model="r1-tiny", messages=prompt, temperature=0, max_tokens=MAX_TOKENS)
    c = r.choices[0]
    return (c.message.model_extra.get("reasoning_content") or "", c.message.content or ""), r.usage.completion_tokens

def ask_stream(client, prompt):
    reasoning, content, usage = [], [], None
    for chunk in client.chat.completions.create(model="r1-tiny", messages=prompt, temperature=0, max_tokens=MAX_TOKENS,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            reasoning.append(choice.delta.model_extra.get("reasoning_content") or "")
            content.append(choice.delta.content or "")
    return ("".join(reasoning), "".join(content)), usage

def main():
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    gpus = 0.25 if device == "cuda" else 0
    problems = generate_problems(16, level=1, seed=1, split="test")
    prompts = [[{"role": "user", "content": p.question}] for p in problems]
    greedy = SamplingConfig(temperature=0, max_new_tokens=MAX_TOKENS)
    engine = create_engine(ModelConfig(model="r1-tiny", device=device, dtype="fp32"), EngineConfig(max_num_seqs=16))
    expected = [(split_reasoning(c.text, engine.think_prefilled), len(c.token_ids))
                for c in engine.generate_batch(prompts, greedy)]
    engine.shutdown()
    del engine
    ok = True
    for stages in (1, 2):
        name = f"serve pipeline_stages={stages}"
        before = used_mb(device)
        with open(os.path.join(os.environ.get("R1_CHECK_LOGS", "."), f"serve_{stages}.log"), "w") as log:
            started = time.monotonic()
            proc = start(device, gpus, stages, log)
            try:
                ready_s = time.monotonic() - started
                grown = used_mb(device) - before
                client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="unused", timeout=120, max_retries=0)
                models = [m.id for m in client.models.list()]
                with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
                    got = list(pool.map(lambda p: ask(client, p), prompts))
                same = sum(g == e for g, e in zip(got, expected))
                streamed = ask_stream(client, prompts[0])
                warmups = warm_up_lines()
            finally:
                stop(proc)
        has_reasoning = all(g[0][0] for g in got)
        # Each LLM server replica says how it warmed up; with the model (or every stage) on the GPU
        # that is the GPU warm-up (every batch size, then a full batch), sharded or not.
        print(f"RESULT {name}: warm-ups {warmups}")
        gpu_warm_up = len(warmups) >= 2 and all(("on a GPU" in w) == (device == "cuda") for w in warmups)
        print(f"RESULT {name}: ready in {ready_s:.0f} s, GPU memory +{grown:.0f} MB, models {models}; "
              f"{same}/{len(prompts)} concurrent greedy chat completions equal to the in-process engine's "
              f"(reasoning_content and content split, completion_tokens); reasoning_content in all: {has_reasoning}; "
              f"a stream equals its non-streamed answer with usage: {streamed == got[0]}")
        # Two replicas (a CUDA context each, hundreds of MB) or four stages: GPU memory must grow.
        on_gpu = device != "cuda" or grown >= 2 * stages * 100
        ok = ok and on_gpu and gpu_warm_up and same >= len(prompts) - 2 and has_reasoning and streamed == got[0] and models == ["r1-tiny"]
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
EOF

gpu_engine_check() {  # name module engine quantization
  local name=$1 module=$2
  selected "$name" || return 0
  if ! "$PY" -c "import $module" >/dev/null 2>&1; then
    echo "SKIP $name (package not installed: $module)"
    return
  fi
  check "$name" "$PY" "$RUNS/engine_check.py" "$3" "$4"
  grep -h "^RESULT\\|^SKIP" "$LOGS/$name.log" 2>/dev/null | sed 's/^/    /'
}

"$PY" -c "import sys, torch, transformers, ray, deepspeed; print('python', sys.version.split()[0], '| torch', torch.__version__, 'CUDA', torch.version.cuda, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU', '| transformers', transformers.__version__, '| ray', ray.__version__, '| deepspeed', deepspeed.__version__)" 2>&1 | tail -n 1
check nccl_allreduce "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 "$RUNS/nccl.py"
check bf16_autocast_step "$PY" "$RUNS/step.py" ddp
check deepspeed_zero2 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 "$RUNS/step.py" deepspeed
check lora_bf16_step "$PY" "$RUNS/step.py" lora
check reward_bf16_step "$PY" "$RUNS/step.py" reward
check ray_train_nccl_bf16 "$PY" -m cluster.cli train sft --config ray_configs/train_tiny_sft.yaml \
  --set "scaling={num_workers: 1, use_gpu: true}" --set precision=bf16 --set max_steps=6 \
  --set "checkpoint={storage_path: $RUNS, run_name: gpu-sft, every_steps: 3}" --set progress_bar=false
check ray_train_grpo_ds "$PY" -m cluster.cli train grpo --config ray_configs/train_tiny_grpo.yaml \
  --set "scaling={num_workers: 1, use_gpu: true}" --set precision=bf16 --set max_steps=2 \
  --set "model.model=$RUNS/gpu-sft/final" --set "strategy={name: deepspeed, zero_stage: 2}" --set eval_num_problems=0 \
  --set "checkpoint={storage_path: $RUNS, run_name: gpu-grpo, every_steps: 1}" --set progress_bar=false
for name in ray_train_nccl_bf16 ray_train_grpo_ds; do
  [ -f "$LOGS/$name.log" ] && tail -n 2 "$LOGS/$name.log" | sed "s/^/    $name: /"
done
check engine_cuda "$PY" "$RUNS/engine_cuda.py"
grep -h "^RESULT" "$LOGS/engine_cuda.log" 2>/dev/null | sed 's/^/    /'
check engine_lora_cuda "$PY" "$RUNS/engine_lora.py"
grep -h "^RESULT" "$LOGS/engine_lora_cuda.log" 2>/dev/null | sed 's/^/    /'
check serve_gpu env R1_CHECK_LOGS="$LOGS" "$PY" "$RUNS/serve_check.py"
grep -h "^RESULT" "$LOGS/serve_gpu.log" 2>/dev/null | sed 's/^/    /'
check bench_training "$PY" -m bench.training --device cuda --steps 3
grep -h "ratio\|s/step" "$LOGS/bench_training.log" 2>/dev/null | sed 's/^/    /'
check first_batch "$PY" -m bench.first_batch --device cuda --profile
grep -h "^RESULT\\|^FAILED\\|^ *Self CUDA time\\|^ *Self CPU time" "$LOGS/first_batch.log" 2>/dev/null | sed 's/^/    /'
gpu_engine_check vllm_engine vllm vllm none
gpu_engine_check vllm_fp8_engine vllm vllm fp8
if selected vllm_lora_engine; then
  if "$PY" -c "import vllm" >/dev/null 2>&1; then
    check vllm_lora_engine "$PY" "$RUNS/vllm_lora.py"
    grep -h "^RESULT" "$LOGS/vllm_lora_engine.log" 2>/dev/null | sed 's/^/    /'
  else
    echo "SKIP vllm_lora_engine (package not installed: vllm)"
  fi
fi
gpu_engine_check trtllm_engine tensorrt_llm trtllm none
gpu_engine_check trtllm_fp8_engine tensorrt_llm trtllm fp8
exit $failed
