"""Tests for the embedded r1-tiny model: reproducible build, shipped copy, tokenizer and chat template."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from r1.model.tiny import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    PRETOKENIZE_REGEX,
    TINY_MODEL_DIR,
    USER_TOKEN,
    VOCAB_SIZE,
    build_tiny,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

ROUND_TRIP_TEXTS = [
    # Plain English with punctuation and numbers.
    "Mia has 23 apples. She buys 45 more. How many apples does she have now?",
    # Chinese: byte-level BPE must encode it without unknown tokens.
    "忘记密码怎么办？",
    # Chinese mixed with English and full-width punctuation.
    "请点击“忘记密码”，然后登录 your account（账户）。",
    # Python code: indentation, newlines and symbols.
    "def add(a: int, b: int) -> int:\n    return a + b  # sum\n\n\tprint({'x': [1, 2]})\n",
    # Characters never seen in training (emoji, other scripts) still round-trip as bytes.
    "Emoji 🚀, Ελληνικά, русский, العربية, 日本語のテキスト",
    # Whitespace runs, CRLF, trailing spaces.
    "  leading and trailing  \r\n\n\t ",
    # A full R1-style completion with think tags.
    "<think>\n23 + 45 = 68\n</think>\nThe answer is 68.",
    # A literal string that looks like a Qwen special token is plain text here.
    "<|endoftext|> is not special in r1-tiny",
]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR)


def test_build_twice_gives_identical_files(tmp_path: Path) -> None:
    first = build_tiny(tmp_path / "first", seed=0)
    second = build_tiny(tmp_path / "second", seed=0)
    names = sorted(path.name for path in first.iterdir())
    assert names == sorted(path.name for path in second.iterdir())
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"} <= set(names)
    for name in names:
        assert _sha256(first / name) == _sha256(second / name), name
    # The seed matters: another seed gives other weights but the same tokenizer.
    other = build_tiny(tmp_path / "other", seed=1)
    assert _sha256(other / "model.safetensors") != _sha256(first / "model.safetensors")
    assert _sha256(other / "tokenizer.json") == _sha256(first / "tokenizer.json")
    # Shipped inside the package: files must be readable by any user.
    assert all((first / name).stat().st_mode & 0o444 == 0o444 for name in names)


def test_shipped_copy_loads_offline_and_generates() -> None:
    # A fresh interpreter with the hub switched off: nothing may need the network.
    script = f"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained({str(TINY_MODEL_DIR)!r})
model = AutoModelForCausalLM.from_pretrained({str(TINY_MODEL_DIR)!r})
ids = tokenizer.apply_chat_template([{{"role": "user", "content": "2 + 3?"}}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
print(json.dumps({{"prompt": ids["input_ids"].shape[1], "total": out.shape[1], "max_id": int(out.max())}}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["total"] == report["prompt"] + 4
    assert report["max_id"] < VOCAB_SIZE


def test_model_config(model, tokenizer) -> None:
    config = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (256, 4, 4)
    assert (config.num_key_value_heads, config.intermediate_size, config.max_position_embeddings) == (2, 704, 1024)
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert config.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert config.vocab_size == len(tokenizer) == VOCAB_SIZE
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert model.dtype == torch.float32
    # About 3.5M parameters: small enough to train on CPU.
    assert 2_000_000 < sum(p.numel() for p in model.parameters()) < 5_000_000
    assert tokenizer.model_max_length == 1024


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < VOCAB_SIZE for i in ids)


def test_special_and_think_tokens(tokenizer) -> None:
    for token in (BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, PAD_TOKEN, "<think>", "</think>"):
        assert len(tokenizer.encode(token)) == 1, token
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert tokenizer.unk_token is None  # byte-level: nothing is unknown
    # Plain encoding adds no BOS/EOS: the chat template writes BOS itself.
    assert tokenizer.encode("hi")[0] != tokenizer.bos_token_id
    text = f"{BOS_TOKEN}{USER_TOKEN}q{ASSISTANT_TOKEN}<think>\nr\n</think>\na{EOS_TOKEN}"
    # Think tags are not special, so they survive skip_special_tokens (as in DeepSeek's tokenizer).
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == "q<think>\nr\n</think>\na"


def test_text_is_nfc_normalized(tokenizer) -> None:
    # Like Qwen2/DeepSeek tokenizers: a decomposed accent comes back composed (documented behaviour).
    assert tokenizer.decode(tokenizer.encode("cafe\u0301")) == "caf\u00e9"


def test_digits_are_single_tokens(tokenizer) -> None:
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode("12345 + 678 = 13023"))
    digits = [token for token in tokens if any(ch.isdigit() for ch in token)]
    assert digits == list("12345678") + list("13023")


def test_autotokenizer_pipeline_matches_tokenizer_json(tokenizer) -> None:
    # transformers 5 rebuilds qwen2 tokenizers with its own pipeline; r1-tiny must already be that
    # pipeline, or the tokenizer we trained and the one every loader uses would differ.
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_REGEX

    assert PRETOKENIZE_REGEX == QWEN2_REGEX
    raw = PreTrainedTokenizerFast(tokenizer_file=str(TINY_MODEL_DIR / "tokenizer.json"))
    loaded = json.loads(tokenizer.backend_tokenizer.to_str())
    stored = json.loads((TINY_MODEL_DIR / "tokenizer.json").read_text())
    for part in ("normalizer", "pre_tokenizer", "decoder", "added_tokens"):
        assert loaded[part] == stored[part], part
    assert loaded["model"]["vocab"] == stored["model"]["vocab"]
    assert loaded["model"]["merges"] == stored["model"]["merges"]
    for text in ROUND_TRIP_TEXTS:
        assert tokenizer.encode(text) == raw.encode(text)


SYSTEM = {"role": "system", "content": "You are helpful."}
USER_1 = {"role": "user", "content": "What is 2 + 3?"}
ASSISTANT_1 = {"role": "assistant", "content": "<think>\n2 + 3 = 5\n</think>\n\nThe answer is 5."}
USER_2 = {"role": "user", "content": "And 4 + 4?"}
B, E, U, A = BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN

# (messages, add_generation_prompt, exact rendering)
CHAT_CASES = [
    # Single user turn with generation prompt: assistant turn pre-filled with "<think>\n".
    ([USER_1], True, f"{B}{U}What is 2 + 3?{A}<think>\n"),
    # Without generation prompt nothing follows the user turn.
    ([USER_1], False, f"{B}{U}What is 2 + 3?"),
    # System text goes right after BOS, without a role marker (DeepSeek-R1 style).
    ([SYSTEM, USER_1], True, f"{B}You are helpful.{U}What is 2 + 3?{A}<think>\n"),
    # Assistant history keeps only the answer: reasoning and whitespace after </think> are dropped.
    ([SYSTEM, USER_1, ASSISTANT_1, USER_2], True,
     f"{B}You are helpful.{U}What is 2 + 3?{A}The answer is 5.{E}{U}And 4 + 4?{A}<think>\n"),
    # An assistant message without reasoning is kept as is.
    ([USER_1, {"role": "assistant", "content": "5"}, USER_2], False,
     f"{B}{U}What is 2 + 3?{A}5{E}{U}And 4 + 4?"),
    # Chinese content passes through unchanged.
    ([{"role": "user", "content": "忘记密码怎么办？"}], True, f"{B}{U}忘记密码怎么办？{A}<think>\n"),
]


@pytest.mark.parametrize(("messages", "add_generation_prompt", "expected"), CHAT_CASES)
def test_chat_template_exact(tokenizer, messages, add_generation_prompt: bool, expected: str) -> None:
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert rendered == expected
    # Tokenized rendering: exactly one BOS (the template's), the same ids as encoding the string.
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, return_dict=False)
    assert ids == tokenizer.encode(expected)
    assert ids.count(tokenizer.bos_token_id) == 1


def test_chat_template_rejects_unknown_roles(tokenizer) -> None:
    # A tool/function role would silently vanish from the prompt; the template refuses it instead.
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="role must be system, user or assistant"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_shipped_weights_are_the_trained_arithmetic_model(tiny) -> None:
    # The embedded default is r1-tiny after SFT and GRPO on the arithmetic task (ray_configs/train_tiny_*.yaml):
    # held-out 2-operand problems, greedy, exact match (measured 99.8 % on 2000; the target is 90 %).
    from r1.train.evaluate import evaluate_arithmetic

    model, tokenizer = tiny
    result = evaluate_arithmetic(model, tokenizer, num_problems=100, level=1, seed=0)
    assert result.accuracy >= 0.9 and result.format_rate >= 0.95, result
