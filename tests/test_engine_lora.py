"""LoRA adapters served beside the base model (r1/engine/lora.py): one engine, requests of several
adapters and of the base model in one batch, each answering as its merged model would."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from r1.config import EngineConfig, ModelConfig, SamplingConfig, ServeConfig
from r1.engine import RequestError, TransformersEngine
from r1.engine.lora import attach_adapters, check_adapter
from r1.engine.runner import LocalModelRunner
from tests.lora_helpers import write_adapter

PROMPTS = ["1 + 2 =", "Mia has 23 apples. She buys 45 more. How many", "7 * 8 ="]
GREEDY = SamplingConfig(temperature=0, max_new_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two adapters of different targets and ranks (one rsLoRA) and their merged models."""
    root = tmp_path_factory.mktemp("lora")
    merged = {
        "attn": write_adapter(root / "attn", 1, ["q_proj", "v_proj"]),
        "mlp": write_adapter(root / "mlp", 2, ["o_proj", "gate_proj", "down_proj"], rank=8, use_rslora=True),
    }
    return {name: str(root / name) for name in merged}, merged


def test_requests_of_each_adapter_and_the_base_in_one_batch_answer_as_their_merged_models(tiny, adapters):
    paths, merged = adapters
    model, tokenizer = tiny
    expected = {None: [c.token_ids for c in TransformersEngine(model, tokenizer).generate_batch(PROMPTS, GREEDY)]}
    for name, merged_model in merged.items():
        expected[name] = [c.token_ids for c in TransformersEngine(merged_model, tokenizer).generate_batch(PROMPTS, GREEDY)]
    assert expected["attn"] != expected[None] and expected["mlp"] != expected[None]  # the adapters change answers

    # The served engine as `r1 serve` builds it (its engine options applied after the adapters).
    engine = TransformersEngine.from_config(ModelConfig(model="r1-tiny", device="cpu", dtype="fp32"),
                                            EngineConfig(lora_adapters=paths))
    combos = [(prompt, adapter) for adapter in (None, "attn", "mlp") for prompt in PROMPTS]

    async def all_at_once():
        async def one(prompt, adapter):
            return [t async for delta in engine.stream(engine.make_request(prompt, GREEDY, adapter=adapter))
                    for t in delta.token_ids]
        return await asyncio.gather(*(one(prompt, adapter) for prompt, adapter in combos))

    engine.start()
    try:
        answers = asyncio.run(asyncio.wait_for(all_at_once(), timeout=300))
    finally:
        engine.shutdown()
    for (prompt, adapter), tokens in zip(combos, answers):
        assert tokens == expected[adapter][PROMPTS.index(prompt)], (adapter, prompt)


def test_base_rows_beside_adapter_rows_get_the_base_models_logits_exactly(tiny, adapters):
    """A base row adds nothing: its logits are bit for bit those of the model without adapters."""
    paths, _ = adapters
    model, tokenizer = tiny
    plain = LocalModelRunner(model)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    expected = plain.add(["a", "b", "c"], prompts)
    expected_step = plain.step(["a", "b", "c"], [5, 6, 7])

    from r1.model import load_model

    wrapped, _ = load_model(ModelConfig(model="r1-tiny", device="cpu", dtype="fp32"))
    names, rows = attach_adapters(wrapped, paths)
    runner = LocalModelRunner(wrapped, adapter_rows=rows)
    logits = runner.add(["a", "b", "c"], prompts, adapters=[0, names["attn"], 0])
    step = runner.step(["a", "b", "c"], [5, 6, 7])
    for row in (0, 2):
        assert torch.equal(logits[row], expected[row]) and torch.equal(step[row], expected_step[row])
    assert not torch.allclose(logits[1], expected[1]) and not torch.allclose(step[1], expected_step[1])
    runner.remove(["b"])
    assert runner.adapter_of == {}
    assert rows.rows is None and rows.single == 0  # nothing left set between forwards


def test_an_unknown_adapter_is_a_request_error_naming_the_adapter(tiny):
    engine = TransformersEngine(*tiny)
    with pytest.raises(RequestError) as error:
        engine.make_request("1 + 1 =", GREEDY, adapter="nope")
    assert (error.value.field, error.value.code) == ("adapter", "model_not_found")


@pytest.mark.parametrize("change, reason", [
    ({"use_dora": True}, "uses DoRA"),
    ({"modules_to_save": ["lm_head"]}, "saves whole modules"),
    ({"bias": "all"}, "trains biases"),
    ({"alpha_pattern": {"q_proj": 4}}, "alpha per module"),
    ({"task_type": "SEQ_CLS"}, "SEQ_CLS"),
])
def test_adapters_that_need_more_than_lora_matrices_are_refused_with_the_reason(adapters, tmp_path, change, reason):
    paths, _ = adapters
    source = paths["attn"]
    target = tmp_path / "changed"
    target.mkdir()
    config = json.loads((Path(source) / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**config, **change}))
    (target / "adapter_model.safetensors").write_bytes((Path(source) / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=f"{reason}.*merge-lora"):
        check_adapter("x", target)


def test_an_adapter_of_another_model_is_refused_naming_the_layer(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 999),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2)},
              str(tmp_path / "adapter_model.safetensors"))
    from r1.model import load_model

    model, _ = load_model(ModelConfig(model="r1-tiny", device="cpu", dtype="fp32"))
    with pytest.raises(ValueError, match=r"q_proj is \[64 x 999\] in the adapter .* another base model"):
        attach_adapters(model, {"other": str(tmp_path)})
    with pytest.raises(ValueError, match="no LoRA adapter directory|no adapter_config.json"):
        attach_adapters(model, {"missing": str(tmp_path / "nowhere")})


@pytest.mark.parametrize("settings, message", [
    ({"engine": {"lora_adapters": {"a": "/x"}, "compile": True}}, "compile"),
    ({"engine": {"lora_adapters": {"a": "/x"}, "engine": "trtllm"}}, "not trtllm"),
    ({"engine": {"lora_adapters": {"a": "/x"}}, "pipeline_stages": 2}, "pipeline_stages=2"),
    ({"engine": {"lora_adapters": {"r1-tiny": "/x"}}}, "the served model's own name"),
    ({"engine": {"lora_adapters": {"bad name": "/x"}}}, "adapter name 'bad name'"),
])
def test_adapter_settings_the_server_cannot_honour_are_config_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        ServeConfig.model_validate(settings)


def test_the_lora_benchmark_runs_and_reports_against_its_baseline():
    from bench.contract import validate
    from bench.lora import METHODS, main

    result = main(["--models", "tiny", "--adapters", "2", "--rank", "4", "--repeats", "1", "--new-tokens", "4",
                   "--num-requests", "4"])
    assert validate(result) == []
    rows = result["tables"][0]["rows"]
    assert [row[2] for row in rows] == METHODS and rows[0][4] == "1.00×"
    assert all(row[3] > 0 for row in rows)


def test_generate_with_lora_answers_as_the_merged_model_and_eval_merges_it(adapters, tmp_path, capsys):
    """`r1 generate --lora DIR` (the adapter served beside its base) prints what `r1 generate --model`
    of the `r1 model merge-lora` output prints; `r1 eval --lora DIR` evaluates the merged model."""
    from cluster.cli import main as r1_main

    paths, _ = adapters
    merged_dir = tmp_path / "merged"
    assert r1_main(["model", "merge-lora", "--adapter", paths["mlp"], "--out", str(merged_dir)]) == 0
    capsys.readouterr()
    flags = ["--temperature", "0", "--max-new-tokens", "24", "--device", "cpu", "--dtype", "fp32"]
    answers = {}
    for label, model_flags in (("lora", ["--lora", paths["mlp"]]), ("merged", ["--model", str(merged_dir)]),
                               ("base", [])):
        assert r1_main(["generate", "What is 12 + 7?", *flags, *model_flags]) == 0
        answers[label] = capsys.readouterr().out
    assert answers["lora"] == answers["merged"] != answers["base"]

    # An adapter strong enough to break the arithmetic: evaluated with it, r1-tiny gets problems wrong
    # that it gets right alone (its base model as the baseline).
    write_adapter(tmp_path / "strong", seed=3, targets=["q_proj", "v_proj", "down_proj"], scale=0.5)
    evaluate = ["eval", "--num-problems", "8", "--device", "cpu", "--json"]
    assert r1_main([*evaluate, "--lora", str(tmp_path / "strong"), "--baseline", "r1-tiny"]) == 0
    record = json.loads(capsys.readouterr().out)[0]
    assert record["lora"] == str(tmp_path / "strong") and record["comparison"]["broken"] > 0
    assert r1_main([*evaluate, "--lora", str(tmp_path / "missing")]) == 2
    assert "LoRA adapter '--lora'" in capsys.readouterr().err


def test_int8_keeps_an_adapted_lm_head_in_full_precision_as_it_keeps_a_plain_one(tmp_path):
    """quantization=int8 skips the LM head by name; wrapped by an adapter, it is still the LM head."""
    from r1.engine.optimize import Int8DynamicLinear, quantize_int8
    from r1.model import load_model

    from safetensors.torch import save_file

    model, _ = load_model(ModelConfig(model="r1-tiny", device="cpu", dtype="fp32"))
    hidden, vocab = model.lm_head.in_features, model.lm_head.out_features
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    save_file({"base_model.model.lm_head.lora_A.weight": torch.randn(2, hidden),
               "base_model.model.lm_head.lora_B.weight": torch.randn(vocab, 2),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, hidden),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight":
                   torch.randn(model.model.layers[0].self_attn.q_proj.out_features, 2)},
              str(tmp_path / "adapter_model.safetensors"))
    attach_adapters(model, {"head": str(tmp_path)})
    quantize_int8(model)
    assert type(model.lm_head.base) is torch.nn.Linear
    assert isinstance(model.model.layers[0].self_attn.q_proj.base, Int8DynamicLinear)
