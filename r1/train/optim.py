"""AdamW over the trainable parameters, with linear warmup then a constant, linear or cosine schedule."""

from __future__ import annotations

import math
from typing import Any

import torch


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (LoRA target_modules matched nothing?)")
    return params


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr schedule {schedule!r} is not one of constant, linear, cosine")


def build_optimizer(params: list[torch.nn.Parameter], optim: Any, max_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """(AdamW, LambdaLR) from an `r1.config.TrainOptimConfig`."""
    optimizer = torch.optim.AdamW(
        params, lr=optim.lr, betas=(optim.beta1, optim.beta2), weight_decay=optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, warmup_steps=optim.warmup_steps, max_steps=max_steps, schedule=optim.schedule),
    )
    return optimizer, scheduler
