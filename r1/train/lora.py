"""LoRA adapters (guide §3.1, domain knowledge injection) via peft: attach, load, merge.

Only the adapters (and, for a reward model, its scalar head) train and are saved. `merge_lora`
folds an adapter directory into its base model and writes an ordinary Hugging Face checkpoint that
the serving engine loads like any other model (`r1 model merge-lora`).

This module does not quantize (no QLoRA) and does not pick target modules automatically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

TaskType = Literal["CAUSAL_LM", "SEQ_CLS"]
ADAPTER_CONFIG = "adapter_config.json"
# What peft saves an adapter's weights as (safetensors, or the older pickle), and loads them from.
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path).expanduser() / ADAPTER_CONFIG).exists()


def apply_lora(model: Any, lora: Any, task_type: TaskType = "CAUSAL_LM") -> Any:
    """Wrap `model` with fresh LoRA adapters from an `r1.config.TrainLoraConfig`."""
    from peft import LoraConfig, get_peft_model

    module_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [target for target in lora.target_modules if target not in module_names]
    if missing:
        raise ValueError(
            f"lora.target_modules {missing} match no module of this model; "
            f"pick from e.g. q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
        )
    peft_config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type=task_type,
    )
    return get_peft_model(model, peft_config)


def load_adapter(model: Any, adapter_dir: str | Path, trainable: bool) -> Any:
    """`model` with the adapters saved in `adapter_dir` (e.g. a checkpoint being resumed)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def check_adapter_dir(adapter_dir: str | Path) -> dict[str, Any]:
    """The adapter_config.json of a local adapter directory, once it and the weights beside it are found."""
    adapter_dir = Path(adapter_dir).expanduser()
    config_path = adapter_dir / ADAPTER_CONFIG
    if not config_path.exists():
        raise ValueError(f"{adapter_dir} is not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object (peft's LoraConfig), not {type(config).__name__}")
    if not any((adapter_dir / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ValueError(f"LoRA adapter directory {adapter_dir} has no weights ({' or '.join(ADAPTER_WEIGHTS)})")
    return config


def adapter_base_model(adapter_dir: str | Path) -> str:
    """The base model an adapter was trained on, as recorded in its adapter_config.json."""
    base = check_adapter_dir(adapter_dir).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{Path(adapter_dir).expanduser() / ADAPTER_CONFIG} does not name its base model; pass --base")
    return base


def merge_lora(adapter_dir: str | Path, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Fold the adapters into the base weights and save a plain checkpoint (with tokenizer) to out_dir.

    The adapter, the base model's name and the output directory are checked before anything loads.
    With `base_model` given, an `adapter_dir` that is not a local path is left to peft (a hub id).
    """
    from r1.model import create_output_dir, resolve_source, save_pretrained

    adapter_dir = Path(adapter_dir).expanduser()
    out_dir = Path(out_dir).expanduser()
    if base_model is None or adapter_dir.exists():
        check_adapter_dir(adapter_dir)
    source, _ = resolve_source(base_model or adapter_base_model(adapter_dir))
    if out_dir.resolve() == adapter_dir.resolve():
        raise ValueError(f"--out {out_dir} is the adapter directory itself; the merged model would overwrite the "
                         "adapter: give another directory")
    create_output_dir(out_dir)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    merged = load_adapter(base, adapter_dir, trainable=False).merge_and_unload()
    save_pretrained(merged, out_dir)
    tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else Path(source)
    AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(out_dir)
    return out_dir
