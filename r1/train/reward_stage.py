"""Reward-model training stage: Bradley–Terry loss on preference pairs, held-out pairwise accuracy."""

from __future__ import annotations

import torch
import torch.distributed as dist

from r1.train.parallel import distributed
from r1.train.reward_model import (
    bradley_terry_loss,
    collate_pairs,
    load_preferences,
    reward_model_from_base,
    sequence_scores,
    split_pairs,
    tokenize_pairs,
)
from r1.train.sft_data import batch_indices, shard
from r1.train.stage import Stage


class RewardStage(Stage):
    name = "reward"
    task_type = "SEQ_CLS"

    def load_base(self, source: str) -> torch.nn.Module:
        return reward_model_from_base(source, self.tokenizer)

    def setup_data(self) -> None:
        data = self.config.data
        pairs = tokenize_pairs(self.tokenizer, load_preferences(data.path), data.max_seq_len)
        train, held_out = split_pairs(pairs, data.eval_fraction, seed=self.config.seed)
        self.train_pairs = shard(train, self.worker.rank, self.worker.world_size)
        # Every rank scores its share of the held-out pairs; counts are summed across ranks.
        self.eval_pairs = held_out[self.worker.rank :: self.worker.world_size]

    def _scores(self, model: torch.nn.Module, pairs: list) -> tuple[torch.Tensor, torch.Tensor]:
        batch = collate_pairs(pairs, self.tokenizer.pad_token_id)
        with self.strategy.autocast():
            scores = sequence_scores(model, batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))
        return scores[: len(pairs)], scores[len(pairs) :]

    def train_step(self, step: int) -> dict[str, float]:
        indices = batch_indices(len(self.train_pairs), self.config.batch_size_per_worker, step, self.config.seed)
        pairs = [self.train_pairs[i] for i in indices]
        with self.phase("forward_backward"):
            chosen, rejected = self._scores(self.strategy.model, pairs)
            loss = bradley_terry_loss(chosen, rejected)
            self.strategy.backward(loss)
        with self.phase("optimizer"):
            grad_norm = self.strategy.step()
        num_tokens = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
        return {
            "loss": float(loss.detach()),
            "grad_norm": grad_norm,
            "accuracy": float((chosen > rejected).float().mean()),
            "margin": float((chosen - rejected).mean().detach()),
            "num_tokens": float(num_tokens),
        }

    @torch.no_grad()
    def evaluate(self, batch_size: int = 32) -> dict[str, float]:
        """Pairwise accuracy and loss on the held-out split (empty when eval_fraction is 0)."""
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # correct, loss sum, count
        # Ranks may run different numbers of batches: the inference module runs no collectives
        # (under ZeRO-3 it is a replica refreshed here, on every rank).
        model = self.strategy.inference_module()
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(self.eval_pairs), batch_size):
                pairs = self.eval_pairs[start : start + batch_size]
                chosen, rejected = self._scores(model, pairs)
                totals[0] += float((chosen > rejected).sum())
                totals[1] += float(bradley_terry_loss(chosen, rejected)) * len(pairs)
                totals[2] += len(pairs)
        finally:
            model.train(was_training)
        if distributed():
            dist.all_reduce(totals)
        correct, loss_sum, count = totals.tolist()
        if count == 0:
            return {}
        return {"eval_accuracy": correct / count, "eval_loss": loss_sum / count, "num_eval_pairs": count}
