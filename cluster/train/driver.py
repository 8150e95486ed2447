"""The training driver: a Ray Train `TorchTrainer` per stage, a progress bar and a metrics file.

`run_training(stage, config)` runs `cluster.train.worker.train_loop_per_worker` on
`scaling.num_workers` workers (gloo on CPU, NCCL with `use_gpu`), under
`RunConfig(name=run_name, storage_path, failure_config=FailureConfig(max_failures))`, so a failed
worker restarts the group from the latest checkpoint and starting the same run name again continues
where it stopped. Rank 0 pushes each step's metrics to a `MetricsSink` actor; the driver drains it,
appends JSON lines to the metrics file and updates the progress bar (step, loss, reward, tokens/s).

Works the same as a Ray job (`ray job submit --working-dir . -- r1 train grpo --config …`): the
job's entrypoint is this driver and `ray.init()` attaches to the job's cluster.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from cluster.ray_start import init_ray
from cluster.train.worker import config_class, export_dir, train_loop_per_worker

logger = logging.getLogger(__name__)

SINK_POLL_S = 0.5


@ray.remote(num_cpus=0)
class MetricsSink:
    """Buffers metric records from rank 0 until the driver drains them."""

    def __init__(self) -> None:
        self._records: list[dict[str, Any]] = []

    def push(self, record: dict[str, Any]) -> None:
        self._records.append(record)

    def drain(self) -> list[dict[str, Any]]:
        records, self._records = self._records, []
        return records


@dataclass
class TrainingOutcome:
    run_name: str
    run_dir: Path
    metrics_path: Path
    export_dir: Path
    checkpoint_path: str | None
    last_metrics: dict[str, Any]
    final_step: int
    # code_tests reward: validation outcomes counted by the CodeValidator actors ({} without them).
    code_validations: dict[str, int] = field(default_factory=dict)


def load_train_config(stage: str, path: str | None, overrides: list[str]) -> Any:
    from r1.config import load_config

    cls = config_class(stage)
    return load_config(cls, path, overrides)


class _Progress:
    """Writes records to the metrics file and drives the progress bar."""

    def __init__(self, stage: str, metrics_path: Path, max_steps: int, show_bar: bool):
        self.stage = stage
        self.metrics_path = metrics_path
        self.max_steps = max_steps
        self.show_bar = show_bar
        self.bar: Any = None
        self.last_metrics: dict[str, Any] = {}
        self.final_step = 0
        self.export_path: str | None = None

    def handle(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps({"time": time.time(), "stage": self.stage, **record}) + "\n")
        for record in records:
            self._show(record)

    def _show(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        if event == "start":
            self._open_bar(record["start_step"])
            if record.get("resumed"):
                self.write(f"resumed from the checkpoint at step {record['start_step']}")
        elif event == "eval":
            self.write("eval: " + ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k not in ("event", "step")))
        elif event == "exported":
            self.export_path = record["path"]
        elif "step" in record:
            self.last_metrics = record
            self.final_step = int(record["step"])
            if self.bar is not None:
                self.bar.n = self.final_step
                postfix = {"loss": f"{record['loss']:.4f}", "tok/s": f"{record.get('tokens_per_s', 0):.0f}"}
                if "reward" in record:
                    postfix["reward"] = f"{record['reward']:.3f}"
                postfix["comm"] = f"{100 * record.get('comm_share', 0):.1f}%"
                self.bar.set_postfix(postfix, refresh=False)
                self.bar.refresh()

    def _open_bar(self, start_step: int) -> None:
        if not self.show_bar:
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=self.max_steps, initial=start_step, desc=f"r1 train {self.stage}", unit="step")
        else:  # a restart after a worker failure
            self.bar.n = start_step
            self.bar.refresh()

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _pump(sink: Any, progress: _Progress, stop: threading.Event) -> None:
    while not stop.wait(SINK_POLL_S):
        try:
            progress.handle(ray.get(sink.drain.remote(), timeout=30))
        except Exception as error:  # the bar must never take the run down
            logger.warning("could not fetch training metrics: %s", error)


def _absolute(path: str, cwd: Path) -> str:
    return str((cwd / Path(path).expanduser()).resolve())


def resolve_paths(stage: str, config: Any, cwd: Path | None = None) -> Any:
    """The config with its relative paths made absolute against the driver's working directory.

    Ray Train workers run in a directory of their own, so a relative data path would name a missing
    file there and a relative export_dir would put the model in Ray's session folder. `model.model`
    and a reward model's `model_path` change only when they name a local directory (else they are
    hub ids or the embedded r1-tiny)."""
    cwd = cwd or Path.cwd()
    data = config.model_dump()

    def local_model(value: str) -> str:
        return _absolute(value, cwd) if (cwd / Path(value).expanduser()).is_dir() else value

    data["model"]["model"] = local_model(data["model"]["model"])
    data["checkpoint"]["storage_path"] = _absolute(data["checkpoint"]["storage_path"], cwd)
    for section, key in (("checkpoint", "export_dir"), ("data", "path"), ("prompts", "path")):
        if section in data and data[section].get(key):
            data[section][key] = _absolute(data[section][key], cwd)
    if data.get("metrics_path"):
        data["metrics_path"] = _absolute(data["metrics_path"], cwd)
    for spec in data.get("grpo", {}).get("rewards", []):
        if spec.get("model_path"):
            spec["model_path"] = local_model(spec["model_path"])
    return type(config).model_validate(data)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a rerun of `run_dir` resumes from: the one with the most finished steps."""
    from r1.train.stage import STATE_FILE, read_checkpoint_step

    found = []
    for state in run_dir.glob(f"checkpoint_*/{STATE_FILE}"):
        try:
            found.append((read_checkpoint_step(state.parent), state.parent.name, state.parent))
        except ValueError:
            continue  # a damaged one: Ray Train picks from its own records, the worker reports it
    return max(found)[2] if found else None


def preflight(stage: str, config: Any) -> None:
    """Check, before Ray starts anything, what would otherwise fail inside a worker minutes later:
    the input files (read and validated whole), the output paths, and that the checkpoint this run
    would resume was written by a run like it. Raises ValueError naming the key or file."""
    from r1.model import resolve_source
    from r1.train.stage import check_resumable, read_checkpoint_state

    try:
        resolve_source(config.model.model)
    except ValueError as error:
        raise ValueError(f"model.model: {error}") from None
    if stage in ("sft", "reward") and config.data.path:
        if stage == "sft":
            from r1.train.sft_data import load_sft_records

            load_sft_records(config.data.path)
        else:
            from r1.train.reward_model import load_preferences

            load_preferences(config.data.path)
    if stage == "grpo":
        if config.prompts.path:
            from r1.train.rollout import read_prompt_file

            read_prompt_file(config.prompts.path, any(spec.name == "accuracy" for spec in config.grpo.rewards))
        for index, spec in enumerate(config.grpo.rewards):
            if spec.model_path:
                try:
                    resolve_source(spec.model_path)
                except ValueError as error:
                    raise ValueError(f"grpo.rewards.{index}.model_path: {error}; point it at the export of "
                                     "`r1 train reward`") from None
    storage_path = Path(config.checkpoint.storage_path)
    if storage_path.exists() and not storage_path.is_dir():
        raise ValueError(f"checkpoint.storage_path {storage_path} is a file; set it to a directory")
    if config.metrics_path and Path(config.metrics_path).is_dir():
        raise ValueError(f"metrics_path {config.metrics_path} is a directory; set it to a file path")
    export = config.checkpoint.export_dir
    if export and Path(export).exists() and not Path(export).is_dir():
        raise ValueError(f"checkpoint.export_dir {export} is a file; set it to a directory path")
    run_dir = storage_path / (config.checkpoint.run_name or f"r1-{stage}")
    checkpoint = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if checkpoint is not None:
        check_resumable(read_checkpoint_state(checkpoint), checkpoint, stage, config)


def run_training(stage: str, config: Any, *, address: str | None = None) -> TrainingOutcome:
    """Run one training stage to completion on Ray Train; raises if the run fails.

    Relative paths are resolved against this process's working directory and the inputs are
    checked (`resolve_paths`, `preflight`) before Ray starts; not through Ray Client (`ray://`
    addresses), where this process's files are not the cluster's."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from actors.tracing import with_telemetry_env
    from r1.telemetry import config_from_env, end_span, inject_context, setup_tracing, start_span, trace_id_of

    if not (address or os.environ.get("RAY_ADDRESS") or "").startswith("ray://"):
        config = resolve_paths(stage, config)
        preflight(stage, config)
    telemetry = config_from_env()
    setup_tracing(telemetry, service_name=f"{telemetry.service_name}-train-driver")
    if not ray.is_initialized():
        # Tracing settings reach the workers through the runtime env (they do not inherit ours).
        init_ray(address=address, runtime_env=with_telemetry_env(None, telemetry))
    run_name = config.checkpoint.run_name or f"r1-{stage}"
    storage_path = Path(config.checkpoint.storage_path).expanduser().resolve()
    run_dir = storage_path / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = Path(config.metrics_path).expanduser() if config.metrics_path else run_dir / "metrics.jsonl"
    metrics_path.parent.mkdir(parents=True, exist_ok=True)

    scaling = config.scaling
    # The whole run is one trace: this span, and every worker's step, phase and checkpoint spans under it.
    root = start_span("train.run", stage=stage, run_name=run_name, max_steps=config.max_steps,
                      num_workers=scaling.num_workers)
    sink = MetricsSink.remote()
    validators = _start_code_validators(config)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"stage": stage, "config": config.model_dump(), "sink": sink, "run_dir": str(run_dir),
                           "trace": inject_context(root), "code_validators": validators},
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=scaling.resources_per_worker
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(storage_path),
            failure_config=FailureConfig(max_failures=config.failure.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.num_to_keep),
        ),
    )
    progress = _Progress(stage, metrics_path, config.max_steps, config.progress_bar)
    stop = threading.Event()
    pump = threading.Thread(target=_pump, args=(sink, progress, stop), name="r1-train-metrics", daemon=True)
    pump.start()
    trace_id = trace_id_of(root)
    if trace_id:
        progress.write(f"trace id: {trace_id}")
    try:
        result = trainer.fit()
    except BaseException as error:
        end_span(root, error)
        raise
    else:
        end_span(root, final_step=max(progress.final_step, int((result.metrics or {}).get("step", 0))))
    finally:
        stop.set()
        pump.join(timeout=60)
        progress.handle(ray.get(sink.drain.remote(), timeout=30))
        code_validations = _stop_code_validators(validators, progress)
        progress.close()
        ray.kill(sink)
    return TrainingOutcome(
        run_name=run_name,
        run_dir=run_dir,
        metrics_path=metrics_path,
        export_dir=Path(progress.export_path) if progress.export_path else export_dir(config, run_dir),
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        last_metrics={**(result.metrics or {}), **progress.last_metrics},
        final_step=max(progress.final_step, int((result.metrics or {}).get("step", 0))),
        code_validations=code_validations,
    )


def _start_code_validators(config: Any) -> list[Any]:
    """CodeValidator actors for a GRPO run's code_tests reward (none when it runs in the workers)."""
    grpo = getattr(config, "grpo", None)
    wanted = max((spec.num_validators for spec in (grpo.rewards if grpo else [])), default=0)
    if not wanted:
        return []
    from actors.code_validator import start_validator_actors

    return start_validator_actors(wanted)


def _stop_code_validators(validators: list[Any], progress: _Progress) -> dict[str, int]:
    """Their validation counts (reported on the console), then the actors are gone."""
    counts: Counter[str] = Counter()
    try:
        for stats in ray.get([actor.stats.remote() for actor in validators], timeout=60):
            counts.update(stats["validations"])
    except Exception as error:  # counts are for the report only
        logger.warning("could not read the CodeValidator counts: %s", error)
    for actor in validators:
        ray.kill(actor)
    if validators:
        summary = ", ".join(f"{status} {count}" for status, count in sorted(counts.items())) or "none"
        progress.write(f"code_tests reward: {sum(counts.values())} sandbox validations on "
                        f"{len(validators)} CodeValidator actors ({summary})")
    return dict(counts)
