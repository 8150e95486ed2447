"""Shared fixtures: the real embedded r1-tiny model, loaded once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the shipped r1-tiny, in fp32 on CPU."""
    from r1.config import ModelConfig
    from r1.model import load_model

    return load_model(ModelConfig(model="r1-tiny", device="cpu", dtype="fp32"))
