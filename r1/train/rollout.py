"""GRPO rollouts: prompts with reference answers, group sampling with the r1 engine, policy batches.

`generate_groups` samples `group_size` completions per prompt with the continuous-batching engine
(all groups of a step in one `generate_batch` call); `group_batch` stores each group's prompt once
(left-padded) and every completion right-padded, with a mask over completion tokens (the generated
end-of-sequence token included, so the policy learns to stop); `completion_log_probs` scores the
completion tokens, running each group's prompt once and the LM head only where it predicts a
completion token.

This module does not compute rewards or losses.
"""

from __future__ import annotations

import itertools

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from r1.config import SamplingConfig
from r1.engine.runner import cache_kwarg, left_pad
from r1.train.grpo import token_log_probs
from r1.rewards import integer_answer
from r1.train.sft_data import check_input_file, level_counts, read_jsonl_lines


@dataclass
class PromptItem:
    prompt: str  # the user message
    answer: Any  # what the accuracy reward compares against
    prompt_ids: list[int]  # the rendered generation prompt


@dataclass
class Rollouts:
    """group_size consecutive rows per prompt."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    finish_reasons: list[str]


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """The chat template's generation prompt for one user message, as token ids."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(prompt, add_special_tokens=True))


def read_prompt_file(path: str | Path, need_integer_answers: bool = False) -> list[tuple[str, Any]]:
    """(prompt, answer) of each record of a prompt JSONL file; a bad record is a ValueError naming
    the file and line. `need_integer_answers`: the accuracy reward is on, so every record needs an
    integer "answer"."""
    file = check_input_file(path, "prompt file", "prompts.path")
    lines = read_jsonl_lines(file)
    if not lines:
        raise ValueError(f"prompt file {file} has no records (every line is blank)")
    for number, record in lines:
        if not isinstance(record.get("prompt"), str):
            raise ValueError(f"{file}:{number} needs a string 'prompt' (and an integer 'answer' for the accuracy reward)")
        if need_integer_answers and integer_answer(record.get("answer")) is None:
            raise ValueError(f"{file}:{number} needs an integer 'answer' for the accuracy reward, got {record.get('answer')!r}")
    return [(record["prompt"], record.get("answer")) for _, record in lines]


def load_prompt_items(
    tokenizer: Any, *, path: str | None, task: str | None, num_prompts: int, levels: list[int], seed: int,
    need_integer_answers: bool = False,
) -> list[PromptItem]:
    """Prompts from a JSONL file ({"prompt": str, "answer": ...}; all its records), or `num_prompts`
    of the arithmetic task's train split or of the coding tasks (answer: their unit tests, cycled).

    `need_integer_answers` (the accuracy reward is on): every file record needs an integer "answer"."""
    if task == "coding":
        from r1.codecheck.tasks import CODING_TASKS

        pairs = [(t.prompt, list(t.tests)) for t in itertools.islice(itertools.cycle(CODING_TASKS), num_prompts)]
    elif task == "arithmetic":
        from r1.tasks.arithmetic import generate_problems

        pairs: list[tuple[str, Any]] = []
        for level, count in level_counts(num_prompts, levels).items():
            pairs.extend((p.question, p.answer) for p in generate_problems(count, level=level, seed=seed, split="train"))
    else:
        if path is None:
            raise ValueError("set prompts.path to a JSONL file or prompts.task")
        pairs = read_prompt_file(path, need_integer_answers)
    return [PromptItem(prompt=p, answer=a, prompt_ids=encode_prompt(tokenizer, p)) for p, a in pairs]


def generate_groups(engine: Any, items: list[PromptItem], group_size: int, sampling: SamplingConfig) -> Rollouts:
    """`group_size` sampled completions per prompt, rows grouped by prompt."""
    requests = [item.prompt_ids for item in items for _ in range(group_size)]
    completions = engine.generate_batch(requests, sampling)
    failed = [c for c in completions if c.finish_reason == "abort"]
    if failed:
        raise RuntimeError(f"{len(failed)} rollouts were aborted by the engine: {failed[0].error}")
    return Rollouts(
        prompt_ids=[list(c.prompt_token_ids) for c in completions],
        completion_ids=[list(c.token_ids) for c in completions],
        texts=[c.text for c in completions],
        finish_reasons=[c.finish_reason for c in completions],
    )


def group_batch(
    prompt_ids: list[list[int]], completion_ids: list[list[int]], group_size: int, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """The rollouts of a step with each group's prompt stored once.

    Rows are group-contiguous and every row of a group has the same prompt (checked; group_size 1
    lays out rows that each have their own prompt). Returns
    prompt_input_ids / prompt_attention_mask / prompt_position_ids ([groups, prompt width],
    left-padded), completion_ids / completion_mask ([rows, completion width], right-padded) and
    completion_position_ids (each row's positions continue after its prompt's last real token).
    `completion_log_probs` runs the prompts once per group instead of once per sample.
    """
    rows = len(prompt_ids)
    if rows == 0 or rows % group_size or len(completion_ids) != rows:
        raise ValueError(f"{rows} prompts and {len(completion_ids)} completions do not form groups of {group_size}")
    prompts = prompt_ids[::group_size]
    for group, prompt in enumerate(prompts):
        if any(prompt_ids[group * group_size + k] != prompt for k in range(1, group_size)):
            raise ValueError(f"the rows of group {group} do not share one prompt")
    prompt_input_ids, prompt_mask = left_pad(prompts, pad_token_id, torch.device("cpu"))
    completion_width = max(max(len(c) for c in completion_ids), 1)
    completion = torch.full((rows, completion_width), pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((rows, completion_width), dtype=torch.long)
    for row, ids in enumerate(completion_ids):
        completion[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        completion_mask[row, : len(ids)] = 1
    prompt_lengths = prompt_mask.sum(-1).repeat_interleave(group_size)
    return {
        "prompt_input_ids": prompt_input_ids,
        "prompt_attention_mask": prompt_mask,
        "prompt_position_ids": (prompt_mask.cumsum(-1) - 1).clamp(min=0),
        "completion_ids": completion,
        "completion_mask": completion_mask,
        "completion_position_ids": prompt_lengths.unsqueeze(1) + torch.arange(completion_width),
    }


def num_batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real tokens the policy forward processes for a `group_batch` (each prompt counted once)."""
    return int(batch["prompt_attention_mask"].sum() + batch["completion_mask"].sum())


def completion_log_probs(
    model: Any, batch: dict[str, torch.Tensor], temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each completion token, completion mask), both [rows, completion width], of a `group_batch`.

    Each group's prompt runs once, keeping its key/value cache (with gradients); the cache is
    repeated for the group's rows and the completions run on it, so the log-probs and gradients
    are those of each row run alone, without recomputing a prompt for every sample. Only positions
    that predict completion tokens go through the LM head.

    `temperature` divides the logits first: with the rollouts' sampling temperature these are the
    log-probs of the distribution the tokens were drawn from (as TRL and veRL compute them), so the
    importance ratio and the KL compare sampling policies.
    """
    from transformers import DynamicCache

    cache_arg = cache_kwarg(getattr(model, "module", model))  # DDP/DeepSpeed wrap the model
    completion = batch["completion_ids"]
    rows, width = completion.shape
    group_size = rows // batch["prompt_input_ids"].shape[0]
    cache = DynamicCache()
    prompt_out = model(
        input_ids=batch["prompt_input_ids"],
        attention_mask=batch["prompt_attention_mask"],
        position_ids=batch["prompt_position_ids"],
        use_cache=True,
        logits_to_keep=1,
        **{cache_arg: cache},
    )
    # The prompt's last position predicts every row's first completion token.
    logits = [prompt_out.logits[:, -1:, :].repeat_interleave(group_size, dim=0)]
    if width > 1:
        # The last completion token predicts nothing we score: feed the first width - 1.
        cache.batch_repeat_interleave(group_size)
        prompt_mask = batch["prompt_attention_mask"].repeat_interleave(group_size, dim=0)
        completion_mask = batch["completion_mask"][:, :-1]
        logits.append(model(
            input_ids=completion[:, :-1],
            attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
            position_ids=batch["completion_position_ids"][:, :-1],
            use_cache=True,
            **{cache_arg: cache},
        ).logits)
    return token_log_probs(torch.cat(logits, dim=1) / temperature, completion), batch["completion_mask"]
