"""SFT data: plain-text corpora and chat JSONL, tokenized with loss masks, batched by step.

- Plain text (`.txt`/`.md`, or JSONL lines `{"text": ...}`): documents are joined with the EOS
  token and cut into `max_seq_len` blocks; every token is a target (self-supervised stage 1).
- Chat (`{"messages": [...]}` JSONL, or a generated task): one example per assistant reply, the
  chat template's generation prompt (labelled -100) followed by the reply and the template's
  end-of-turn text (the targets; the end-of-turn token teaches the model to stop). Loss is taken
  on assistant tokens only.

Batches are a pure function of (step, seed): the order is a seeded permutation per epoch, so a run
resumed at step s sees exactly the batches it would have seen. This module does not stream data
larger than memory.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken

    @property
    def num_target_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def check_input_file(path: str | Path, what: str, key: str) -> Path:
    """`path` (with ~ expanded) if it is a readable file; else a ValueError naming `what` and the config `key`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"{what} {path} does not exist; set {key} to an existing file")
    if not path.is_file():
        raise ValueError(f"{what} {path} is a directory, not a file; set {key} to a file")
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise ValueError(f"cannot read {what} {path}: {error.strerror or error}") from None
    return path


def read_text_file(path: str | Path) -> str:
    """The UTF-8 text of `path`; undecodable bytes are a ValueError naming the file and line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{path}:{line} is not UTF-8 text ({error.reason} at byte {error.start})") from None


def read_jsonl_lines(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of a JSONL file; a line that is not UTF-8, not
    JSON or not an object is a ValueError naming the file and line."""
    records = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{number} is not UTF-8 text ({error.reason} at byte {error.start} of the line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not valid JSON: {error}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number} must be a JSON object, got {type(record).__name__}")
            records.append((number, record))
    return records


CHAT_ROLES = ("system", "user", "assistant")


def check_sft_record(record: dict[str, Any], where: str) -> None:
    """A ValueError naming `where` (file and record) unless `record` is {"text": str} or a chat
    {"messages": [{"role": system|user|assistant, "content": str}, ...]} with an assistant reply."""
    if not ("messages" in record) ^ ("text" in record):
        raise ValueError(f"{where} needs exactly one of 'messages' (chat) or 'text' (plain text)")
    if "text" in record:
        if not isinstance(record["text"], str):
            raise ValueError(f"{where}: 'text' must be a string, got {type(record['text']).__name__}")
        return
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: messages[{index}] must be an object with 'role' and 'content', "
                             f"got {type(message).__name__}")
        if message.get("role") not in CHAT_ROLES:
            raise ValueError(f"{where}: messages[{index}].role must be one of {', '.join(CHAT_ROLES)}, "
                             f"got {message.get('role')!r}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: messages[{index}].content must be a string, "
                             f"got {type(message.get('content')).__name__}")
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(f"{where}: 'messages' has no assistant reply to learn from")


def load_sft_records(path: str | Path) -> list[dict[str, Any]]:
    """Records from a file: `.txt`/`.md` gives one {"text"} record; `.jsonl` gives its lines."""
    path = check_input_file(path, "SFT data file", "data.path")
    if path.suffix in (".txt", ".md"):
        text = read_text_file(path)
        if not text.strip():
            raise ValueError(f"SFT data file {path} is empty")
        return [{"text": text}]
    if path.suffix != ".jsonl":
        raise ValueError(f"SFT data file {path} must end in .txt, .md or .jsonl")
    lines = read_jsonl_lines(path)
    if not lines:
        raise ValueError(f"SFT data file {path} has no records (every line is blank)")
    for number, record in lines:
        check_sft_record(record, f"{path}:{number}")
    return [record for _, record in lines]


def level_counts(total: int, levels: list[int]) -> dict[int, int]:
    """Split `total` over `levels`; a level listed twice gets twice the share (e.g. [1, 1, 2])."""
    if not levels:
        raise ValueError("levels is empty; list at least one arithmetic level (1, 2 or 3)")
    counts: dict[int, int] = {}
    for index, level in enumerate(levels):
        share = total // len(levels) + (1 if index < total % len(levels) else 0)
        counts[level] = counts.get(level, 0) + share
    return counts


def arithmetic_records(num_examples: int, levels: list[int], seed: int, corpus_examples: int = 0) -> list[dict[str, Any]]:
    """Chat records from the arithmetic task's train split, spread over `levels` (see `level_counts`).

    With `corpus_examples`, a further text record holds the worked lines of that many other
    train-split problems, one computation per line: a dense self-supervised corpus of the arithmetic.
    """
    from r1.tasks.arithmetic import generate_problems, to_chat_example

    records: list[dict[str, Any]] = []
    for level, count in level_counts(num_examples, levels).items():
        problems = generate_problems(count, level=level, seed=seed, split="train")
        records.extend(to_chat_example(problem) for problem in problems)
    if corpus_examples:
        lines = []
        for level, count in level_counts(corpus_examples, levels).items():
            lines.extend(p.think for p in generate_problems(count, level=level, seed=seed + 1, split="train"))
        random.Random(seed).shuffle(lines)
        records.append({"text": "\n".join(lines)})
    return records


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def end_of_turn_text(tokenizer: Any) -> str:
    """What the chat template writes after an assistant reply (e.g. "<｜end▁of▁sentence｜>")."""
    probe = "r1-probe-reply"
    rendered = _render(tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}], False)
    if probe not in rendered:
        raise ValueError("the chat template drops assistant replies; SFT on chat data needs them rendered")
    return rendered[rendered.rindex(probe) + len(probe) :]


def strip_prefill(prompt_text: str, reply: str) -> str:
    """`reply` without the longest start of it that the generation prompt already ends with.

    R1 templates pre-fill "<think>\\n" after the assistant tag; a reply written as "<think>\\n..."
    must then be learned from just after the pre-fill, as the model generates it at inference.
    """
    for length in range(min(len(prompt_text), len(reply)), 0, -1):
        if prompt_text.endswith(reply[:length]):
            return reply[length:]
    return reply


def tokenize_chat(tokenizer: Any, messages: list[dict[str, str]], max_seq_len: int) -> list[TokenizedExample]:
    """One example per assistant reply: the rendered generation prompt (no loss), then the reply.

    The prompt is the chat template's rendering of the conversation so far with the generation
    prompt, exactly what the model sees at inference (R1 templates drop earlier replies' reasoning,
    so a conversation is not one consistent sequence). The target is the reply after the pre-fill
    plus the template's end-of-turn text, tokenized on its own as generated text would be.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; use plain-text data ({'text': ...}) or a chat model")
    if not any(m.get("role") == "assistant" for m in messages):
        raise ValueError("a chat example has no assistant message; there is nothing to learn from it")
    end_text = end_of_turn_text(tokenizer)
    examples = []
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt_text = _render(tokenizer, messages[:index], add_generation_prompt=True)
        target_text = strip_prefill(prompt_text, message.get("content") or "") + end_text
        prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        target_ids = list(tokenizer(target_text, add_special_tokens=False)["input_ids"])
        input_ids = (prompt_ids + target_ids)[:max_seq_len]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + target_ids)[:max_seq_len]
        examples.append(TokenizedExample(input_ids=input_ids, labels=labels))
    return examples


def tokenize_corpus(tokenizer: Any, texts: list[str], max_seq_len: int) -> list[TokenizedExample]:
    """Documents joined with EOS and cut into blocks of `max_seq_len` tokens (all tokens are targets)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    blocks = [stream[i : i + max_seq_len] for i in range(0, len(stream), max_seq_len)]
    return [TokenizedExample(input_ids=b, labels=list(b)) for b in blocks if len(b) > 1]


def tokenize_records(tokenizer: Any, records: list[dict[str, Any]], max_seq_len: int) -> list[TokenizedExample]:
    """Chat records become masked examples; text records become corpus blocks."""
    examples = [e for r in records if "messages" in r for e in tokenize_chat(tokenizer, r["messages"], max_seq_len)]
    texts = [r["text"] for r in records if "text" in r]
    if texts:
        examples.extend(tokenize_corpus(tokenizer, texts, max_seq_len))
    examples = [e for e in examples if e.num_target_tokens > 0]
    if not examples:
        raise ValueError("no training example has a target token (all truncated away?); raise data.max_seq_len")
    return examples


def collate(examples: list[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (IGNORE_INDEX on padding)."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def shard(items: list[Any], rank: int, world_size: int) -> list[Any]:
    """This rank's share (every world_size-th item); every rank gets at least one item."""
    if len(items) < world_size:
        raise ValueError(f"{len(items)} examples cannot be split over {world_size} workers; add data or use fewer workers")
    return items[rank::world_size]


def batch_indices(num_items: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the batch for optimizer step `step` (0-based): seeded shuffle, reshuffled per epoch."""
    if num_items <= 0:
        raise ValueError("cannot batch an empty dataset")
    start = step * batch_size
    indices = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, num_items)
        indices.append(_epoch_order(num_items, seed, epoch)[offset])
    return indices


@functools.lru_cache(maxsize=4)
def _epoch_order(num_items: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(num_items))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)
