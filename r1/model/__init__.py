"""Loading causal language models and their tokenizers.

Any Hugging Face causal-LM directory or hub id loads through `load_model` with AutoModelForCausalLM /
AutoTokenizer (DeepSeek-R1-Distill-Qwen checkpoints load unchanged). The name "r1-tiny" resolves to
the embedded default model shipped inside the package, so every command works with no network.

This module does not download anything itself: hub ids go through the Hugging Face cache, and with
no network (or HF_HUB_OFFLINE=1) an uncached id is an error that says how to provide a local path.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from r1.config import ModelConfig

TINY_MODEL_NAME = "r1-tiny"
TINY_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "r1-tiny"

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model comes from and how it will be placed."""

    source: str  # local directory or hub id
    is_local: bool
    device: torch.device
    dtype: torch.dtype


def check_output_dir(out_dir: Path) -> Path:
    """A ValueError naming `out_dir` if it is an existing file (checked before long work that a
    later `create_output_dir` would otherwise waste)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output directory {out_dir} is an existing file; give a directory path")
    return out_dir


def create_output_dir(out_dir: Path) -> Path:
    """Create the folder a checkpoint is written to (before the work that fills it), or a ValueError naming it."""
    check_output_dir(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create the output directory {out_dir}: {error.strerror}") from None
    return out_dir


def save_pretrained(model: Any, out_dir: Path, **kwargs: Any) -> None:
    """`model.save_pretrained(out_dir)` with its stdout chatter sent to stderr: it imports DeepSpeed
    when installed (through accelerate), whose logger prints its accelerator detection to stdout,
    and stdout is for the calling command's own output."""
    with contextlib.redirect_stdout(sys.stderr):
        model.save_pretrained(out_dir, **kwargs)


def resolve_source(name: str) -> tuple[str, bool]:
    """Map a model name to a local directory or a hub id."""
    if name == TINY_MODEL_NAME:
        if not (TINY_MODEL_DIR / "config.json").exists():
            raise ValueError(
                f"the embedded model r1-tiny is missing from {TINY_MODEL_DIR}; "
                "rebuild it with `r1 model build-tiny --out " + str(TINY_MODEL_DIR) + "`"
            )
        return str(TINY_MODEL_DIR), True
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            if (path / "adapter_config.json").exists():  # a LoRA run's output: adapters, not a model
                raise ValueError(
                    f"{path} holds LoRA adapters, not a whole model: serve them beside their base model with "
                    f"`r1 serve --lora NAME={name}` (engine.lora_adapters), or write a merged model with "
                    f"`r1 model merge-lora --adapter {name} --out DIR` and use DIR")
            raise ValueError(f"model directory {path} has no config.json; point model= at a Hugging Face model directory")
        return str(path.resolve()), True
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1:
        raise ValueError(f"model path {name} does not exist")
    return name, False


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda was asked for but no CUDA GPU is available; use device=cpu or device=auto")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype == "fp16" and device.type == "cpu":
        raise ValueError("dtype=fp16 is not supported on CPU; use dtype=fp32 or dtype=bf16")
    return _DTYPES[dtype]


def resolve(config: ModelConfig) -> ResolvedModel:
    source, is_local = resolve_source(config.model)
    device = resolve_device(config.device)
    return ResolvedModel(source=source, is_local=is_local, device=device, dtype=resolve_dtype(config.dtype, device))


def _offline_hint(name: str) -> str:
    return (
        f"model {name!r} is not a local directory and could not be loaded from the Hugging Face cache "
        "(no network, or HF_HUB_OFFLINE=1). Provide a local path instead: download it on a machine with "
        f"network (`hf download {name} --local-dir DIR`), copy DIR here and pass --model DIR "
        "(or model: DIR in the YAML config)."
    )


def load_tokenizer(config: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    source, is_local = resolve_source(config.model)
    try:
        return AutoTokenizer.from_pretrained(
            source, revision=config.revision, trust_remote_code=config.trust_remote_code, local_files_only=is_local
        )
    except OSError as error:
        if is_local:
            raise ValueError(f"could not load the tokenizer from {source}: {error}") from None
        raise ValueError(_offline_hint(config.model)) from None


def load_model(config: ModelConfig) -> tuple[Any, Any]:
    """Load (model, tokenizer) as configured; the model is in eval mode on its device."""
    from transformers import AutoModelForCausalLM

    resolved = resolve(config)
    tokenizer = load_tokenizer(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved.source,
            revision=config.revision,
            dtype=resolved.dtype,
            attn_implementation=config.attn_implementation,
            trust_remote_code=config.trust_remote_code,
            local_files_only=resolved.is_local,
        )
    except OSError as error:
        if resolved.is_local:
            raise ValueError(f"could not load the model from {resolved.source}: {error}") from None
        raise ValueError(_offline_hint(config.model)) from None
    except ImportError as error:
        # e.g. attn_implementation=flash_attention_2 without the flash-attn package
        raise ValueError(f"attn_implementation={config.attn_implementation} is not usable here: {error}") from None
    except SafetensorError as error:
        # A truncated download, or a Git LFS pointer in place of the weights.
        raise ValueError(f"could not load the model from {resolved.source}: a weights file is damaged or not "
                         f"safetensors ({error}); download or copy it again") from None
    model.to(resolved.device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def context_length(model_or_config: Any, tokenizer: Any | None = None) -> int:
    """The number of tokens (prompt + generated) the model can attend to (from a model or its config)."""
    config = getattr(model_or_config, "config", model_or_config)
    length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if length is None:
        raise ValueError("cannot tell the model's context length: its config has no max_position_embeddings")
    tokenizer_max = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    if tokenizer_max and tokenizer_max < length:
        length = tokenizer_max
    return int(length)


def load_model_config(config: ModelConfig) -> Any:
    """The checkpoint's config (layers, context, ...) without loading weights."""
    from transformers import AutoConfig

    source, is_local = resolve_source(config.model)
    try:
        return AutoConfig.from_pretrained(source, revision=config.revision, trust_remote_code=config.trust_remote_code,
                                          local_files_only=is_local)
    except OSError:
        if is_local:
            raise
        raise ValueError(_offline_hint(config.model)) from None


def load_generation_config(config: ModelConfig) -> Any:
    """The checkpoint's generation config (EOS ids etc.), or None when it has none."""
    from transformers import GenerationConfig

    source, is_local = resolve_source(config.model)
    try:
        return GenerationConfig.from_pretrained(source, revision=config.revision, local_files_only=is_local)
    except OSError:
        return None
