"""Loading models: the embedded r1-tiny offline, local directories, clear errors otherwise."""

from __future__ import annotations

import pytest
import torch

from r1.config import ModelConfig
from r1.model import TINY_MODEL_DIR, context_length, load_model, resolve


def test_tiny_loads_offline_by_default(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = load_model(ModelConfig())
    assert model.config.model_type == "qwen2"
    assert next(model.parameters()).dtype == torch.float32  # auto on CPU
    assert context_length(model, tokenizer) == model.config.max_position_embeddings
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None


def test_local_directory_loads_in_requested_dtype(tmp_path):
    model, tokenizer = load_model(ModelConfig(model=str(TINY_MODEL_DIR), dtype="bf16"))
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.inference_mode():
        logits = model(torch.tensor([tokenizer.encode("1 + 1")])).logits
    assert torch.isfinite(logits.float()).all()


@pytest.mark.parametrize(
    "config, message",
    [
        # an uncached hub id with no network: say how to provide a local path
        (ModelConfig(model="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"), "Provide a local path"),
        # a path that does not exist
        (ModelConfig(model="./no/such/model"), "does not exist"),
        # a GPU asked for on a CPU machine (only meaningful where there is no GPU)
        *([(ModelConfig(device="cuda"), "device=cuda")] if not torch.cuda.is_available() else []),
        # fp16 matmuls are not supported on CPU
        (ModelConfig(dtype="fp16", device="cpu"), "dtype=fp16 is not supported on CPU"),
    ],
)
def test_load_errors_say_what_to_do(monkeypatch, config, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=message):
        load_model(config)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        resolve(ModelConfig(model=str(tmp_path)))


def test_an_adapter_directory_given_as_the_model_says_how_to_use_it(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(ValueError, match=r"holds LoRA adapters, not a whole model: .*r1 serve --lora NAME=.*merge-lora"):
        resolve(ModelConfig(model=str(tmp_path)))


def test_damaged_weights_are_an_error_naming_the_model(tmp_path):
    # A truncated download or a Git LFS pointer where model.safetensors should be.
    import shutil

    shutil.copytree(TINY_MODEL_DIR, tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(ValueError, match=f"could not load the model from {tmp_path / 'model'}: a weights file is damaged"):
        load_model(ModelConfig(model=str(tmp_path / "model")))
