"""GRPO training stage: sample groups with the r1 engine, score, normalise per group, clipped update.

One step on each worker:

1. take `prompts_per_step` prompts (a seeded function of the step) and sample `group_size`
   completions each at temperature `reward_temperature` with the engine, running on the unwrapped
   policy (not the DDP/DeepSpeed wrapper; under ZeRO-3 a plain replica refreshed from the
   partitions, so ranks may decode for different numbers of steps) in eval mode;
2. score them with the weighted reward; a group with any failed reward is dropped from the loss
   (and counted), never scored 0;
3. advantages (r - mean) / (std + eps) per group; reference log-probs from the frozen reference
   (with LoRA: the same model with adapters disabled; none at all when kl_beta = 0); the policy
   and reference forwards run each group's prompt once and its completions on that prompt's
   key/value cache (`group_batch`);
4. `num_iterations` optimizer steps on the clipped objective + beta * k3 KL, token-level aggregated;
   policy and reference log-probs are those of the sampling distribution (logits divided by
   `reward_temperature`, as TRL and veRL do).

Rollout seeds are a function of (seed, step, rank), so a resumed run samples what the original
would have.
"""

from __future__ import annotations

import math

import torch

from r1.config import EngineConfig, SamplingConfig
from r1.rewards import build_reward
from r1.train.grpo import group_advantages, grpo_loss
from r1.train.rollout import completion_log_probs, generate_groups, group_batch, load_prompt_items, num_batch_tokens
from r1.train.sft import load_causal_lm
from r1.train.sft_data import batch_indices, shard
from r1.train.stage import Stage


class GRPOStage(Stage):
    name = "grpo"
    task_type = "CAUSAL_LM"

    def load_base(self, source: str) -> torch.nn.Module:
        return load_causal_lm(source, self.config.model.attn_implementation)

    def optimizer_steps_per_step(self) -> int:
        return self.config.grpo.num_iterations

    def setup_data(self) -> None:
        from r1.engine.engine import TransformersEngine

        cfg, grpo = self.config, self.config.grpo
        items = load_prompt_items(
            self.tokenizer,
            path=cfg.prompts.path,
            task=cfg.prompts.task,
            num_prompts=cfg.prompts.num_prompts,
            levels=cfg.prompts.levels,
            seed=cfg.seed,
            need_integer_answers=any(spec.name == "accuracy" for spec in grpo.rewards),
        )
        self.items = shard(items, self.worker.rank, self.worker.world_size)
        self.reward = build_reward(grpo.rewards, device=str(self.device), code_validator=self.worker.code_validator)
        self.reference = None
        if grpo.kl_beta > 0 and not cfg.lora.enabled:
            self.reference = self.load_base(self.base_source()).to(self.device).eval()
            self.reference.requires_grad_(False)
        num_sequences = grpo.prompts_per_step * grpo.group_size
        # Built on the module rollouts run on (under ZeRO-3 a replica refreshed before every rollout).
        self.engine = TransformersEngine(
            self.strategy.inference_module(), self.tokenizer, EngineConfig(max_num_seqs=num_sequences, max_queued_requests=num_sequences)
        )
        self.sampling = SamplingConfig(
            temperature=grpo.reward_temperature, top_p=grpo.top_p, max_new_tokens=grpo.max_new_tokens
        )

    def _reference_log_probs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.config.grpo.kl_beta == 0:
            return None
        with torch.no_grad(), self.strategy.autocast():
            temperature = self.config.grpo.reward_temperature
            if self.reference is not None:
                return completion_log_probs(self.reference, batch, temperature)[0]
            with self.module.disable_adapter():  # LoRA: the base model is the reference
                return completion_log_probs(self.module, batch, temperature)[0]

    def train_step(self, step: int) -> dict[str, float]:
        grpo = self.config.grpo
        group_size = grpo.group_size
        indices = batch_indices(len(self.items), grpo.prompts_per_step, step, self.config.seed)
        items = [self.items[i] for i in indices]

        torch.manual_seed(self.config.seed * 1_000_003 + step * 1009 + self.worker.rank)
        with self.phase("rollout", prompts=len(items), group_size=group_size):
            self.strategy.inference_module().eval()  # every rank: a collective under ZeRO-3
            try:
                with self.strategy.autocast(), torch.inference_mode():
                    rollouts = generate_groups(self.engine, items, group_size, self.sampling)
            finally:
                # The update runs in training mode whatever mode the step started in (under ZeRO-3
                # the rollouts ran on a replica, which stays in eval mode: it only ever infers).
                self.module.train()
        rollout_s = self.phases.seconds["rollout"]  # reported as rollout_s with the other phases

        with self.phase("reward", completions=len(rollouts.texts)):
            scores = self.reward(
                rollouts.texts,
                prompts=[item.prompt for item in items for _ in range(group_size)],
                answers=[item.answer for item in items for _ in range(group_size)],
            )
        rewards = torch.tensor(scores.total, dtype=torch.float32)
        group_ok = ~torch.isnan(rewards).view(-1, group_size).any(dim=1)
        row_ok = group_ok.repeat_interleave(group_size)
        advantages = group_advantages(torch.nan_to_num(rewards, nan=0.0), group_size, grpo.adv_eps) * row_ok
        group_std = torch.nan_to_num(rewards, nan=0.0).view(-1, group_size).std(dim=1)

        batch = group_batch(rollouts.prompt_ids, rollouts.completion_ids, group_size, self.tokenizer.pad_token_id)
        batch["completion_mask"] = batch["completion_mask"] * row_ok.unsqueeze(1).to(torch.long)  # dropped groups
        batch = {k: v.to(self.device) for k, v in batch.items()}
        advantages = advantages.to(self.device)
        ref_logp = self._reference_log_probs(batch)

        old_logp = None
        for _ in range(grpo.num_iterations):
            with self.phase("forward_backward"):
                with self.strategy.autocast():
                    logp, mask = completion_log_probs(self.strategy.model, batch, grpo.reward_temperature)
                if old_logp is None:
                    old_logp = logp.detach()  # the rollout policy: the ratio is exactly 1 on the first iteration
                loss, stats = grpo_loss(
                    logp, old_logp, ref_logp, advantages, mask,
                    clip_eps=grpo.clip_eps, kl_beta=grpo.kl_beta, aggregation=grpo.loss_aggregation,
                )
                self.strategy.backward(loss)
            with self.phase("optimizer"):
                grad_norm = self.strategy.step()

        valid = rewards[~torch.isnan(rewards)]
        completion_lengths = [len(ids) for ids in rollouts.completion_ids]
        num_generated = sum(completion_lengths)
        metrics = {
            "loss": float(loss.detach()),
            "policy_loss": stats.policy_loss,
            "kl": stats.kl,
            "clip_fraction": stats.clip_fraction,
            "ratio_mean": stats.ratio_mean,
            "grad_norm": grad_norm,
            "reward": float(valid.mean()) if valid.numel() else math.nan,
            "reward_group_std": float(group_std[group_ok].mean()) if bool(group_ok.any()) else math.nan,
            "completion_len_mean": num_generated / len(completion_lengths),
            "truncated_fraction": sum(r == "length" for r in rollouts.finish_reasons) / len(completion_lengths),
            "rollout_tokens_per_s": num_generated / rollout_s if rollout_s > 0 else 0.0,
            "num_tokens": float(num_batch_tokens(batch)),
            "num_rollout_tokens": float(num_generated),
            "num_groups_dropped": float((~group_ok).sum()),
            "num_groups_zero_std": float(((group_std == 0) & group_ok).sum()),
        }
        for name, mean in scores.term_means().items():
            metrics[f"reward_{name}"] = mean
        for name, count in scores.failures.items():
            metrics[f"num_reward_failures_{name}"] = float(count)
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Greedy exact match on held-out arithmetic problems (rank 0; others return {})."""
        count = self.config.eval_num_problems
        if count == 0 or self.config.prompts.task != "arithmetic":
            return {}
        from r1.train.evaluate import evaluate_arithmetic

        results: dict[str, float] = {}
        model = self.strategy.inference_module()  # every rank: a collective under ZeRO-3
        if self.worker.rank == 0:
            for level in self.config.prompts.levels:
                result = evaluate_arithmetic(
                    model, self.tokenizer, num_problems=count, level=level,
                    max_new_tokens=self.config.grpo.max_new_tokens,
                )
                results[f"eval_accuracy_level{level}"] = result.accuracy
                results[f"eval_format_rate_level{level}"] = result.format_rate
        return results
