"""`r1 model build-tiny` and `r1 model merge-lora`: bad paths are exit-2 errors naming them, checked before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.cli import main as r1_main


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """A real (fresh) LoRA adapter on r1-tiny, saved by peft."""
    import torch
    from transformers import AutoModelForCausalLM

    from r1.config import TrainLoraConfig
    from r1.model import resolve_source
    from r1.train.lora import apply_lora

    model = AutoModelForCausalLM.from_pretrained(resolve_source("r1-tiny")[0], dtype=torch.float32)
    peft_model = apply_lora(model, TrainLoraConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj"]))
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    return out


@pytest.fixture
def paths(tmp_path, adapter_dir) -> dict[str, str]:
    """Placeholders for the argv table: an existing file, and two broken copies of the adapter."""
    (tmp_path / "file").write_text("not a directory")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_bytes((adapter_dir / "adapter_config.json").read_bytes())
    bad_json = tmp_path / "bad-json"
    bad_json.mkdir()
    (bad_json / "adapter_config.json").write_text("{base_model_name_or_path: r1-tiny}")
    (bad_json / "adapter_model.safetensors").write_bytes((adapter_dir / "adapter_model.safetensors").read_bytes())
    return {"tmp": str(tmp_path), "file": str(tmp_path / "file"), "adapter": str(adapter_dir),
            "no_weights": str(no_weights), "bad_json": str(bad_json)}


@pytest.mark.parametrize("argv, message", [
    # An existing file where the output directory goes: refused before the tokenizer is trained.
    (["build-tiny", "--out", "{file}"], "output directory {file} is an existing file"),
    # A directory that cannot be created (its parent is a file).
    (["build-tiny", "--out", "{file}/tiny"], "cannot create the output directory {file}/tiny: Not a directory"),
    # A valid adapter but an existing file as --out: refused before the merge, not after it.
    (["merge-lora", "--adapter", "{adapter}", "--out", "{file}"], "output directory {file} is an existing file"),
    # An adapter_config.json without the weights beside it: the folder and the missing file are named.
    (["merge-lora", "--adapter", "{no_weights}", "--out", "{tmp}/merged"],
     "LoRA adapter directory {no_weights} has no weights (adapter_model.safetensors"),
    # ... also when --base means the config's base model is not needed.
    (["merge-lora", "--adapter", "{no_weights}", "--base", "r1-tiny", "--out", "{tmp}/merged"],
     "{no_weights} has no weights"),
    # --out naming the adapter itself: the merged model would overwrite the adapter.
    (["merge-lora", "--adapter", "{adapter}", "--out", "{adapter}"], "is the adapter directory itself"),
    # A malformed adapter_config.json: the JSON error comes with the file's name.
    (["merge-lora", "--adapter", "{bad_json}", "--out", "{tmp}/merged"],
     "{bad_json}/adapter_config.json is not valid JSON: Expecting property name"),
])
def test_bad_paths_exit_2_naming_them(paths, capsys, argv, message):
    assert r1_main(["model", *[part.format(**paths) for part in argv]]) == 2
    captured = capsys.readouterr()
    assert message.format(**paths) in captured.err
    assert captured.err.startswith("r1: error: ") and captured.out == ""
    # Nothing was created for a merge that was refused.
    assert not Path(paths["tmp"], "merged").exists()


def test_model_without_a_subcommand_prints_the_model_usage_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        r1_main(["model"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "usage: r1 model " in captured.err and "MODEL_COMMAND" in captured.err
    assert "usage: r1 [-h]" not in captured.out + captured.err  # not the top-level help
