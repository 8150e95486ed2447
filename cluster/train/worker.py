"""The Ray Train worker loop: build the stage, resume, step, report checkpoints, export.

Everything that trains lives in `r1.train`; this loop only connects a stage to Ray Train:
rank/world size/device from the train context, the latest checkpoint from `ray.train.get_checkpoint()`
(set after a worker failure, or when a run with the same name and storage path is started again),
`ray.train.report(metrics, checkpoint)` every `checkpoint.every_steps` steps and at the end, and
per-step metrics pushed (fire-and-forget) by rank 0 to the driver's `MetricsSink` actor.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import tempfile
from pathlib import Path
from typing import Any

# stage name -> (config class in r1.config, "module:StageClass" in r1.train)
STAGES: dict[str, tuple[str, str]] = {
    "sft": ("SFTTrainConfig", "r1.train.sft:SFTStage"),
    "reward": ("RewardTrainConfig", "r1.train.reward_stage:RewardStage"),
    "grpo": ("GRPOTrainConfig", "r1.train.grpo_stage:GRPOStage"),
}

TORCH_EXTENSIONS_DIR = "~/.cache/r1-cluster/torch_extensions"


def config_class(stage: str) -> type:
    import r1.config

    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r}; use one of {', '.join(STAGES)}")
    return getattr(r1.config, STAGES[stage][0])


def stage_class(stage: str) -> type:
    module_name, class_name = STAGES[stage][1].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def export_dir(config: Any, run_dir: Path) -> Path:
    return Path(config.checkpoint.export_dir).expanduser() if config.checkpoint.export_dir else run_dir / "final"


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from actors import metrics as ray_metrics
    from actors.tracing import setup_actor_tracing
    from r1.config import parse_config
    from r1.telemetry import span
    from r1.train.stage import WorkerInfo

    # DeepSpeed compiles its ops on first use; a shared cache makes later runs start in seconds.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(TORCH_EXTENSIONS_DIR).expanduser()))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    setup_actor_tracing("train-worker")
    # Memory and compute utilization gauges; compute relative to the worker's torch threads (Ray sets
    # them to its reserved CPUs), not the node's cores, so a busy worker reads ~1.
    import torch

    ray_metrics.start_resource_reporter("train_worker", cores=torch.get_num_threads())
    trace = loop_config.get("trace")  # the driver's train.run span
    stage_name = loop_config["stage"]
    config = parse_config(config_class(stage_name), loop_config["config"], source=f"{stage_name} training config")
    sink = loop_config.get("sink")
    context = ray.train.get_context()
    code_validator = None
    if loop_config.get("code_validators"):  # the driver's CodeValidator actors run the code_tests reward
        from actors.code_validator import ActorPoolValidator

        code_validator = ActorPoolValidator(loop_config["code_validators"])
    worker = WorkerInfo(
        rank=context.get_world_rank(), world_size=context.get_world_size(), device=ray.train.torch.get_device(),
        code_validator=code_validator,
    )
    is_reporter = worker.rank == 0 and sink is not None

    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None) as resume_dir:
        stage = stage_class(stage_name)(config, worker, resume_dir)
    if sink is not None:  # which process is which rank: for debugging and for fault-injection tests
        sink.push.remote({"event": "worker", "rank": worker.rank, "pid": os.getpid(), "device": str(worker.device)})
    if is_reporter:
        sink.push.remote({"event": "start", "start_step": stage.start_step, "resumed": checkpoint is not None,
                          "world_size": worker.world_size})

    every = config.checkpoint.every_steps
    metrics: dict[str, Any] = {}
    for step in range(stage.start_step, config.max_steps):
        with span("train.step", trace, step=step + 1, rank=worker.rank) as step_span:
            metrics = stage.run_step(step)
            step_span.set_attributes({key: metrics[key] for key in ("num_tokens", "step_time_s", "comm_share")
                                      if key in metrics})
        if worker.rank == 0:
            ray_metrics.record_train_step(stage_name, metrics["step_time_s"], metrics.get("tokens_per_s"),
                                          metrics.get("comm_share"))
        done = step + 1
        last = done == config.max_steps
        if is_reporter and (done % config.log_every_steps == 0 or last):
            sink.push.remote(metrics)
        if last or (every and done % every == 0):
            if last:
                evaluation = stage.evaluate()
                metrics.update(evaluation)
                if is_reporter and evaluation:
                    sink.push.remote({"event": "eval", "step": done, **evaluation})
            with span("train.checkpoint", trace, step=done, rank=worker.rank), \
                    tempfile.TemporaryDirectory(prefix="r1-ckpt-") as tmp:
                wrote = stage.save_checkpoint(tmp, done)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if wrote else None)

    out = export_dir(config, Path(loop_config["run_dir"]))
    stage.export(out)
    if is_reporter:
        sink.push.remote({"event": "exported", "path": str(out), "step": config.max_steps})
