"""The `r1 train`, `r1 eval` and `r1 model merge-lora` command lines (no Ray started here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli import main as r1_main
from cluster.train.driver import load_train_config

REPO = Path(__file__).resolve().parent.parent


def test_eval_prints_accuracy_and_format_rate_as_json(capsys):
    assert r1_main(["eval", "--model", "r1-tiny", "--num-problems", "4", "--level", "1", "2", "1",
                    "--max-new-tokens", "24", "--json"]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["level"] for r in results] == [1, 2]  # a level given twice is evaluated once
    for result in results:
        assert result["num_problems"] == 4
        assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["format_rate"] <= 1.0


def test_eval_prints_a_readable_line(capsys):
    assert r1_main(["eval", "--num-problems", "2", "--max-new-tokens", "8"]) == 0
    assert "arithmetic level 1: exact match" in capsys.readouterr().out


def test_eval_against_a_baseline_compares_the_same_problems(untrained_tiny, capsys):
    # The trained r1-tiny against an untrained build: same problems, so every problem the trained
    # model solves is "fixed" (the untrained one solves none) and the p-value is 2 / 2^fixed.
    assert r1_main(["eval", "--model", "r1-tiny", "--baseline", untrained_tiny, "--num-problems", "8",
                    "--max-new-tokens", "32", "--json"]) == 0
    [record] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    comparison = record["comparison"]
    solved = round(record["accuracy"] * 8)
    assert record["baseline"]["accuracy"] == 0.0 and record["baseline"]["model"] == untrained_tiny
    assert solved >= 6 and comparison["fixed"] == solved and comparison["broken"] == 0
    assert comparison["p_value"] == pytest.approx(min(1.0, 2 / 2**solved))
    assert comparison["difference"] == pytest.approx(record["accuracy"])
    assert r1_main(["eval", "--model", "r1-tiny", "--baseline", "r1-tiny", "--num-problems", "2",
                    "--max-new-tokens", "32"]) == 0
    assert "+0.0 points; fixed 0, broke 0 of the same problems; McNemar exact p = 1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        # a typo in a --set key names the allowed keys, before any Ray worker starts
        (["train", "sft", "--set", "optim.learning_rate=1"], "allowed keys"),
        # --set needs key=value
        (["train", "grpo", "--set", "grpo.group_size"], "must look like key=value"),
        # a config path that does not exist
        (["train", "reward", "--config", "nope.yaml"], "does not exist"),
        # the reward stage has no default preference data
        (["train", "reward"], "data: Field required"),
    ],
)
def test_train_config_mistakes_exit_2_with_the_fix(argv, message, capsys):
    assert r1_main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "stage, path",
    [
        ("sft", "train_sft.yaml"),
        ("reward", "train_reward.yaml"),
        ("grpo", "train_grpo.yaml"),
        ("sft", "train_tiny_sft.yaml"),
        ("grpo", "train_tiny_grpo.yaml"),
    ],
)
def test_committed_configs_parse(stage, path):
    # Every YAML in ray_configs/ maps onto its config model (a renamed field would break it here).
    config = load_train_config(stage, str(REPO / "ray_configs" / path), ["max_steps=3"])
    assert config.max_steps == 3


def test_set_overrides_nested_sections():
    config = load_train_config("grpo", str(REPO / "ray_configs" / "train_grpo.yaml"), [
        "grpo.reward_temperature=0.9", "scaling={num_workers: 4, use_gpu: true}", "lora.enabled=true",
    ])
    assert config.grpo.reward_temperature == 0.9
    assert (config.scaling.num_workers, config.scaling.use_gpu, config.lora.enabled) == (4, True, True)


def test_a_required_key_may_come_from_set(tmp_path):
    # The reward stage has no default data: --set alone, or a file without a data section plus
    # --set, gives it (the overrides apply before validation, not after the defaults are checked).
    assert str(load_train_config("reward", None, ["data.path=prefs.jsonl"]).data.path) == "prefs.jsonl"
    partial = tmp_path / "reward.yaml"
    partial.write_text("max_steps: 7\n")
    config = load_train_config("reward", str(partial), ["data.path=prefs.jsonl"])
    assert (config.max_steps, str(config.data.path)) == (7, "prefs.jsonl")
    with pytest.raises(ValueError, match=f"(?s){partial} with --set overrides.*data: Field required"):
        load_train_config("reward", str(partial), ["max_steps=8"])


def test_train_help_lists_the_stages(capsys):
    with pytest.raises(SystemExit):
        r1_main(["train", "--help"])
    out = capsys.readouterr().out
    assert all(stage in out for stage in ("sft", "reward", "grpo"))


def test_train_checks_inputs_and_outputs_before_ray_starts(tmp_path, monkeypatch, capsys):
    # Each of these used to fail inside a Ray Train worker, as a traceback after Ray's start-up (or,
    # for the checkpoint of another stage, to "resume" it and ship the SFT model as GRPO's).
    import ray

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/r1-runs here, whatever this machine trained before
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": 5}]}\n')
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "What is 2 + 3?"}\n')
    (tmp_path / "metrics").mkdir()
    state = tmp_path / "runs" / "exp" / "checkpoint_2026-01-01_00-00-00.000000"
    state.mkdir(parents=True)
    (state / "trainer_state.json").write_text('{"step": 2, "stage": "sft", "lora": null, "strategy": "ddp"}')
    sft = ["train", "sft", "--set", "data.task=null"]
    cases = [
        (sft + ["--set", "data.path=data/chat.jsonl"], f"{tmp_path}/data/chat.jsonl:1: messages[0].content must be a string"),
        (sft + ["--set", "data.path=data"], "is a directory, not a file; set data.path"),
        (["train", "grpo", "--set", "prompts.task=null", "--set", "prompts.path=prompts.jsonl", "--set", "model.model=r1-tiny"],
         "prompts.jsonl:1 needs an integer 'answer' for the accuracy reward"),
        (["train", "grpo", "--config", str(REPO / "ray_configs" / "train_tiny_grpo.yaml")],
         "model.model: model path ~/r1-runs/r1-tiny-sft/final does not exist"),
        (["train", "sft", "--set", "metrics_path=metrics"], f"metrics_path {tmp_path}/metrics is a directory"),
        (["train", "grpo", "--set", "model.model=r1-tiny", "--set", "checkpoint.storage_path=runs",
          "--set", "checkpoint.run_name=exp"], "was written with stage = 'sft', this run has 'grpo'"),
    ]
    for argv, message in cases:
        assert r1_main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not ray.is_initialized()


def test_relative_paths_are_resolved_against_the_drivers_directory(tmp_path):
    # Ray Train workers run elsewhere: a relative export_dir used to land in Ray's session folder.
    from r1.config import GRPOTrainConfig, parse_config
    from cluster.train.driver import resolve_paths

    (tmp_path / "models" / "sft").mkdir(parents=True)
    config = parse_config(GRPOTrainConfig, {
        "model": {"model": "models/sft"}, "prompts": {"path": "p.jsonl"}, "metrics_path": "m.jsonl",
        "checkpoint": {"storage_path": "runs", "export_dir": "exported"},
        "grpo": {"rewards": [{"name": "reward_model", "model_path": "Org/reward-hub-id"}]},
    })
    resolved = resolve_paths("grpo", config, cwd=tmp_path)
    assert resolved.model.model == str(tmp_path / "models" / "sft")  # a local directory
    assert resolved.prompts.path == str(tmp_path / "p.jsonl")
    assert resolved.metrics_path == str(tmp_path / "m.jsonl")
    assert resolved.checkpoint.storage_path == str(tmp_path / "runs")
    assert resolved.checkpoint.export_dir == str(tmp_path / "exported")
    assert resolved.grpo.rewards[0].model_path == "Org/reward-hub-id"  # not a local directory: a hub id
    assert resolve_paths("grpo", resolved, cwd=tmp_path / "models") == resolved  # absolute paths stay
