"""Bradley–Terry reward model: a scalar head on the base model, trained on preference pairs.

Data is JSONL with one `{"prompt": str, "chosen": str, "rejected": str}` per line. Each side is
rendered as the chat template's generation prompt for the user prompt followed by the response
(plain concatenation without a template) and scored at its last token by
`AutoModelForSequenceClassification(num_labels=1)` (a linear head on the final hidden state). The
loss is -log sigmoid(score(chosen) - score(rejected)); pairwise accuracy is the share of held-out
pairs where the chosen side scores higher.

The trained model is a normal Hugging Face directory; `RewardModelReward` in `r1.rewards` loads it
to score GRPO rollouts. This module does not calibrate scores or train on ties.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from r1.train.sft_data import check_input_file, read_jsonl_lines


@dataclass
class PreferencePair:
    chosen_ids: list[int]
    rejected_ids: list[int]


def load_preferences(path: str | Path) -> list[dict[str, str]]:
    path = check_input_file(path, "preference file", "data.path")
    lines = read_jsonl_lines(path)
    for number, record in lines:
        missing = [key for key in ("prompt", "chosen", "rejected") if not isinstance(record.get(key), str)]
        if missing:
            raise ValueError(f"{path}:{number} needs string fields prompt, chosen, rejected; missing {missing}")
    records = [record for _, record in lines]
    if len(records) < 2:
        raise ValueError(f"{path} holds {len(records)} preference pairs; a reward model needs at least 2")
    return records


def render_response(tokenizer: Any, prompt: str, response: str) -> str:
    """The text a reward model scores: the rendered generation prompt, then the response.

    Responses are what the policy writes after the generation prompt (for R1 templates: after the
    pre-filled "<think>\\n"), so training pairs and GRPO rollouts are scored on the same text shape.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + response
    return prompt + response


def tokenize_pairs(tokenizer: Any, records: list[dict[str, str]], max_seq_len: int) -> list[PreferencePair]:
    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])[:max_seq_len]

    return [
        PreferencePair(
            chosen_ids=encode(render_response(tokenizer, r["prompt"], r["chosen"])),
            rejected_ids=encode(render_response(tokenizer, r["prompt"], r["rejected"])),
        )
        for r in records
    ]


def split_pairs(pairs: list[Any], eval_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, held-out) by a seeded shuffle; held-out gets at least one pair when eval_fraction > 0."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    num_eval = max(1, round(len(pairs) * eval_fraction)) if eval_fraction > 0 else 0
    if num_eval >= len(pairs):
        raise ValueError(f"eval_fraction={eval_fraction} leaves no training pairs out of {len(pairs)}; lower it")
    held_out = [pairs[i] for i in order[:num_eval]]
    train = [pairs[i] for i in order[num_eval:]]
    return train, held_out


def collate_pairs(pairs: list[PreferencePair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Chosen sequences in rows [0, B), rejected in rows [B, 2B), right-padded."""
    sequences = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """-mean log sigmoid(chosen - rejected)."""
    return -F.logsigmoid(chosen_scores.float() - rejected_scores.float()).mean()


def pairwise_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> float:
    return float((chosen_scores > rejected_scores).float().mean())


def sequence_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar per row, taken at each row's last real token."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [rows, 1] (pooled by the HF head)
    return logits.squeeze(-1)


def reward_model_from_base(source: str, tokenizer: Any, dtype: torch.dtype = torch.float32) -> Any:
    """The base checkpoint with a fresh scalar head (num_labels=1)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=dtype)
    # The head pools at the last non-padding token, so the model must know the padding id.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_reward_model(path: str, device: str = "cpu") -> tuple[Any, Any]:
    """A trained reward model directory (as written by `r1 train reward`), in eval mode."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not (Path(path).expanduser() / "config.json").exists():
        if (Path(path).expanduser() / "adapter_config.json").exists():
            raise ValueError(f"reward model {path} is a LoRA adapter; merge it first (`r1 model merge-lora --adapter "
                             f"{path} --out DIR`) and point model_path at DIR")
        raise ValueError(f"reward model {path} has no config.json; point model_path at the export of `r1 train reward`")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).to(device).eval()
    return model, tokenizer


@torch.no_grad()
def score_texts(model: Any, tokenizer: Any, texts: list[str], max_seq_len: int = 512, batch_size: int = 16) -> list[float]:
    """Scores of full texts (prompt + response), batched."""
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        encoded = [list(tokenizer(t, add_special_tokens=False)["input_ids"])[:max_seq_len] for t in chunk]
        length = max(len(e) for e in encoded)
        input_ids = torch.full((len(encoded), length), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        scores.extend(sequence_scores(model, input_ids.to(device), mask.to(device)).float().tolist())
    return scores
