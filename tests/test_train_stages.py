"""Training stages in one process (no Ray): precision, LoRA checkpoints, GRPO reference/KL, rewards, learning."""

from __future__ import annotations

import math

import pytest
import torch

from r1.config import GRPOTrainConfig, SFTTrainConfig, parse_config
from r1.rewards import RewardTerm, WeightedReward
from r1.train.grpo_stage import GRPOStage
from r1.train.sft import SFTStage
from r1.train.stage import WorkerInfo, read_checkpoint_step



def _sft(model: str, **extra) -> SFTStage:
    config = {
        "model": {"model": model},
        "data": {"task": "arithmetic", "num_examples": 16, "max_seq_len": 96},
        "batch_size_per_worker": 4,
        "max_steps": 10,
        "optim": {"lr": 3e-3},
    }
    config.update(extra)
    return SFTStage(parse_config(SFTTrainConfig, config), WorkerInfo())


@pytest.mark.parametrize(
    "precision, autocast_dtype, scaler_enabled",
    [
        ("fp32", torch.float32, False),  # the default: no autocast, no scaler
        ("bf16", torch.bfloat16, False),  # bf16 has fp32's range: autocast without loss scaling
        ("fp16", torch.float16, True),  # fp16 needs the GradScaler against underflow
    ],
)
def test_precision_modes_step_on_cpu(untrained_tiny, precision, autocast_dtype, scaler_enabled):
    stage = _sft(untrained_tiny, precision=precision)
    with stage.strategy.autocast():
        logits = stage.strategy.model(input_ids=torch.tensor([[0, 2, 5, 6]])).logits
    assert logits.dtype == autocast_dtype
    assert stage.strategy.scaler.is_enabled() == scaler_enabled
    metrics = stage.run_step(0)
    assert math.isfinite(metrics["loss"]) and metrics["comm_share"] == 0.0  # one process: no all-reduce
    assert next(stage.module.parameters()).dtype == torch.float32  # weights stay fp32


def test_lora_checkpoint_resumes_adapters_and_step(untrained_tiny, tmp_path):
    lora = {"enabled": True, "rank": 4, "alpha": 8, "dropout": 0.0}
    stage = _sft(untrained_tiny, lora=lora)
    trainable = [n for n, p in stage.module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for step in range(2):
        stage.run_step(step)
    assert stage.save_checkpoint(tmp_path, step=2)
    assert (tmp_path / "model" / "adapter_config.json").exists()
    assert not (tmp_path / "model" / "model.safetensors").exists()  # only the adapter is saved

    resumed = SFTStage(stage.config, WorkerInfo(), tmp_path)
    assert resumed.start_step == 2 == read_checkpoint_step(tmp_path)
    before = dict(stage.module.named_parameters())
    for name, param in resumed.module.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, before[name], msg=name)
    # The optimizer state came back too: the next step is identical on both.
    assert resumed.run_step(2)["loss"] == pytest.approx(stage.run_step(2)["loss"], rel=1e-5)


def _grpo(model: str, **grpo) -> GRPOStage:
    config = {
        "model": {"model": model},
        "prompts": {"task": "arithmetic", "num_prompts": 8, "levels": [1]},
        "grpo": {"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 12, **grpo},
        "max_steps": 20,
        "optim": {"lr": 1e-3},
    }
    return GRPOStage(parse_config(GRPOTrainConfig, config), WorkerInfo())


def test_kl_beta_zero_loads_no_reference(untrained_tiny):
    stage = _grpo(untrained_tiny, kl_beta=0.0)
    assert stage.reference is None
    assert stage.run_step(0)["kl"] == 0.0


def test_lora_reference_is_the_base_model(untrained_tiny):
    config = parse_config(GRPOTrainConfig, {
        "model": {"model": untrained_tiny},
        "prompts": {"task": "arithmetic", "num_prompts": 8, "levels": [1]},
        "grpo": {"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 12, "kl_beta": 0.1},
        "lora": {"enabled": True, "rank": 4, "alpha": 64, "dropout": 0.0},
        "optim": {"lr": 5e-2},
        "max_steps": 5,
    })
    stage = GRPOStage(config, WorkerInfo())
    # A reward that differs within every group (a digit share is often 0 for a whole group, which
    # gives zero advantages and no update at all).
    stage.reward = WeightedReward([RewardTerm("distinct", _distinct_share, 1.0)])
    assert stage.reference is None  # no second copy of the model: adapters off = reference
    first = stage.run_step(0)
    assert first["kl"] == pytest.approx(0.0, abs=1e-7)  # fresh LoRA (B = 0) is exactly the base model
    later = [stage.run_step(step)["kl"] for step in range(1, 4)]
    assert max(later) > 1e-6  # once the adapters move, the policy drifts from the reference


def _digit_share(completions, **_):
    return [sum(ch.isdigit() for ch in text) / max(1, len(text)) for text in completions]


def _distinct_share(completions, **_):
    return [len(set(text)) / max(1, len(text)) for text in completions]


def _broken(completions, **_):
    raise RuntimeError("reward service down")


def test_failing_reward_drops_groups_and_is_counted(untrained_tiny):
    stage = _grpo(untrained_tiny, kl_beta=0.0)
    stage.reward = WeightedReward([RewardTerm("digits", _digit_share, 1.0), RewardTerm("remote", _broken, 1.0)])
    metrics = stage.run_step(0)
    assert metrics["num_reward_failures_remote"] == 8  # every sample of 2 prompts x 4
    assert metrics["num_groups_dropped"] == 2
    assert math.isnan(metrics["reward"]) and math.isnan(metrics["reward_remote"])
    assert metrics["reward_digits"] >= 0  # the working term is still reported
    assert metrics["loss"] == 0.0  # nothing left to learn from, and nothing made up


def _space_share(completions, **_):
    return [sum(ch.isspace() for ch in text) / max(1, len(text)) for text in completions]


def test_grpo_raises_a_learnable_reward(untrained_tiny):
    # A fresh model samples near-uniform tokens, so the share of whitespace varies within groups
    # (about 9 % on average); GRPO must push it up. Sampling varies run to run, so the margin is wide.
    torch.manual_seed(0)
    config = parse_config(GRPOTrainConfig, {
        "model": {"model": untrained_tiny},
        "prompts": {"task": "arithmetic", "num_prompts": 8, "levels": [1]},
        "grpo": {"group_size": 8, "prompts_per_step": 2, "max_new_tokens": 12, "kl_beta": 0.0, "reward_temperature": 1.0},
        "optim": {"lr": 2e-2},
        "max_steps": 16,
    })
    stage = GRPOStage(config, WorkerInfo())
    stage.reward = WeightedReward([RewardTerm("spaces", _space_share, 1.0)])
    rewards = [stage.run_step(step)["reward"] for step in range(16)]
    # Measured over 18 runs: from about 0.1 to 0.5-1.0 by step 16 (10 steps were not always enough);
    # a broken advantage or sign stays near 0.1.
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.25, rewards


def test_batched_completion_log_probs_match_unpadded_sequences(untrained_tiny):
    # Left-padded prompts, right-padded completions, custom positions and logits_to_keep must give
    # exactly the log-probs of each sequence run alone.
    from transformers import AutoModelForCausalLM

    from r1.train.grpo import token_log_probs
    from r1.train.rollout import completion_log_probs, group_batch

    model = AutoModelForCausalLM.from_pretrained(untrained_tiny).eval()
    prompts = [[0, 2, 40, 41, 42, 3], [0, 2, 50, 3]]
    completions = [[7, 8, 9], [10, 11, 12, 13, 1]]
    batch = group_batch(prompts, completions, group_size=1, pad_token_id=4)  # each row its own prompt
    with torch.no_grad():
        logp, mask = completion_log_probs(model, batch)
        for row, (prompt, completion) in enumerate(zip(prompts, completions)):
            ids = torch.tensor([prompt + completion])
            logits = model(input_ids=ids).logits[:, len(prompt) - 1 : -1]
            expected = token_log_probs(logits, torch.tensor([completion]))[0]
            torch.testing.assert_close(logp[row, : len(completion)], expected, atol=1e-4, rtol=1e-4)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    # With a temperature: the log-probs of the sampling distribution softmax(logits / T).
    with torch.no_grad():
        hot, _ = completion_log_probs(model, batch, temperature=0.5)
        ids = torch.tensor([prompts[1] + completions[1]])
        logits = model(input_ids=ids).logits[:, len(prompts[1]) - 1 : -1]
        expected = token_log_probs(logits / 0.5, torch.tensor([completions[1]]))[0]
    torch.testing.assert_close(hot[1], expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(hot[1], logp[1])


def test_shared_prompt_batch_gives_the_per_row_log_probs_and_gradients(untrained_tiny):
    # group_batch runs each group's prompt once and its completions on the repeated cache; the
    # log-probs and the gradient of a loss over them must equal those of each row run alone
    # (prompts of different lengths, completions of different lengths, one of a single token).
    from transformers import AutoModelForCausalLM

    from r1.train.grpo import token_log_probs
    from r1.train.rollout import completion_log_probs, group_batch, num_batch_tokens

    model = AutoModelForCausalLM.from_pretrained(untrained_tiny)
    model.train()
    model.config.attention_dropout = 0.0
    prompts = [[0, 2, 40, 41, 42, 3]] * 3 + [[0, 2, 50, 3]] * 3
    completions = [[7, 8, 9], [10], [11, 12, 13, 14, 1], [15, 16], [17, 18, 19, 1], [20, 21, 22]]
    weights = torch.randn(6, 5)

    def grads():
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    rows_alone = []
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[:, len(prompt) - 1 : -1]
        logp = token_log_probs(logits, torch.tensor([completion]))[0]
        (logp * weights[row, : len(completion)]).sum().backward()
        rows_alone.append(logp.detach())
    grads_alone = grads()

    shared = group_batch(prompts, completions, group_size=3, pad_token_id=4)
    model.zero_grad()
    logp_shared, mask = completion_log_probs(model, shared)
    (logp_shared * mask * weights).sum().backward()
    grads_shared = grads()
    for row, expected in enumerate(rows_alone):
        torch.testing.assert_close(logp_shared[row, : len(expected)].detach(), expected, atol=1e-5, rtol=1e-4)
    assert grads_shared.keys() == grads_alone.keys() and grads_alone
    for name, grad in grads_alone.items():
        torch.testing.assert_close(grads_shared[name], grad, atol=1e-5, rtol=1e-3, msg=name)
    with torch.no_grad():  # with a temperature too, shared prompts or not
        per_row = group_batch(prompts, completions, group_size=1, pad_token_id=4)
        torch.testing.assert_close(completion_log_probs(model, shared, 0.7)[0] * mask,
                                   completion_log_probs(model, per_row, 0.7)[0] * per_row["completion_mask"], atol=1e-5, rtol=1e-4)
    assert shared["prompt_input_ids"].shape[0] == 2  # each prompt once
    row_tokens = sum(len(p) + len(c) for p, c in zip(prompts, completions))
    assert num_batch_tokens(shared) == 6 + 4 + sum(map(len, completions)) < row_tokens == num_batch_tokens(per_row)
    with pytest.raises(ValueError, match="group 1 do not share one prompt"):
        group_batch(prompts[:5] + [[0, 9]], completions, group_size=3, pad_token_id=4)


def test_grpo_on_the_coding_tasks_scores_completions_in_the_sandbox(untrained_tiny):
    config = parse_config(GRPOTrainConfig, {
        "model": {"model": untrained_tiny},
        "prompts": {"task": "coding", "num_prompts": 4},
        "grpo": {"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 8,
                 "rewards": [{"name": "format", "weight": 0.5}, {"name": "code_tests", "validators": 0}]},
        "max_steps": 1,
    })
    stage = GRPOStage(config, WorkerInfo())
    assert all(isinstance(item.answer, list) and item.answer for item in stage.items)  # the tasks' tests
    metrics = stage.run_step(0)
    # Every completion went through the sandbox and got a score (an untrained model's code fails).
    assert metrics["num_reward_failures_code_tests"] == 0
    assert 0.0 <= metrics["reward_code_tests"] <= 1.0
    assert sum(stage.reward.terms[1].fn.reward.counts.values()) == 4
