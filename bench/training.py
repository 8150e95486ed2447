"""GRPO step time: r1-cluster's GRPO stage against TRL's GRPOTrainer, in one run, on the same setup.

Both sides train the same model (default: the embedded r1-tiny) in one process on the same device,
on the same arithmetic prompts (rendered with the same chat template), with the same group size,
completion budget, sampling temperature/top-p, clip epsilon, KL beta (both load a frozen reference),
token-level loss aggregation, learning rate and reward functions (r1's format + accuracy rewards,
weights 0.5 / 1.0). Each side runs `--warmup` untimed steps, then `--steps` timed ones; a step is
rollouts + rewards + the policy update. The sides alternate over `--rounds` rounds (each with a
fresh trainer); the headline ratio is the median of the rounds' paired ratios (each round times
both sides back to back, so the machine's drift between rounds cancels), printed with each
round's ratio and the ratio of the median step times.
Mean completion lengths are printed so the comparison can be checked for fairness (same model and
temperature, so the lengths should match closely).

    python -m bench.training                       # defaults: 2 prompts x 8 samples, 64 new tokens
    python -m bench.training --steps 10 --max-new-tokens 128 --device cuda

Prints each side's mean step time and the ratio ours / TRL (target: <= 0.67).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

import torch

from bench.contract import command_line, finish, ratio, target_note

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_ours(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    from r1.config import GRPOTrainConfig, parse_config
    from r1.train.grpo_stage import GRPOStage
    from r1.train.stage import WorkerInfo

    config = parse_config(GRPOTrainConfig, {
        "model": {"model": args.model},
        "prompts": {"task": "arithmetic", "num_prompts": args.num_prompts, "levels": [args.level]},
        "grpo": {
            "group_size": args.group_size, "prompts_per_step": args.prompts_per_step,
            "max_new_tokens": args.max_new_tokens, "reward_temperature": args.temperature,
            "kl_beta": args.beta, "clip_eps": 0.2, "loss_aggregation": "token",
        },
        "optim": {"lr": args.lr, "max_grad_norm": 1.0},
        "max_steps": args.warmup + args.steps,
        "seed": args.seed,
        "measure_comm": False,
    })
    torch.manual_seed(args.seed)
    stage = GRPOStage(config, WorkerInfo(device=device))
    times, lengths = [], []
    for step in range(args.warmup + args.steps):
        metrics = stage.run_step(step)
        if step >= args.warmup:
            times.append(metrics["step_time_s"])
            lengths.append(metrics["completion_len_mean"])
    return {"step_time_s": statistics.mean(times), "completion_len_mean": statistics.mean(lengths)}


def _trl_rewards() -> tuple[list[Any], list[float]]:
    from r1.rewards import AccuracyReward, FormatReward

    format_reward, accuracy_reward = FormatReward(), AccuracyReward()

    def r1_format(completions: list[str], **_: Any) -> list[float]:
        return format_reward(completions)

    def r1_accuracy(completions: list[str], answers: list[int], **_: Any) -> list[float]:
        return accuracy_reward(completions, answers=answers)

    return [r1_format, r1_accuracy], [0.5, 1.0]


def run_trl(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from r1.config import ModelConfig
    from r1.model import load_tokenizer, resolve_source
    from r1.tasks.arithmetic import generate_problems

    tokenizer = load_tokenizer(ModelConfig(model=args.model))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    problems = generate_problems(args.num_prompts, level=args.level, seed=args.seed, split="train")
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": p.question}], add_generation_prompt=True, tokenize=False)
        for p in problems
    ]
    dataset = Dataset.from_list([{"prompt": text, "answers": p.answer} for text, p in zip(rendered, problems)])
    model = AutoModelForCausalLM.from_pretrained(resolve_source(args.model)[0], dtype=torch.float32)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._started = 0.0

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            self._started = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._started)

    reward_funcs, weights = _trl_rewards()
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        trl_args = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.prompts_per_step * args.group_size,
            gradient_accumulation_steps=1,
            num_generations=args.group_size,
            max_completion_length=args.max_new_tokens,
            temperature=args.temperature,
            top_p=1.0,
            beta=args.beta,
            epsilon=0.2,
            loss_type="dapo",  # token-level aggregation, as ours
            scale_rewards="group",
            reward_weights=weights,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            max_grad_norm=1.0,
            max_steps=args.warmup + args.steps,
            logging_steps=args.warmup + args.steps,  # one log at the end (completion lengths)
            save_strategy="no",
            report_to="none",
            seed=args.seed,
            use_cpu=device.type == "cpu",
            bf16=False,
            fp16=False,
            dataloader_num_workers=0,
            disable_tqdm=True,
            log_completions=False,
        )
        trainer = GRPOTrainer(
            model=model, reward_funcs=reward_funcs, args=trl_args, train_dataset=dataset,
            processing_class=tokenizer, callbacks=[timer],
        )
        trainer.train()
    timed = timer.times[args.warmup:]
    lengths = [float(log["completions/mean_length"]) for log in trainer.state.log_history if "completions/mean_length" in log]
    return {"step_time_s": statistics.mean(timed), "completion_len_mean": lengths[-1] if lengths else float("nan")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="r1-tiny")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternating rounds (ours, TRL, TRL, ours, ...), each with a fresh trainer; "
                             "medians over rounds")
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7, help="rollout temperature (reward_temperature)")
    parser.add_argument("--beta", type=float, default=0.001, help="KL weight (both load a reference model)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--level", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for both sides (default 1: stable timings on a shared machine)")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="bare --json: print one JSON line instead of a table; --json PATH: print the table "
                             "and write the results (bench/contract.py format) to PATH")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))

    rounds = []
    for number in range(args.rounds):
        # Alternate which side goes first: drift in the machine's speed hits both alike.
        order = [("ours", run_ours), ("trl", run_trl)]
        measured = dict((name, fn(args, device)) for name, fn in (order if number % 2 == 0 else order[::-1]))
        rounds.append(measured)
        print(f"round {number + 1}/{args.rounds}: ours {measured['ours']['step_time_s']:.3f} s/step, "
              f"TRL {measured['trl']['step_time_s']:.3f} s/step", flush=True)
    ours = {key: statistics.median(r["ours"][key] for r in rounds) for key in rounds[0]["ours"]}
    trl = {key: statistics.median(r["trl"][key] for r in rounds) for key in rounds[0]["trl"]}
    round_ratios = [r["ours"]["step_time_s"] / r["trl"]["step_time_s"] for r in rounds]
    result = {
        "device": str(device), "model": args.model, "group_size": args.group_size,
        "prompts_per_step": args.prompts_per_step, "max_new_tokens": args.max_new_tokens, "steps": args.steps,
        "rounds": args.rounds,
        "ours_step_time_s": ours["step_time_s"], "trl_step_time_s": trl["step_time_s"],
        "ours_completion_len": ours["completion_len_mean"], "trl_completion_len": trl["completion_len_mean"],
        # Headline: the median of the rounds' paired ratios (each round times both sides back to back).
        "ratio": statistics.median(round_ratios),
        "ratio_of_medians": ours["step_time_s"] / trl["step_time_s"],
        "round_ratios": round_ratios,
    }
    if args.json == "-":
        print(json.dumps(result))
    else:
        print(f"GRPO step time on {device} ({args.model}, {args.prompts_per_step} prompts x {args.group_size} samples, "
              f"<= {args.max_new_tokens} new tokens, mean of {args.steps} steps after {args.warmup} warm-up, "
              f"median of {args.rounds} rounds)")
        print(f"  r1-cluster : {ours['step_time_s']:.3f} s/step  (completion length {ours['completion_len_mean']:.1f})")
        print(f"  TRL        : {trl['step_time_s']:.3f} s/step  (completion length {trl['completion_len_mean']:.1f})")
        verdict = "meets" if result["ratio"] <= 0.67 else "misses"
        print(f"  ratio ours/TRL = {result['ratio']:.2f}  ({verdict} the <= 0.67 target; per round "
              f"{', '.join(f'{r:.2f}' for r in round_ratios)})")
    return finish(contract_result(args, argv, result), None if args.json == "-" else args.json)


def contract_result(args: argparse.Namespace, argv: list[str] | None, result: dict[str, Any]) -> dict[str, Any]:
    """The run as the bench JSON contract: step times of both sides and their ratio."""
    return {
        "benchmark": "training",
        "title": "GRPO step time",
        "command": command_line("training", argv),
        "baseline": "TRL's GRPOTrainer on the same model, prompts, group size, completion budget, sampling, "
                    "KL/clip settings and rewards, in the same process on the same device.",
        "tables": [{
            "title": f"{result['device']}, {result['model']}, {result['prompts_per_step']} prompts × "
                     f"{result['group_size']} samples, ≤ {result['max_new_tokens']} new tokens, mean of "
                     f"{result['steps']} steps after {args.warmup} warm-up, median of {args.rounds} alternating "
                     f"rounds, {args.threads} torch threads",
            "columns": ["trainer", "s/step", "mean completion length"],
            "rows": [["r1-cluster GRPO stage", round(result["ours_step_time_s"], 3), round(result["ours_completion_len"], 1)],
                     ["TRL GRPOTrainer", round(result["trl_step_time_s"], 3), round(result["trl_completion_len"], 1)],
                     ["ours / TRL (ratio of these medians)", ratio(result["ratio_of_medians"]), ""],
                     ["ours / TRL (median of the rounds' ratios: headline)", ratio(result["ratio"]), ""]],
        }],
        "series": {},
        "notes": [target_note("step time ours / TRL", result["ratio"], 0.67, at_least=False),
                  "ratio in each round: " + ", ".join(f"{r:.2f}×" for r in result["round_ratios"])],
        "raw": result,
    }


if __name__ == "__main__":
    main()
