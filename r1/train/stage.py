"""What every training stage shares: model loading (with LoRA), the strategy, step metrics, checkpoints.

A stage is built once per worker and then driven one optimizer step at a time:

    stage = SFTStage(config, worker, resume_dir=None | checkpoint_dir)
    for step in range(stage.start_step, config.max_steps):
        metrics = stage.run_step(step)          # identical keys on every rank, already all-reduced
        if checkpoint due: stage.save_checkpoint(dir, step + 1)
    stage.export(final_dir)

A checkpoint directory holds `model/` (a Hugging Face directory: full weights, or the LoRA adapter),
`trainer_state.json` (the number of finished steps) and the strategy's optimizer state. Resuming
loads the model from `model/` and the optimizer state, then continues at the saved step; data
order and rollout seeds are functions of the step, so the resumed run sees the same batches.

Weights are loaded in fp32 whatever `model.dtype` says (`precision` picks the autocast dtype), on
the worker's device. This module never imports ray: the worker loop in `cluster/train` supplies
rank, world size and device.
"""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from r1.metrics import StepPhases
from r1.telemetry import end_span, start_span
from r1.train.lora import apply_lora, load_adapter
from r1.train.parallel import build_strategy, distributed

MODEL_DIR = "model"
STATE_FILE = "trainer_state.json"


@dataclass(frozen=True)
class WorkerInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    # `validator(code, tests) -> Validation` for the code_tests reward, run outside this process
    # (the worker loop passes CodeValidator actors); None: this process's own sandbox.
    code_validator: Any = None


def read_checkpoint_state(directory: str | Path) -> dict[str, Any]:
    """`trainer_state.json` of a checkpoint: the finished steps and what wrote it (`checkpoint_facts`)."""
    path = Path(directory) / STATE_FILE
    if not path.exists():
        raise ValueError(f"{directory} is not a training checkpoint (no {STATE_FILE})")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"checkpoint state {path} is damaged: {error}") from None
    step = state.get("step") if isinstance(state, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"checkpoint state {path} is damaged: no step count")
    return state


def read_checkpoint_step(directory: str | Path) -> int:
    """The number of finished optimizer steps recorded in a checkpoint."""
    return read_checkpoint_state(directory)["step"]


def checkpoint_facts(stage: str, config: Any) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by a run: the stage, the LoRA shape, the strategy."""
    lora = config.lora
    return {
        "stage": stage,
        "lora": {"rank": lora.rank, "target_modules": sorted(lora.target_modules)} if lora.enabled else None,
        "strategy": config.strategy.name,
    }


def check_resumable(state: dict[str, Any], directory: str | Path, stage: str, config: Any) -> None:
    """A ValueError unless the checkpoint (its `state`) was written by a run like this one.

    Resuming another stage's checkpoint (an SFT run's under the same run name, say) would skip its
    steps and ship that model as this stage's; other LoRA shapes or strategies cannot load at all.
    Checkpoints from before these facts were recorded carry only the step and pass."""
    labels = {"stage": "stage", "lora": "LoRA (lora.enabled, lora.rank, lora.target_modules)", "strategy": "strategy.name"}
    for key, value in checkpoint_facts(stage, config).items():
        if key in state and state[key] != value:
            raise ValueError(
                f"the checkpoint {directory} was written with {labels[key]} = {state[key]!r}, this run has {value!r}; "
                "resume it with the same settings, or start a new run (another checkpoint.run_name or storage_path)"
            )


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory on CUDA; peak resident set size of this process otherwise."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def all_reduce_metrics(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum keys starting with `num_` over workers and average the rest (keys must match on every rank)."""
    if not distributed():
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    world_size = dist.get_world_size()
    return {k: (v if k.startswith("num_") else v / world_size) for k, v in zip(keys, values.tolist())}


class Stage:
    """Base class: subclasses set `name`, `task_type`, and implement `load_base`, `setup_data`, `train_step`."""

    name = "stage"
    task_type = "CAUSAL_LM"

    def __init__(self, config: Any, worker: WorkerInfo, resume_dir: str | Path | None = None):
        if config.model.dtype not in ("auto", "fp32"):
            raise ValueError(
                f"model.dtype={config.model.dtype} is for serving; training keeps fp32 weights and "
                f"autocasts: set model.dtype=auto and precision={config.model.dtype}"
            )
        self.config = config
        self.worker = worker
        self.device = worker.device
        if self.device.type == "cuda":
            # Attention without cuDNN's SDPA backend in this (worker) process: it builds an
            # execution plan for every new shape, and each batch pads to its own length. On an
            # H200 in bf16 a LoRA step at a new length took 1.26 s against 0.02 s at a known one
            # (r1/engine/runner.py, attention_kernels, has the engine's side).
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.resume_dir = Path(resume_dir) if resume_dir is not None else None
        self.start_step = 0
        if self.resume_dir is not None:
            state = read_checkpoint_state(self.resume_dir)
            check_resumable(state, self.resume_dir, self.name, config)
            self.start_step = state["step"]
        # Phase timings with a "train.<phase>" span each (children of the worker's train.step span).
        sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else None
        self.phases = StepPhases(sync=sync)
        torch.manual_seed(config.seed)
        from r1.model import load_tokenizer

        self.tokenizer = load_tokenizer(config.model)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        module = self._build_module().to(self.device)
        module.train()
        total_steps = config.max_steps * self.optimizer_steps_per_step()
        self.strategy = build_strategy(module, config, self.device, total_steps)
        if self.resume_dir is not None:
            self.strategy.load_state(self.resume_dir)
        self.setup_data()

    # -- subclass hooks ------------------------------------------------------------------------
    def load_base(self, source: str) -> torch.nn.Module:
        """The model at `source` (a directory or hub id) in fp32, ready for this stage."""
        raise NotImplementedError

    def setup_data(self) -> None:
        raise NotImplementedError

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step on this worker's data; must include `loss` and `num_tokens`."""
        raise NotImplementedError

    def optimizer_steps_per_step(self) -> int:
        return 1

    def evaluate(self) -> dict[str, float]:
        """Held-out metrics (all ranks must call it: it may run collectives)."""
        return {}

    # -- shared machinery ----------------------------------------------------------------------
    def base_source(self) -> str:
        from r1.model import resolve_source

        return resolve_source(self.config.model.model)[0]

    def _build_module(self) -> torch.nn.Module:
        checkpoint_model = self.resume_dir / MODEL_DIR if self.resume_dir else None
        if checkpoint_model is not None and not checkpoint_model.is_dir():
            raise ValueError(f"the checkpoint {self.resume_dir} is incomplete: it has no {MODEL_DIR}/ directory")
        if not self.config.lora.enabled:
            return self.load_base(str(checkpoint_model) if checkpoint_model else self.base_source())
        base = self.load_base(self.base_source())
        if checkpoint_model is not None:
            return load_adapter(base, checkpoint_model, trainable=True)
        return apply_lora(base, self.config.lora, self.task_type)

    @property
    def module(self) -> torch.nn.Module:
        return self.strategy.module

    def phase(self, name: str, **attributes: Any) -> Any:
        """Context manager around one phase of a step (rollout, reward, forward_backward, optimizer)."""
        return self.phases.phase(name, **attributes)

    def run_step(self, step: int) -> dict[str, float]:
        """`train_step` plus timing, throughput, memory and communication share (all-reduced)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.phases.reset()
        started = time.perf_counter()
        stats = self.train_step(step)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        step_time = time.perf_counter() - started
        comm = self.strategy.comm_seconds()
        if not math.isnan(comm) and comm > 0:  # a span holding the step's measured collective time
            # The all-reduce overlaps backward (DDP buckets, ZeRO hooks); the span is placed at the
            # end of the step with the summed duration of its collectives.
            end_ns = time.time_ns()
            end_span(start_span("train.all_reduce", start_ns=end_ns - int(comm * 1e9), seconds=comm,
                                placement="summed, overlaps backward"), end_ns=end_ns)
        stats.update({f"{name}_s": seconds for name, seconds in self.phases.seconds.items()})
        stats.update(
            step_time_s=step_time,
            comm_s=comm,
            comm_share=comm / step_time if step_time > 0 else 0.0,
            peak_memory_mb=peak_memory_mb(self.device),
            lr=self.strategy.lr,
        )
        metrics = all_reduce_metrics(stats, self.device)
        metrics["tokens_per_s"] = metrics["num_tokens"] / metrics["step_time_s"] if metrics["step_time_s"] > 0 else 0.0
        metrics["step"] = step + 1
        return metrics

    def save_model(self, directory: Path) -> None:
        """Write the model (or adapter) and tokenizer as a Hugging Face directory (rank 0 writes)."""
        with self.strategy.gathered():
            if self.worker.rank == 0:
                directory.mkdir(parents=True, exist_ok=True)
                self.module.save_pretrained(directory)
                self.tokenizer.save_pretrained(directory)

    def save_checkpoint(self, directory: str | Path, step: int) -> bool:
        """Write this rank's part of a checkpoint after `step` finished steps; True if it wrote files."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save_model(directory / MODEL_DIR)
        self.strategy.save_state(directory, self.worker.rank)
        if self.worker.rank == 0:
            state = {"step": step, **checkpoint_facts(self.name, self.config)}
            (directory / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
        return self.worker.rank == 0 or self.strategy.owns_checkpoint_on_every_rank

    def export(self, directory: str | Path) -> None:
        self.save_model(Path(directory))
