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
    import torch.nn as nn
    from peft import LoraConfig, get_peft_model

    targets: list[str] | str = list(lora.target_modules)
    if targets == ["all-linear"]:  # peft's own choice: every Linear layer but the output head
        targets = "all-linear"
    else:
        modules = [(name, module) for name, module in model.named_modules() if name]
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in modules if isinstance(module, nn.Linear)})
        choices = f"pick from this model's Linear layers: {', '.join(linear)} (or all-linear)"
        missing, not_linear = [], []
        for target in targets:  # a name, or a dotted suffix like self_attn.q_proj, as peft matches them
            matched = [module for name, module in modules if name == target or name.endswith("." + target)]
            if not matched:
                missing.append(target)
            elif not any(isinstance(module, (nn.Linear, nn.Embedding)) for module in matched):
                not_linear.append(target)
        if missing:
            raise ValueError(f"lora.target_modules {missing} match no module of this model; {choices}")
        if not_linear:
            raise ValueError(f"lora.target_modules {not_linear} name modules that are not Linear layers "
                             f"(a block or a norm); {choices}")
    peft_config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
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

    The adapter, the base model's name and the output directory are checked, and the models loaded,
    before anything is written. A reward-model adapter (task SEQ_CLS, from `r1 train reward` with
    LoRA) is merged into a sequence-classification model with its trained score head, which GRPO's
    reward_model reward loads; a causal-LM adapter into a causal LM the engine serves. The output
    may not be the base model's or the adapter's directory, nor a directory that already holds a
    model. With `base_model` given, an `adapter_dir` that is not a local path is left to peft (a hub id).
    """
    from r1.model import check_output_dir, create_output_dir, resolve_source, save_pretrained

    adapter_dir = Path(adapter_dir).expanduser()
    out_dir = Path(out_dir).expanduser()
    adapter_config = check_adapter_dir(adapter_dir) if base_model is None or adapter_dir.exists() else {}
    source, is_local = resolve_source(base_model or adapter_base_model(adapter_dir))
    for name, path in (("the adapter directory", adapter_dir), ("the base model's directory", Path(source))):
        if out_dir.resolve() == path.resolve():
            raise ValueError(f"--out {out_dir} is {name} itself; the merged model would overwrite it: give another directory")
    check_output_dir(out_dir)  # before the minutes of loading; the directory is made only once they succeed
    resolved = out_dir.resolve()
    if (resolved / "config.json").exists() or any((resolved / name).exists() for name in ADAPTER_WEIGHTS):
        raise ValueError(f"--out {out_dir} already holds a model; give a new or empty directory")
    task_type = adapter_config.get("task_type") or "CAUSAL_LM"
    if task_type not in ("CAUSAL_LM", "SEQ_CLS"):
        raise ValueError(f"{adapter_dir} is a {task_type} adapter; merge-lora merges CAUSAL_LM (policy) and SEQ_CLS "
                         "(reward model) adapters")

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else Path(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
        if task_type == "SEQ_CLS":
            base = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=torch.float32,
                                                                      local_files_only=is_local)
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            base.config.pad_token_id = tokenizer.pad_token_id  # as `r1 train reward` sets it
        else:
            base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, local_files_only=is_local)
    except OSError as error:
        raise ValueError(f"cannot load the base model {source}: {error}") from None
    merged = load_adapter(base, adapter_dir, trainable=False).merge_and_unload()
    create_output_dir(out_dir)
    save_pretrained(merged, out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
