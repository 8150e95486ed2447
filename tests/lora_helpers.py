"""LoRA adapters of r1-tiny for the serving tests, written as `r1 train` with lora.enabled writes them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def write_adapter(out_dir: Path, seed: int, targets: list[str], rank: int = 4, scale: float = 0.05, **lora: Any) -> Any:
    """Write a peft LoRA adapter of r1-tiny to `out_dir` and return the model with it merged.

    peft starts B at zero (an adapter that changes nothing); here B is random too, so the adapter's
    greedy answers differ from the base model's."""
    from peft import LoraConfig, get_peft_model

    from r1.config import ModelConfig
    from r1.model import load_model

    model, _ = load_model(ModelConfig(model="r1-tiny", device="cpu", dtype="fp32"))
    generator = torch.Generator().manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=8, target_modules=targets, **lora))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    peft_model.save_pretrained(str(out_dir))
    return peft_model.merge_and_unload().eval()
