"""LoRA: adapters attach to the named modules, merge into the base exactly, and the merged model serves."""

from __future__ import annotations

import pytest
import torch

from cluster.cli import main as r1_main
from r1.config import EngineConfig, ModelConfig, SamplingConfig, TrainLoraConfig
from r1.model import resolve_source
from r1.train.lora import adapter_base_model, apply_lora, is_adapter_dir, merge_lora


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A LoRA adapter on r1-tiny with non-zero weights (fresh LoRA is an exact no-op), saved to disk."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = resolve_source("r1-tiny")[0]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = apply_lora(model, TrainLoraConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_only_adapters_train_on_the_target_modules():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_source("r1-tiny")[0])
    peft_model = apply_lora(model, TrainLoraConfig(target_modules=["q_proj", "o_proj"]))
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable} == {"q_proj", "o_proj"}


def test_unknown_target_module_is_an_error():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_source("r1-tiny")[0])
    with pytest.raises(ValueError, match=r"\['query'\] match no module"):
        apply_lora(model, TrainLoraConfig(target_modules=["q_proj", "query"]))


def test_merged_logits_equal_adapter_logits(adapter_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert is_adapter_dir(adapter_dir)
    base_dir = adapter_base_model(adapter_dir)
    input_ids = torch.tensor([[0, 2, 100, 200, 300, 400, 3]])
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(base_dir), input_ids)
    adapter_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir))
    adapter_logits = _logits(adapter_model, input_ids)
    merged_dir = merge_lora(adapter_dir, tmp_path / "merged")
    merged_logits = _logits(AutoModelForCausalLM.from_pretrained(merged_dir), input_ids)
    # The adapter changes the model (so the comparison is not vacuous) ...
    assert (adapter_logits - base_logits).abs().max() > 1e-2
    # ... and merging reproduces it.
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=1e-4)
    assert not is_adapter_dir(merged_dir)


def test_merge_lora_cli_output_is_served_by_the_engine(adapter_dir, tmp_path, capsys):
    from r1.engine.engine import TransformersEngine
    from r1.model import load_model

    out = tmp_path / "merged-cli"
    assert r1_main(["model", "merge-lora", "--adapter", str(adapter_dir), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    model, tokenizer = load_model(ModelConfig(model=str(out), device="cpu"))
    engine = TransformersEngine(model, tokenizer, EngineConfig(max_num_seqs=2))
    (completion,) = engine.generate_batch(
        [[{"role": "user", "content": "Mia has 3 pens."}]], SamplingConfig(temperature=0, max_new_tokens=4)
    )
    assert len(completion.token_ids) >= 1 and completion.finish_reason in ("stop", "length")


def test_an_adapter_as_training_writes_it_serves_beside_its_base_as_its_merged_model(adapter_dir, tmp_path):
    """The adapter format `apply_lora` + `save_pretrained` write is what `engine.lora_adapters` reads:
    served beside the base model, the adapter's logits are the merged model's (within float
    rounding: two small matmuls instead of one folded weight)."""
    from r1.engine.lora import attach_adapters
    from r1.engine.runner import LocalModelRunner
    from r1.model import load_model

    merged_dir = merge_lora(adapter_dir, tmp_path / "merged")
    merged, tokenizer = load_model(ModelConfig(model=str(merged_dir), device="cpu", dtype="fp32"))
    base, _ = load_model(ModelConfig(model="r1-tiny", device="cpu", dtype="fp32"))
    names, rows = attach_adapters(base, {"trained": str(adapter_dir)})
    prompt = tokenizer.encode("Mia has 3 pens. She buys 4 more.")
    expected = LocalModelRunner(merged).add(["a"], [prompt])
    served = LocalModelRunner(base, adapter_rows=rows).add(["a", "b"], [prompt, prompt], adapters=[names["trained"], 0])
    torch.testing.assert_close(served[0], expected[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(served[1], expected[0], atol=1e-3)  # the base row is not the adapter's


def test_merge_lora_refuses_a_plain_model_directory(tmp_path):
    with pytest.raises(ValueError, match="not a LoRA adapter directory"):
        merge_lora(resolve_source("r1-tiny")[0], tmp_path / "out")


def test_merge_lora_keeps_a_reward_adapters_trained_score_head(tmp_path):
    # A LoRA run of `r1 train reward` exports a SEQ_CLS adapter; merging must give the reward model
    # (the score head trained beside the adapters), not a causal LM without it.
    from transformers import AutoTokenizer

    from r1.train.reward_model import load_reward_model, reward_model_from_base, score_texts

    base_dir = resolve_source("r1-tiny")[0]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = apply_lora(reward_model_from_base(base_dir, tokenizer),
                       TrainLoraConfig(rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]), "SEQ_CLS")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "score" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    adapter = tmp_path / "reward-adapter"
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    with pytest.raises(ValueError, match="is a LoRA adapter; merge it first"):
        load_reward_model(str(adapter))
    texts = ["Mia has 3 pens. 3", "1 + 1 = 2"]
    expected = score_texts(model.eval(), tokenizer, texts)
    merged = merge_lora(adapter, tmp_path / "reward-merged")
    reward_model, reward_tokenizer = load_reward_model(str(merged))
    assert reward_model.config.architectures == ["Qwen2ForSequenceClassification"]
    assert score_texts(reward_model, reward_tokenizer, texts) == pytest.approx(expected, abs=1e-4)


def test_merge_lora_refuses_to_overwrite_the_base_or_a_model(adapter_dir, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(resolve_source("r1-tiny")[0], base)
    before = (base / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="is the base model's directory"):
        merge_lora(adapter_dir, base, base_model=str(base))
    with pytest.raises(ValueError, match="already holds a model"):  # another model, named through a detour
        merge_lora(adapter_dir, tmp_path / "elsewhere" / ".." / "base", base_model=resolve_source("r1-tiny")[0])
    assert (base / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "elsewhere").exists()


def test_merge_lora_with_a_missing_base_writes_nothing(adapter_dir, tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(ValueError, match="base model"):
        merge_lora(adapter_dir, out, base_model="no-such-base-model")
    assert not out.exists()


def test_target_modules_accept_what_peft_does_and_refuse_non_linear_modules():
    from transformers import AutoModelForCausalLM

    def build(targets):
        model = AutoModelForCausalLM.from_pretrained(resolve_source("r1-tiny")[0], dtype=torch.float32)
        return apply_lora(model, TrainLoraConfig(rank=2, target_modules=targets))

    def adapted(model):
        return {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if "lora_A" in name}

    assert adapted(build(["self_attn.q_proj"])) == {"q_proj"}  # a dotted suffix
    assert adapted(build(["all-linear"])) >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for target in ("mlp", "input_layernorm", "layers"):
        with pytest.raises(ValueError, match=r"not Linear layers .* pick from this model's Linear layers: .*q_proj"):
            build([target])
