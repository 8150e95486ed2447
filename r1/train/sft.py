"""Supervised fine-tuning (stage 1, and R1-style distillation on reasoning traces): causal-LM loss.

The loss is the mean token cross-entropy over target tokens (every token for plain text, assistant
tokens for chat data; see `r1.train.sft_data`). Data is sharded by rank and batched by step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from r1.train.sft_data import (
    IGNORE_INDEX,
    arithmetic_records,
    batch_indices,
    collate,
    load_sft_records,
    shard,
    tokenize_records,
)
from r1.train.stage import Stage


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits[:, t] against labels[:, t + 1] over labels != IGNORE_INDEX."""
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)), shifted_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def load_causal_lm(source: str, attn_implementation: str = "sdpa") -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation=attn_implementation)


class SFTStage(Stage):
    name = "sft"
    task_type = "CAUSAL_LM"

    def load_base(self, source: str) -> torch.nn.Module:
        return load_causal_lm(source, self.config.model.attn_implementation)

    def setup_data(self) -> None:
        data = self.config.data
        if data.task == "arithmetic":
            records = arithmetic_records(
                data.num_examples, data.levels, seed=self.config.seed, corpus_examples=data.corpus_examples
            )
        else:
            records = load_sft_records(data.path)
        examples = tokenize_records(self.tokenizer, records, data.max_seq_len)
        self.examples = shard(examples, self.worker.rank, self.worker.world_size)

    def train_step(self, step: int) -> dict[str, float]:
        indices = batch_indices(len(self.examples), self.config.batch_size_per_worker, step, self.config.seed)
        batch = collate([self.examples[i] for i in indices], self.tokenizer.pad_token_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self.phase("forward_backward"):
            with self.strategy.autocast():
                logits = self.strategy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = causal_lm_loss(logits, batch["labels"])
            self.strategy.backward(loss)
        with self.phase("optimizer"):
            grad_norm = self.strategy.step()
        return {
            "loss": float(loss.detach()),
            "grad_norm": grad_norm,
            "num_tokens": float(batch["attention_mask"].sum()),
            "num_target_tokens": float((batch["labels"] != IGNORE_INDEX).sum()),
        }
