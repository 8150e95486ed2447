"""Training data and configs: assistant-only loss masks, corpus blocks, batching by step, validation."""

from __future__ import annotations

import json

import pytest

from r1.config import GRPOTrainConfig, RewardTrainConfig, SFTTrainConfig, TrainStrategyConfig, parse_config
from r1.train.reward_model import split_pairs
from r1.train.sft_data import (
    IGNORE_INDEX,
    batch_indices,
    collate,
    load_sft_records,
    shard,
    strip_prefill,
    tokenize_chat,
    tokenize_corpus,
    tokenize_records,
)


@pytest.fixture(scope="module")
def tokenizer():
    from r1.config import ModelConfig
    from r1.model import load_tokenizer

    return load_tokenizer(ModelConfig(model="r1-tiny"))


def _targets(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def test_chat_loss_only_on_the_assistant_reply(tokenizer):
    messages = [
        {"role": "user", "content": "Mia has 3 pens. She buys 4 more. How many pens does she have now?"},
        {"role": "assistant", "content": "<think>\n3 + 4 = 7\n</think>\nThe answer is 7."},
    ]
    (example,) = tokenize_chat(tokenizer, messages, max_seq_len=256)
    # The template pre-fills "<think>\n": the target starts after it and ends with EOS (learning to stop).
    assert _targets(tokenizer, example) == "3 + 4 = 7\n</think>\nThe answer is 7.<｜end▁of▁sentence｜>"
    prompt = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX])
    assert prompt == tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    # The prompt part is token for token what the engine feeds the model for these messages
    # (the rendered generation prompt, encoded without extra special tokens).
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert all(label == IGNORE_INDEX for label in example.labels[: len(prompt_ids)])


def test_multi_turn_chat_gives_one_example_per_reply_with_history_as_rendered(tokenizer):
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "<think>\nr1\n</think>\na1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "<think>\nr2\n</think>\na2"},
    ]
    first, second = tokenize_chat(tokenizer, messages, max_seq_len=256)
    assert _targets(tokenizer, first).startswith("r1\n</think>\na1")
    assert _targets(tokenizer, second).startswith("r2\n</think>\na2")
    # The R1 template drops the reasoning of earlier turns; the second example's context does too.
    context = tokenizer.decode([t for t, label in zip(second.input_ids, second.labels) if label == IGNORE_INDEX])
    assert "a1" in context and "r1" not in context


@pytest.mark.parametrize(
    "prompt, reply, expected",
    [
        ("<｜Assistant｜><think>\n", "<think>\nx</think>y", "x</think>y"),  # the pre-filled opener is not learned twice
        ("<｜Assistant｜><think>\n", "x</think>y", "x</think>y"),  # a reply without the opener is kept whole
        ("<|im_start|>assistant\n", "hello", "hello"),  # no overlap with a ChatML prompt
    ],
)
def test_strip_prefill(prompt, reply, expected):
    assert strip_prefill(prompt, reply) == expected


def test_truncation_keeps_prompt_and_drops_examples_without_targets(tokenizer):
    messages = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    # The prompt alone exceeds max_seq_len: no target survives, so the example is dropped with a clear error.
    with pytest.raises(ValueError, match="max_seq_len"):
        tokenize_records(tokenizer, [{"messages": messages}], max_seq_len=32)


def test_plain_text_corpus_is_blocked_with_every_token_a_target(tokenizer):
    blocks = tokenize_corpus(tokenizer, ["one two three four five six", "seven eight"], max_seq_len=4)
    assert all(len(b.input_ids) <= 4 and b.labels == b.input_ids for b in blocks)
    flat = [t for b in blocks for t in b.input_ids]
    assert flat.count(tokenizer.eos_token_id) == 2  # documents are separated by EOS


@pytest.mark.parametrize(
    "filename, content, message",
    [
        ("data.csv", "a,b", r"must end in \.txt, \.md or \.jsonl"),  # unsupported file type
        ("data.jsonl", '{"messages": []}\nnot json\n', r"data.jsonl:2 is not valid JSON"),  # names the bad line
        ("data.jsonl", '{"prompt": "x"}\n', "exactly one of 'messages'"),  # neither chat nor text
        # wrong shapes name the file, line and field instead of failing deep inside tokenization
        ("data.jsonl", '{"text": "ok"}\n{"messages": "hi"}\n', r"data.jsonl:2: 'messages' must be a non-empty list"),
        ("data.jsonl", '{"messages": [{"role": "user", "content": 5}]}\n', r"messages\[0\]\.content must be a string"),
        ("data.jsonl", '{"messages": [{"content": "x"}]}\n', r"messages\[0\]\.role must be one of"),
        ("data.jsonl", '{"messages": ["hi"]}\n', r"messages\[0\] must be an object"),
        ("data.jsonl", '{"messages": [{"role": "user", "content": "q"}]}\n', "no assistant reply"),
        ("data.jsonl", '{"text": ["a", "b"]}\n', "'text' must be a string, got list"),
        ("data.jsonl", '\n\n', "has no records"),  # an empty file is not "truncated away"
        ("data.txt", ' \n', "is empty"),
    ],
)
def test_bad_sft_files(tmp_path, filename, content, message):
    path = tmp_path / filename
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_sft_records(path)


def test_sft_jsonl_mixes_chat_and_text(tmp_path, tokenizer):
    path = tmp_path / "mix.jsonl"
    lines = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, {"text": "plain"}]
    path.write_text("\n".join(json.dumps(line) for line in lines))
    examples = tokenize_records(tokenizer, load_sft_records(path), max_seq_len=64)
    assert len(examples) == 2
    assert any(IGNORE_INDEX in e.labels for e in examples) and any(IGNORE_INDEX not in e.labels for e in examples)


def test_collate_pads_right_and_masks_padding():
    from r1.train.sft_data import TokenizedExample

    batch = collate([TokenizedExample([5, 6, 7], [-100, 6, 7]), TokenizedExample([8], [8])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_batches_are_a_function_of_the_step():
    # A resumed run must see exactly the batches the original run would have seen.
    assert batch_indices(10, 4, step=7, seed=1) == batch_indices(10, 4, step=7, seed=1)
    # One epoch visits every example once before any repeats.
    epoch = [i for step in range(5) for i in batch_indices(10, 2, step=step, seed=1)]
    assert sorted(epoch) == list(range(10))
    assert batch_indices(10, 2, step=0, seed=1) != batch_indices(10, 2, step=5, seed=1)  # reshuffled next epoch


def test_shard_splits_disjointly_and_refuses_too_little_data():
    items = list(range(5))
    assert shard(items, 0, 2) + shard(items, 1, 2) == [0, 2, 4, 1, 3]
    with pytest.raises(ValueError, match="cannot be split over 4 workers"):
        shard([1, 2], 0, 4)


def test_preference_split_holds_out_a_fraction():
    train, held_out = split_pairs(list(range(20)), eval_fraction=0.2, seed=0)
    assert len(held_out) == 4 and sorted(train + held_out) == list(range(20))
    with pytest.raises(ValueError, match="leaves no training pairs"):
        split_pairs([1, 2], eval_fraction=0.9, seed=0)


@pytest.mark.parametrize(
    "cls, data, message",
    [
        # SFT needs exactly one data source
        (SFTTrainConfig, {"data": {"task": "arithmetic", "path": "x.jsonl"}}, "also set data.task=null"),
        (SFTTrainConfig, {"data": {"task": None}}, "exactly one of data.path"),
        # ZeRO belongs to DeepSpeed
        (SFTTrainConfig, {"strategy": {"name": "ddp", "zero_stage": 2}}, "need strategy.name=deepspeed"),
        (SFTTrainConfig, {"strategy": {"name": "ddp", "cpu_shm_comm": True}}, "need strategy.name=deepspeed"),
        # parameter offload only exists in ZeRO-3
        (SFTTrainConfig, {"strategy": {"name": "deepspeed", "zero_stage": 2, "offload": "optimizer_and_params"}},
         "zero_stage=3"),
        # training keeps fp32 weights; a serving dtype is a mistake that names the fix
        (SFTTrainConfig, {"model": {"dtype": "bf16"}, "data": {"task": "arithmetic"}}, None),
        # GRPO groups need at least two samples to compare
        (GRPOTrainConfig, {"grpo": {"group_size": 1}}, "group_size"),
        # an empty reward list would train on nothing
        (GRPOTrainConfig, {"grpo": {"rewards": []}}, "grpo.rewards is empty"),
        # the reward stage has no default data
        (RewardTrainConfig, {}, "data: Field required"),
        # typos are errors listing allowed keys
        (GRPOTrainConfig, {"grpo": {"temperature": 0.7}}, "allowed keys:.*reward_temperature"),
    ],
)
def test_config_validation(cls, data, message):
    if message is None:  # validated when the stage starts, with the fix in the message
        assert parse_config(cls, data).model.dtype == "bf16"
        return
    with pytest.raises(ValueError, match=message):
        parse_config(cls, data)


def test_deepspeed_precision_on_cpu_is_refused():
    # DeepSpeed's bf16/fp16 paths need GPUs here; asking for them on CPU is an error naming the option.
    with pytest.raises(ValueError, match="precision=fp32 on CPU"):
        parse_config(SFTTrainConfig, {"strategy": {"name": "deepspeed"}, "precision": "bf16"})
    assert TrainStrategyConfig(name="deepspeed", zero_stage=3, offload="optimizer_and_params").zero_stage == 3


def test_grpo_defaults_follow_the_paper_and_the_guide():
    grpo = GRPOTrainConfig().grpo
    assert (grpo.group_size, grpo.clip_eps, grpo.kl_beta, grpo.reward_temperature) == (8, 0.2, 0.001, 0.7)
    assert grpo.loss_aggregation == "token"


def test_sft_file_errors_name_the_file_for_bytes_and_directories(tmp_path):
    bad = tmp_path / "data.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2 is not UTF-8"):
        load_sft_records(bad)
    text = tmp_path / "corpus.txt"
    text.write_bytes(b"line one\nline \xff two\n")
    with pytest.raises(ValueError, match=r"corpus.txt:2 is not UTF-8"):
        load_sft_records(text)
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(ValueError, match="is a directory, not a file; set data.path"):
        load_sft_records(tmp_path / "dir.jsonl")


@pytest.mark.parametrize("value, expected", [
    (12, 12), (-3, -3), (5.0, 5), ("42", 42), (" -7 ", -7),
    (4.7, None), (True, None), (None, None), ("4.7", None), ("x", None), ([1], None), ("٣", None),
    ("+-5", None), ("--5", None),  # these two used to pass the check and then raise in int()
    ("5-", None),
])
def test_integer_answer(value, expected):
    from r1.rewards import integer_answer

    assert integer_answer(value) == expected


def test_accuracy_reward_refuses_answers_it_cannot_compare():
    from r1.rewards import AccuracyReward

    reward = AccuracyReward()
    assert reward(["</think> 5", "</think> 5"], answers=[5, "5"]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="integer answers, got 4.7"):
        reward(["</think> 4"], answers=[4.7])  # 4.7 used to be truncated to 4 and scored correct


def test_prompt_files_need_integer_answers_for_the_accuracy_reward(tmp_path):
    from r1.train.rollout import read_prompt_file

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "2 + 3?", "answer": 5}\n{"prompt": "What is 2 + 3?"}\n')
    assert read_prompt_file(path) == [("2 + 3?", 5), ("What is 2 + 3?", None)]  # e.g. for a reward model
    with pytest.raises(ValueError, match=r"prompts.jsonl:2 needs an integer 'answer' for the accuracy reward, got None"):
        read_prompt_file(path, need_integer_answers=True)
    path.write_text("\n")
    with pytest.raises(ValueError, match="has no records"):
        read_prompt_file(path)


def test_resuming_needs_a_checkpoint_written_by_a_run_like_this_one(tmp_path):
    from r1.train.stage import STATE_FILE, check_resumable, checkpoint_facts, read_checkpoint_state

    sft = parse_config(SFTTrainConfig, {"data": {"task": "arithmetic"}})
    lora = parse_config(SFTTrainConfig, {"data": {"task": "arithmetic"}, "lora": {"enabled": True, "rank": 8}})
    state = {"step": 4, **checkpoint_facts("sft", sft)}
    check_resumable(state, tmp_path, "sft", sft)
    check_resumable({"step": 4}, tmp_path, "sft", sft)  # written before the facts were recorded
    with pytest.raises(ValueError, match="written with stage = 'sft', this run has 'grpo'"):
        check_resumable(state, tmp_path, "grpo", sft)
    with pytest.raises(ValueError, match="LoRA"):
        check_resumable(state, tmp_path, "sft", lora)
    smaller = lora.model_copy(update={"lora": lora.lora.model_copy(update={"rank": 4})})
    with pytest.raises(ValueError, match="'rank': 8"):
        check_resumable({"step": 4, **checkpoint_facts("sft", lora)}, tmp_path, "sft", smaller)
    for content, message in (("{", "is damaged"), ('{"stage": "sft"}', "no step count"), ('{"step": -1}', "no step count")):
        (tmp_path / STATE_FILE).write_text(content)
        with pytest.raises(ValueError, match=message):
            read_checkpoint_state(tmp_path)
