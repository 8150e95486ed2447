"""Mixed precision for training: autocast contexts and the fp16 gradient scaler.

Weights and optimizer state stay fp32; `bf16`/`fp16` run the forward pass under autocast. fp16 has
a narrow exponent range, so its loss is scaled (GradScaler) to keep small gradients from flushing
to zero; bf16 has fp32's range and needs no scaler.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

Precision = Literal["fp32", "bf16", "fp16"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward-pass context for `precision` on `device` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in _DTYPES:
        raise ValueError(f"precision={precision!r} is not one of fp32, bf16, fp16")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("precision=bf16 needs a GPU with bf16 support (Ampere or newer); use precision=fp16")
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that is enabled only for fp16 (a pass-through otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
