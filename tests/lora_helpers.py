"""LoRA adapters of r1-tiny for the serving tests, written as `r1 train` with lora.enabled writes them."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_adapter(out_dir: Path, seed: int, targets: list[str], rank: int = 4, scale: float = 0.05, **lora: Any) -> Any:
    """Write a peft LoRA adapter of r1-tiny (alpha 8, random A and B) to `out_dir` and return the
    model with it merged; its greedy answers differ from the base model's."""
    from bench.lora import write_random_adapter
    from r1.config import ModelConfig
    from r1.model import load_model

    model, _ = load_model(ModelConfig(model="r1-tiny", device="cpu", dtype="fp32"))
    return write_random_adapter(model, out_dir, seed, targets, rank, 8, scale, **lora).merge_and_unload().eval()
