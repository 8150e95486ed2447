"""Every training stage as a real 2-worker Ray Train job on CPU (gloo), plus resume and fault tolerance.

One local Ray (2 CPUs) for the module; each worker takes half a CPU. Models are the r1-tiny
architecture: freshly initialised for SFT/reward (so a falling loss means something), the shipped
r1-tiny for GRPO (it needs a chat template and EOS to produce rollouts).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray

from cluster.cli import main as r1_main
from cluster.ray_start import init_ray
from cluster.train.driver import load_train_config, run_training
from r1.config import GRPOTrainConfig, RewardTrainConfig, SFTTrainConfig, parse_config
from r1.trace_file import read_spans
from r1.train.stage import MODEL_DIR, read_checkpoint_step

REPO = Path(__file__).resolve().parent.parent
# Per test, fixture included: the module's SFT run takes 50-100 s on 2 free cores and about four
# times that when the cores are shared three ways.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    return tmp_path_factory.mktemp("trace") / "train-spans.jsonl"


@pytest.fixture(scope="module")
def ray_cluster(trace_file):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path("~/.cache/r1-cluster/torch_extensions").expanduser()))
    # Every worker traces into one file (the driver only in the test that sets R1_TRACE_FILE for itself).
    init_ray(address="local", num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"R1_TRACE_FILE": str(trace_file)}})
    yield
    ray.shutdown()



def _common(storage: Path, run_name: str, model: str, **extra) -> dict:
    config = {
        "model": {"model": model},
        "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 0.5}},
        "checkpoint": {"storage_path": str(storage), "run_name": run_name, "every_steps": 2},
        "progress_bar": False,
        "seed": 0,
    }
    config.update(extra)
    return config


def _records(metrics_path: Path) -> list[dict]:
    return [json.loads(line) for line in metrics_path.read_text().splitlines()]


def _steps(records: list[dict]) -> list[dict]:
    return [r for r in records if "event" not in r]


def _sft_config(storage: Path, run_name: str, model: Path, max_steps: int) -> SFTTrainConfig:
    return parse_config(SFTTrainConfig, _common(
        storage, run_name, str(model),
        data={"task": "arithmetic", "num_examples": 64, "max_seq_len": 96},
        batch_size_per_worker=4, max_steps=max_steps, optim={"lr": 3e-3},
    ))


# Long enough that the kill lands mid-run (it comes once the step-2 checkpoint is registered, at about
# step 4 here), short because every second step writes a checkpoint (~1.5 s each on 2 cores).
MAX_STEPS_FT = 20


def _ft_config(storage: Path, model: str, max_steps: int) -> SFTTrainConfig:
    config = _sft_config(storage, "sft-ft", model, max_steps=max_steps)
    return config.model_copy(update={"failure": config.failure.model_copy(update={"max_failures": 2})})


@pytest.fixture(scope="module")
def sft_run(ray_cluster, untrained_tiny, tmp_path_factory) -> dict:
    """One SFT run of MAX_STEPS_FT steps in which rank 1 is killed once a checkpoint is registered.

    The training test and the fault-tolerance test read this run, and the start-again test continues
    it, so the module runs two SFT jobs where separate tests ran three."""
    storage = tmp_path_factory.mktemp("sft")
    metrics_path = storage / "sft-ft" / "metrics.jsonl"
    snapshot_path = storage / "sft-ft" / "checkpoint_manager_snapshot.json"
    killed: dict = {}

    def registered_step() -> int:
        """The step of the latest checkpoint the Ray Train controller has registered (0 if none)."""
        if not snapshot_path.exists():
            return 0
        try:
            results = json.loads(snapshot_path.read_text())["checkpoint_results"]
        except (ValueError, KeyError):  # caught mid-write
            return 0
        return max((int(r["metrics"]["step"]) for r in results), default=0)

    def kill_rank_1_after_a_checkpoint() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            # A report reaches the controller by polling; kill only once a checkpoint is registered,
            # otherwise the run would (correctly) restart from scratch.
            checkpoint_step = registered_step()
            if checkpoint_step and metrics_path.exists():
                records = _records(metrics_path)
                pids = {r["rank"]: r["pid"] for r in records if r.get("event") == "worker"}
                if 1 in pids:
                    os.kill(pids[1], signal.SIGKILL)
                    killed.update(pid=pids[1], checkpoint_step=checkpoint_step,
                                  at_step=max(r["step"] for r in _steps(records)))
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_rank_1_after_a_checkpoint, daemon=True)
    killer.start()
    outcome = run_training("sft", _ft_config(storage, untrained_tiny, MAX_STEPS_FT))  # raises if the run ends in an error
    killer.join(timeout=10)
    return {"outcome": outcome, "killed": killed, "storage": storage, "model": untrained_tiny}


def test_sft_two_workers_loss_falls_and_checkpoints(sft_run):
    outcome = sft_run["outcome"]
    steps = _steps(_records(outcome.metrics_path))
    assert steps[0]["step"] == 1 and steps[-1]["step"] == MAX_STEPS_FT
    # A fresh model on a fixed seed: the loss must fall over the run.
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5
    for key in ("tokens_per_s", "step_time_s", "peak_memory_mb", "comm_s", "lr", "grad_norm"):
        assert steps[-1][key] > 0, key
    # Two gloo workers all-reduce gradients, so some (but not all) of a step is communication.
    assert 0 < steps[-1]["comm_share"] < 1
    assert steps[-1]["num_tokens"] > steps[-1]["num_target_tokens"] > 0  # prompt tokens carry no loss
    assert (Path(outcome.checkpoint_path) / MODEL_DIR / "model.safetensors").exists()
    assert (outcome.export_dir / "config.json").exists() and (outcome.export_dir / "tokenizer.json").exists()


def test_fault_tolerance_killed_worker_resumes_from_checkpoint(sft_run):
    outcome, killed = sft_run["outcome"], sft_run["killed"]
    assert killed, "the worker was never killed"
    assert killed["at_step"] < MAX_STEPS_FT, "the run finished before the kill; the test proves nothing"
    records = _records(outcome.metrics_path)
    starts = [r for r in records if r.get("event") == "start"]
    assert len(starts) == 2 and starts[0]["start_step"] == 0
    restart = starts[1]
    assert restart["resumed"] is True and killed["checkpoint_step"] <= restart["start_step"] < MAX_STEPS_FT
    assert restart["start_step"] % 2 == 0  # a checkpoint step (every_steps=2)
    # Each attempt reports every step once, in order; after the restart the step counter continues
    # from the checkpoint, not from 0.
    index = records.index(restart)
    before = [r["step"] for r in _steps(records[:index])]
    after = [r["step"] for r in _steps(records[index:])]
    assert before == list(range(1, len(before) + 1)) and len(before) >= killed["checkpoint_step"]
    assert after == list(range(restart["start_step"] + 1, MAX_STEPS_FT + 1))
    assert outcome.final_step == MAX_STEPS_FT and read_checkpoint_step(outcome.checkpoint_path) == MAX_STEPS_FT


def test_starting_a_finished_run_again_continues_from_its_last_checkpoint(sft_run):
    # Starting the same run name again continues at its last step instead of starting over.
    resumed = run_training("sft", _ft_config(sft_run["storage"], sft_run["model"], MAX_STEPS_FT + 2))
    records = _records(resumed.metrics_path)
    starts = [r for r in records if r.get("event") == "start"]
    assert len(starts) == 3 and starts[-1] == {**starts[-1], "resumed": True, "start_step": MAX_STEPS_FT}
    assert [s["step"] for s in _steps(records)][-2:] == [MAX_STEPS_FT + 1, MAX_STEPS_FT + 2]
    assert resumed.final_step == MAX_STEPS_FT + 2
    assert read_checkpoint_step(resumed.checkpoint_path) == MAX_STEPS_FT + 2


def _preferences(path: Path, count: int) -> Path:
    """Pairs that prefer reasoning (`<think>` lines, then the answer) over a bare answer."""
    from r1.tasks.arithmetic import generate_problems

    with path.open("w") as handle:
        for problem in generate_problems(count, level=1, seed=3):
            record = {"prompt": problem.question, "chosen": problem.completion, "rejected": f"The answer is {problem.answer}."}
            handle.write(json.dumps(record) + "\n")
    return path


def test_reward_model_with_lora_two_workers(ray_cluster, untrained_tiny, tmp_path):
    data = _preferences(tmp_path / "prefs.jsonl", 40)
    config = parse_config(RewardTrainConfig, _common(
        tmp_path, "reward", str(untrained_tiny),
        data={"path": str(data), "eval_fraction": 0.2, "max_seq_len": 96},
        lora={"enabled": True, "rank": 8, "alpha": 16},
        batch_size_per_worker=4, max_steps=6, optim={"lr": 1e-2},
    ))
    outcome = run_training("reward", config)
    records = _records(outcome.metrics_path)
    steps = _steps(records)
    assert len(steps) == 6 and all(s["loss"] > 0 for s in steps)
    evaluation = next(r for r in records if r.get("event") == "eval")
    assert evaluation["num_eval_pairs"] == 8  # 20 % of 40 pairs held out, scored across both workers
    # A fresh scalar head scores near log(2) = 0.69 per pair; training must separate the held-out pairs.
    assert evaluation["eval_loss"] < 0.3 and evaluation["eval_accuracy"] >= 0.75
    # LoRA: only the adapter (and the scalar head) is saved.
    assert (outcome.export_dir / "adapter_config.json").exists()
    assert not (outcome.export_dir / "model.safetensors").exists()


def test_grpo_two_workers_logs_rewards_and_checkpoints(ray_cluster, tmp_path, trace_file, monkeypatch, capsys):
    from r1.telemetry import shutdown_tracing

    monkeypatch.setenv("R1_TRACE_FILE", str(trace_file))
    shutdown_tracing()  # set up afresh from the environment above when the driver starts the run
    config = parse_config(GRPOTrainConfig, _common(
        tmp_path, "grpo", "r1-tiny",
        prompts={"task": "arithmetic", "num_prompts": 8, "levels": [1]},
        grpo={"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 24, "kl_beta": 0.001},
        max_steps=2, optim={"lr": 1e-4},
    ))
    try:
        outcome = run_training("grpo", config)
    finally:
        shutdown_tracing()
    steps = _steps(_records(outcome.metrics_path))
    assert [s["step"] for s in steps] == [1, 2]
    last = steps[-1]
    for key in ("reward", "reward_format", "reward_accuracy", "kl", "clip_fraction", "rollout_tokens_per_s"):
        assert key in last, key
    assert last["num_reward_failures_format"] == 0 and last["num_reward_failures_accuracy"] == 0
    assert last["num_rollout_tokens"] > 0 and last["kl"] >= 0
    assert read_checkpoint_step(outcome.checkpoint_path) == 2


    # The run is one trace: the driver's train.run span, a train.step per step and rank with a span
    # per phase under it, and the checkpoints.
    trace_id = capsys.readouterr().out.split("trace id: ")[1].split()[0]
    spans = [s for s in read_spans(trace_file) if s["trace_id"] == trace_id]
    by_id = {s["span_id"]: s for s in spans}
    (run,) = [s for s in spans if s["name"] == "train.run"]
    assert run["parent_id"] is None and run["attributes"]["stage"] == "grpo"
    train_steps = [s for s in spans if s["name"] == "train.step"]
    assert sorted((s["attributes"]["rank"], s["attributes"]["step"]) for s in train_steps) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert all(s["parent_id"] == run["span_id"] for s in train_steps)
    assert len({s["pid"] for s in train_steps} | {run["pid"]}) == 3  # two workers and the driver
    phases = {s["name"] for s in spans if s["parent_id"] in by_id and by_id[s["parent_id"]]["name"] == "train.step"}
    assert phases >= {"train.rollout", "train.reward", "train.forward_backward", "train.optimizer", "train.all_reduce"}
    assert {s["attributes"]["step"] for s in spans if s["name"] == "train.checkpoint"} == {2}


def test_grpo_code_reward_runs_on_code_validator_actors(ray_cluster, tmp_path):
    config = parse_config(GRPOTrainConfig, _common(
        tmp_path, "grpo-code", "r1-tiny",
        prompts={"task": "coding", "num_prompts": 4},
        grpo={"group_size": 2, "prompts_per_step": 1, "max_new_tokens": 16,
              "rewards": [{"name": "format", "weight": 0.5}, {"name": "code_tests", "validators": 2}]},
        max_steps=1, optim={"lr": 1e-4},
    ))
    outcome = run_training("grpo", config)
    (step,) = _steps(_records(outcome.metrics_path))
    assert step["num_reward_failures_code_tests"] == 0 and 0 <= step["reward_code_tests"] <= 1
    # Every completion of both workers (1 prompt x 2 samples each) was validated by the actors.
    assert sum(outcome.code_validations.values()) == 2 * 1 * 2


def test_grpo_under_zero3_rollouts_and_rank0_eval_finish(ray_cluster, tmp_path):
    # ZeRO-3 runs collectives in every forward of the trained module; rollouts that end at
    # different lengths on the two ranks and an evaluation on rank 0 alone once hung the run.
    # They run on a plain replica refreshed from the partitions.
    config = parse_config(GRPOTrainConfig, _common(
        tmp_path, "grpo-z3", "r1-tiny",
        prompts={"task": "arithmetic", "num_prompts": 8, "levels": [1]},
        grpo={"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 64, "reward_temperature": 1.2},
        strategy={"name": "deepspeed", "zero_stage": 3}, eval_num_problems=6, max_steps=2,
    ))
    outcome = run_training("grpo", config)
    steps = _steps(_records(outcome.metrics_path))
    assert [s["step"] for s in steps] == [1, 2]
    assert all(s["truncated_fraction"] < 1 for s in steps)  # completions ended at their own lengths
    assert 0 <= outcome.last_metrics["eval_accuracy_level1"] <= 1
    assert (outcome.export_dir / "model.safetensors").exists()


def test_deepspeed_zero2_two_workers_via_cli(ray_cluster, untrained_tiny, tmp_path, capsys):
    # Through the CLI and the committed SFT config; the only DeepSpeed test (its first start compiles ops).
    code = r1_main([
        "train", "sft", "--config", str(REPO / "ray_configs" / "train_sft.yaml"),
        "--set", f"model.model={untrained_tiny}",
        "--set", "data={task: arithmetic, num_examples: 32, max_seq_len: 96}",
        "--set", "strategy={name: deepspeed, zero_stage: 2}",
        "--set", "scaling={num_workers: 2, resources_per_worker: {CPU: 0.5}}",
        "--set", f"checkpoint={{storage_path: {tmp_path}, run_name: ds, every_steps: 2}}",
        "--set", "max_steps=4", "--set", "batch_size_per_worker=2", "--set", "progress_bar=false",
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "finished at step 4" in out
    steps = _steps(_records(tmp_path / "ds" / "metrics.jsonl"))
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert 0 < steps[-1]["comm_share"] < 1
    # DeepSpeed writes its own sharded state: one optimizer shard per rank, merged into one checkpoint.
    checkpoint = Path(out.split("checkpoint:")[1].split()[0])
    shards = sorted(p.name for p in (checkpoint / "deepspeed").glob("*optim_states.pt"))
    assert len(shards) == 2, shards
    assert (tmp_path / "ds" / "final" / "model.safetensors").exists()


def test_config_errors_name_the_fix(ray_cluster):
    # Bad --set values fail before any worker starts, with the key in the message.
    with pytest.raises(ValueError, match="strategy.name=deepspeed"):
        load_train_config("sft", None, ["strategy.zero_stage=2"])
    with pytest.raises(ValueError, match="optim.lr_rate: unknown key"):
        load_train_config("sft", None, ["optim.lr_rate=1"])
