"""`r1 train {sft,reward,grpo}`, `r1 eval` and `r1 model merge-lora`.

    r1 train sft --config ray_configs/train_sft.yaml --set optim.lr=3e-4 --set max_steps=500
    r1 eval --model ~/r1-runs/r1-sft/final --task arithmetic --num-problems 200
    r1 model merge-lora --adapter ~/r1-runs/r1-sft-lora/final --out ./merged
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from cluster.cli import path_argument

_STAGE_HELP = {
    "sft": "supervised fine-tuning: causal-LM loss on plain text, or on assistant tokens of chat JSONL",
    "reward": "Bradley-Terry reward model on preference JSONL (prompt, chosen, rejected)",
    "grpo": "GRPO reinforcement learning with rule rewards (format, accuracy) and an optional reward model",
}


def _train(args: argparse.Namespace) -> int:
    from cluster.train.driver import load_train_config, run_training

    config = load_train_config(args.stage, args.config, args.set or [])
    outcome = run_training(args.stage, config, address=args.address)
    print(f"run {outcome.run_name}: finished at step {outcome.final_step}")
    print(f"  metrics:    {outcome.metrics_path}")
    print(f"  checkpoint: {outcome.checkpoint_path}")
    print(f"  model:      {outcome.export_dir}")
    evals = {k: v for k, v in outcome.last_metrics.items() if k.startswith("eval_")}
    if evals:
        print("  " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(evals.items())))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from r1.config import ModelConfig
    from r1.model import load_model, load_model_config
    from r1.train.evaluate import evaluate_arithmetic, paired_comparison

    for flag, value in (("--num-problems", args.num_problems), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise ValueError(f"{flag} {value}: use 1 or more")
    for flag, source in (("--model", args.model), ("--baseline", args.baseline)):
        if source is not None:  # both found before the first one is evaluated (minutes on a CPU)
            try:
                load_model_config(ModelConfig(model=source, device=args.device))
            except (OSError, ValueError) as error:
                raise ValueError(f"{flag} {source}: {error}") from None

    if args.lora is not None:  # found before anything is evaluated, like the models
        from r1.engine.lora import check_adapter

        check_adapter("--lora", args.lora)

    def evaluate_all(source: str, adapter: str | None = None) -> list[Any]:
        model, tokenizer = load_model(ModelConfig(model=source, device=args.device))
        if adapter is not None:  # merged in memory, as `r1 model merge-lora` would write it
            from r1.train.lora import load_adapter

            model = load_adapter(model, adapter, trainable=False).merge_and_unload().eval()
        return [
            evaluate_arithmetic(model, tokenizer, num_problems=args.num_problems, level=level, seed=args.seed,
                                max_new_tokens=args.max_new_tokens)
            for level in dict.fromkeys(args.level)  # each level once, in the order given
        ]

    results = evaluate_all(args.model, args.lora)
    baselines = evaluate_all(args.baseline) if args.baseline else []
    records = []
    for index, result in enumerate(results):
        record = result.to_dict()
        if args.lora is not None:
            record["lora"] = args.lora
        line = (f"{args.task} level {result.level}: exact match {100 * result.accuracy:.1f}% "
                f"({sum(result.correct)}/{result.num_problems}), format rate {100 * result.format_rate:.1f}%")
        if baselines:
            comparison = paired_comparison(result.correct, baselines[index].correct)
            record["baseline"] = {**baselines[index].to_dict(), "model": args.baseline}
            record["comparison"] = comparison.to_dict()
            line += (f"\n  vs baseline {100 * comparison.baseline_accuracy:.1f}%: {100 * comparison.difference:+.1f} points; "
                     f"fixed {comparison.fixed}, broke {comparison.broken} of the same problems; "
                     f"McNemar exact p = {comparison.p_value:.3g}")
        records.append(record)
        if not args.json:
            print(line)
    if args.json:
        print(json.dumps(records))
    return 0


def _merge_lora(args: argparse.Namespace) -> int:
    from r1.train.lora import merge_lora

    out = merge_lora(args.adapter, args.out, base_model=args.base)
    print(f"merged {args.adapter} into {out}; serve it with model: {out}")
    return 0


def register(subparsers: Any) -> None:
    train = subparsers.add_parser(
        "train",
        help="train on Ray Train (sft, reward, grpo)",
        description="Run a training stage as a Ray Train TorchTrainer job. Workers and GPUs come from the config's "
        "scaling section (gloo on CPU, NCCL on GPUs). Rerunning the same checkpoint.run_name continues from its "
        "latest checkpoint. Works under `ray job submit --working-dir . -- r1 train ...` too.",
    )
    stages = train.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for stage, help_text in _STAGE_HELP.items():
        parser = stages.add_parser(stage, help=help_text, description=help_text)
        parser.add_argument("--config", help=f"YAML config (e.g. ray_configs/train_{stage}.yaml); defaults if omitted")
        parser.add_argument(
            "--set", action="append", metavar="KEY=VALUE",
            help="override one config field, dotted path and YAML value, e.g. --set optim.lr=3e-4 "
            "--set scaling.num_workers=4 --set 'lora.target_modules=[q_proj,v_proj]' (repeatable)",
        )
        parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
        parser.set_defaults(func=_train, stage=stage)

    evaluate = subparsers.add_parser(
        "eval",
        help="exact-match accuracy and format rate of a model on a task",
        description="Greedy decoding on the held-out split of a task; prints exact-match accuracy and the rate of "
        "well-formed <think>...</think> answers.",
    )
    evaluate.add_argument("--model", default="r1-tiny", type=path_argument, help="model directory, hub id or r1-tiny (default r1-tiny)")
    evaluate.add_argument("--lora", metavar="DIR", type=path_argument,
                          help="evaluate --model with the LoRA adapter in DIR merged into it (a LoRA run's final/ "
                               "directory); compare with its base model by --baseline")
    evaluate.add_argument("--task", default="arithmetic", choices=["arithmetic"], help="task (default arithmetic)")
    evaluate.add_argument("--num-problems", type=int, default=200, help="held-out problems per level (default 200)")
    evaluate.add_argument("--level", type=int, nargs="+", default=[1], choices=[1, 2, 3],
                          help="difficulty levels: 1 = two operands, 2 = three, 3 = a product then +/- (default 1)")
    evaluate.add_argument("--seed", type=int, default=0, help="which held-out problems (default 0)")
    evaluate.add_argument("--max-new-tokens", type=int, default=96, help="generation budget per answer (default 96)")
    evaluate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default auto")
    evaluate.add_argument("--baseline", metavar="MODEL",
                          help="also evaluate MODEL on the same problems and compare: the points gained, the problems "
                               "fixed and broken, and McNemar's exact p-value (e.g. GRPO's result vs its SFT start)")
    evaluate.add_argument("--json", action="store_true", help="print results as JSON")
    evaluate.set_defaults(func=_eval)


def register_model_commands(model_subparsers: Any) -> None:
    merge = model_subparsers.add_parser(
        "merge-lora",
        help="fold LoRA adapters into their base model and save a plain checkpoint",
        description="Load the base model named in the adapter's adapter_config.json (or --base), merge the "
        "adapters into its weights and save a Hugging Face checkpoint the serving engine loads like any model.",
    )
    merge.add_argument("--adapter", required=True, type=path_argument, help="adapter directory (e.g. <run>/final of a LoRA run)")
    merge.add_argument("--out", required=True, type=path_argument, help="output directory for the merged model")
    merge.add_argument("--base", type=path_argument, help="base model, if not the one recorded in the adapter")
    merge.set_defaults(func=_merge_lora)
