"""Engine options on the real r1-tiny: int8 quantization, packed oneDNN Linear layers, torch.compile,
bf16, and their config errors.

The int8 layer is checked against nn.Linear on random inputs, and the int8 engine against the fp32
one (logits on one forward, greedy answers on held-out arithmetic problems): a quantizer that lost a
scale, the bias or the row order would fail both. The compile option is checked for its wiring and
for equal greedy tokens with a counting backend (it records the graphs dynamo captures, then runs
them as captured): inductor's C++ compilation takes minutes on a small shared CPU, which is what the
benchmark (`bench/cpu_speed.py`) measures; the option itself uses inductor.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from r1.config import EngineConfig, ModelConfig, SamplingConfig
from r1.engine import TransformersEngine
from r1.engine.optimize import (
    DEFAULT_COMPILE_BACKEND,
    Int8DynamicLinear,
    apply_engine_options,
    check_engine_options,
    check_sharded_options,
    compile_decode,
    prepack_applies,
    prepack_linear,
    prepack_unsupported,
    quantize_int8,
)
from r1.tasks.arithmetic import generate_problems, is_correct

GREEDY_64 = SamplingConfig(temperature=0, max_new_tokens=64)


@pytest.fixture(scope="module")
def problems():
    """Held-out level-1 problems as chat prompts, with their answers."""
    items = generate_problems(8, level=1, seed=0, split="test")
    return [[{"role": "user", "content": p.question}] for p in items], [p.answer for p in items]


@pytest.fixture(scope="module")
def fp32_completions(tiny, problems):
    model, tokenizer = tiny
    return TransformersEngine(model, tokenizer).generate_batch(problems[0], GREEDY_64)


@pytest.fixture(scope="module")
def int8_engine():
    engine = TransformersEngine.from_config(ModelConfig(device="cpu", dtype="fp32"), EngineConfig(quantization="int8"))
    yield engine
    engine.shutdown()


def last_logits(model, tokenizer, prompt) -> torch.Tensor:
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    with torch.inference_mode():
        return model(ids).logits[0].float()


# -- int8 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "in_features, out_features, bias, input_shape, dtype",
    [
        (256, 704, True, (5, 256), torch.float32),  # 2-D input with a bias
        (704, 256, False, (2, 3, 704), torch.float32),  # batch x sequence x features, no bias
        (64, 40, True, (1, 64), torch.float32),  # one row, an odd output width
        (256, 128, True, (4, 7, 256), torch.bfloat16),  # bf16 activations: output stays bf16
    ],
)
def test_int8_linear_matches_linear(in_features, out_features, bias, input_shape, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    quantized = Int8DynamicLinear.from_linear(linear)
    x = torch.randn(*input_shape, dtype=dtype)
    with torch.inference_mode():
        expected, got = linear(x).float(), quantized(x)
    assert quantized.weight_int8.dtype == torch.int8
    assert got.dtype == dtype and got.shape == expected.shape
    relative_error = (got.float() - expected).norm() / expected.norm()
    assert relative_error < 0.03, f"int8 output is {relative_error:.3f} away from the Linear's (relative)"


def test_int8_engine_quantizes_decoder_linears_and_keeps_lm_head(int8_engine, tiny):
    model = int8_engine.model
    fp32_linears = sum(isinstance(m, nn.Linear) for m in tiny[0].model.layers.modules())
    assert fp32_linears > 0
    assert sum(isinstance(m, Int8DynamicLinear) for m in model.modules()) == fp32_linears
    assert not any(isinstance(m, nn.Linear) for m in model.model.layers.modules())
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.dtype == torch.float32


def test_int8_logits_stay_close_to_fp32(int8_engine, tiny, problems):
    model, tokenizer = tiny
    reference = last_logits(model, tokenizer, problems[0][0])
    quantized = last_logits(int8_engine.model, tokenizer, problems[0][0])
    cosine = torch.nn.functional.cosine_similarity(reference, quantized, dim=-1)
    assert cosine.min() > 0.99, f"per-position logits cosine similarity {cosine.min():.4f}"
    assert (reference.argmax(-1) == quantized.argmax(-1)).float().mean() >= 0.9


def test_int8_engine_answers_like_fp32(int8_engine, problems, fp32_completions):
    prompts, answers = problems
    completions = int8_engine.generate_batch(prompts, GREEDY_64)
    same = sum(a.token_ids == b.token_ids for a, b in zip(completions, fp32_completions))
    assert same >= len(prompts) - 2, f"only {same} of {len(prompts)} greedy completions equal fp32's"
    correct = [is_correct(c.text, a) for c, a in zip(completions, answers)]
    correct_fp32 = [is_correct(c.text, a) for c, a in zip(fp32_completions, answers)]
    assert sum(correct) >= sum(correct_fp32) - 1


def test_quantize_int8_can_skip_nothing():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    assert quantize_int8(model, skip=()) == 2
    assert all(not isinstance(m, nn.Linear) for m in model.modules())


# -- prepack ---------------------------------------------------------------------------------------
def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_bf16_prepack_support_follows_the_cpu():
    # oneDNN packs bf16 weights with AVX-512 BW/VL/DQ or AVX-NE-CONVERT only; an AVX2-only CPU refuses.
    flags = cpu_flags()
    able = {"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags
    assert prepack_unsupported(torch.float32) is None
    assert (prepack_unsupported(torch.bfloat16) is None) == able, (prepack_unsupported(torch.bfloat16), sorted(flags))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_linears_compute_what_linear_does(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 704), nn.ReLU(), nn.Linear(704, 96, bias=False)).to(dtype)
    x = torch.randn(3, 5, 256, dtype=dtype)
    single = torch.randn(1, 1, 256, dtype=dtype)  # another batch than the one the weights were packed for
    with torch.inference_mode():
        expected, expected_single = model(x), model(single)
        if prepack_unsupported(dtype) is not None:
            # This CPU cannot pack bf16 weights: a clear refusal that leaves the model as it was.
            with pytest.raises(ValueError, match="cannot pack bf16 weights on this machine.*dtype=fp32"):
                prepack_linear(model)
            assert [type(m).__name__ for m in model] == ["Linear", "ReLU", "Linear"]
            torch.testing.assert_close(model(x), expected, atol=0, rtol=0)
            return
        assert prepack_linear(model) == 2
        assert [type(m).__name__ for m in model] == ["PackedLinear", "ReLU", "PackedLinear"]
        got = model(x)
        got_transposed = model(x.transpose(0, 1).contiguous().transpose(0, 1))  # a non-contiguous input
        got_single = model(single)
    assert got.dtype == dtype
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(got_transposed, expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(got_single, expected_single, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("engine_config", [EngineConfig(prepack=True), None], ids=["true", "default"])
def test_prepacked_engine_answers_like_fp32(problems, fp32_completions, engine_config):
    # None: the default options, whose `prepack: auto` packs a CPU model.
    assert EngineConfig().prepack == "auto"
    engine = TransformersEngine.from_config(ModelConfig(device="cpu", dtype="fp32"), engine_config)
    try:
        assert not any(isinstance(m, nn.Linear) for m in engine.model.modules())  # the LM head too
        completions = engine.generate_batch(problems[0], GREEDY_64)
    finally:
        engine.shutdown()
    assert [c.token_ids for c in completions] == [c.token_ids for c in fp32_completions]


def small_model(dtype=torch.float32, device="cpu") -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).to(device=device, dtype=dtype)


@pytest.mark.parametrize("options", [{"quantization": "int8"}, {"compile": True}])
def test_prepack_auto_steps_aside_for_options_that_replace_the_linears(options):
    assert not prepack_applies(small_model(), EngineConfig(**options))
    check_engine_options(EngineConfig(**options), torch.device("cpu"))  # no conflict: auto is not a request
    assert prepack_applies(small_model(), EngineConfig())


def test_prepack_auto_packs_on_x86_64_only(monkeypatch):
    # Measured to pay on x86-64 CPUs; an Arm CPU's oneDNN may run other kernels, so auto stays off.
    import platform

    assert platform.machine().lower() in ("x86_64", "amd64")  # this machine: the tests below pack here
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    model = small_model()
    assert not prepack_applies(model, EngineConfig())
    assert [type(m).__name__ for m in apply_engine_options(model, EngineConfig())] == ["Linear", "ReLU", "Linear"]
    monkeypatch.setattr(platform, "machine", lambda: "AMD64")  # Windows' name for it
    assert prepack_applies(model, EngineConfig())


def test_prepack_auto_leaves_what_it_cannot_pack_alone(monkeypatch):
    # fp16 weights (oneDNN packs fp32 and bf16 only) and a model off the CPU are left as they are.
    assert not prepack_applies(small_model(torch.float16), EngineConfig())
    assert not prepack_applies(small_model(device="meta"), EngineConfig())
    check_engine_options(EngineConfig(), torch.device("cuda"))  # prepack: true would be an error there
    check_sharded_options(EngineConfig())  # and with pipeline_stages > 1
    # A CPU that cannot pack bf16 weights: auto leaves a bf16 model alone; prepack: true refuses it.
    from r1.engine import optimize

    monkeypatch.setattr(optimize, "prepack_unsupported",
                        lambda dtype: "no bf16 here" if dtype == torch.bfloat16 else None)
    model = small_model(torch.bfloat16)
    assert apply_engine_options(model, EngineConfig()) is model
    assert [type(m).__name__ for m in model] == ["Linear", "ReLU", "Linear"]
    with pytest.raises(ValueError, match="cannot pack bf16 weights on this machine: no bf16 here"):
        apply_engine_options(model, EngineConfig(prepack=True))
    apply_engine_options(small_model(), EngineConfig())  # fp32 still packs
    assert prepack_applies(small_model(), EngineConfig()) and not prepack_applies(model, EngineConfig())


@pytest.mark.parametrize("value, expected", [("auto", "auto"), (True, True), (False, False), ("true", True),
                                             ("False", False), ("AUTO", "auto")])
def test_prepack_config_values(value, expected):
    assert EngineConfig(prepack=value).prepack == expected


@pytest.mark.parametrize("value", ["sometimes", 1, None])
def test_prepack_config_rejects_other_values_in_one_line(value):
    from r1.config import ServeConfig, parse_config

    with pytest.raises(ValueError) as error:
        parse_config(ServeConfig, {"engine": {"prepack": value}})
    assert f"engine.prepack: expected true, false or auto (got {value!r})" in str(error.value)
    assert "literal" not in str(error.value)  # not one line per member of the union


@pytest.mark.parametrize("options, message", [
    ({"prepack": True, "quantization": "int8"}, "cannot be combined with quantization=int8 or compile=true"),
    ({"prepack": True, "compile": True}, "cannot be combined with quantization=int8 or compile=true"),
])
def test_prepack_conflicts_name_the_options(options, message):
    with pytest.raises(ValueError, match=message):
        check_engine_options(EngineConfig(**options), torch.device("cpu"))
    with pytest.raises(ValueError, match="prepack=true packs weights for oneDNN's CPU kernels"):
        check_engine_options(EngineConfig(prepack=True), torch.device("cuda"))


# -- bf16 ------------------------------------------------------------------------------------------
def test_bf16_engine_generates_with_bf16_weights(problems, fp32_completions):
    engine = TransformersEngine.from_config(ModelConfig(device="cpu", dtype="bf16"))
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    prompts, answers = problems
    completions = engine.generate_batch(prompts, GREEDY_64)
    assert all(c.token_ids for c in completions)
    correct = sum(is_correct(c.text, a) for c, a in zip(completions, answers))
    correct_fp32 = sum(is_correct(c.text, a) for c, a in zip(fp32_completions, answers))
    assert correct >= correct_fp32 - 1


# -- compile ---------------------------------------------------------------------------------------
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_option_wraps_forward_with_inductor(fresh_dynamo):
    engine = TransformersEngine.from_config(ModelConfig(device="cpu", dtype="fp32"), EngineConfig(compile=True))
    assert DEFAULT_COMPILE_BACKEND == "inductor"
    assert engine.model.forward.r1_compile_backend == "inductor"
    # the runner still finds the cache keyword in the wrapped forward's signature
    assert engine.runner._cache_kwarg in ("cache", "past_key_values")


def test_compiled_decode_gives_eager_tokens_with_one_graph_per_batch_kind(tiny, fresh_dynamo):
    model, tokenizer = tiny
    prompts = ["Mia has 23 apples. She buys 45 more. How many apples does she have now?", "Tom has 5 pens.",
               "Ana had 40 cards and gave 15 away.", "12 + 7"]
    # Different lengths: requests finish at different steps, so the batch shrinks from 4 to 1 while
    # the cache grows; dynamic shapes must cover that without a graph per step.
    samplings = [SamplingConfig(temperature=0, max_new_tokens=n, ignore_eos=True) for n in (24, 6, 12, 3)]
    eager = TransformersEngine(model, tokenizer).generate_batch(prompts, samplings)
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled_model = copy.deepcopy(model)
    compile_decode(compiled_model, backend=counting_backend)
    compiled_engine = TransformersEngine(compiled_model, tokenizer)
    # Buffer views would change the cache's strides as it grows: a compiled model keeps plain layers.
    assert compiled_engine.runner.growing_cache is False
    compiled = compiled_engine.generate_batch(prompts, samplings)
    assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]
    # batch >= 2 and batch == 1 (torch specializes size 1): at most two graphs for 24 decode steps
    assert 1 <= len(graphs) <= 2, f"{len(graphs)} graphs compiled"


# -- config errors ---------------------------------------------------------------------------------
def test_fp8_with_the_transformers_engine_is_an_error_before_loading():
    with pytest.raises(ValueError, match="fp8 needs engine=trtllm or vllm on a GPU"):
        TransformersEngine.from_config(ModelConfig(device="cpu"), EngineConfig(quantization="fp8"))


def test_int8_on_cuda_is_an_error():
    with pytest.raises(ValueError, match="quantization=int8 is CPU-only"):
        check_engine_options(EngineConfig(quantization="int8"), torch.device("cuda"))
    check_engine_options(EngineConfig(quantization="int8"), torch.device("cpu"))


@pytest.mark.parametrize("options", [{"quantization": "int8"}, {"compile": True}, {"prepack": True}])
def test_sharded_engine_rejects_model_transforms(options):
    with pytest.raises(ValueError, match="pipeline_stages > 1"):
        check_sharded_options(EngineConfig(**options))
    check_sharded_options(EngineConfig())


def test_options_off_leave_the_model_alone():
    # Every option off (the defaults, but prepack, whose default packs a CPU model).
    model = nn.Sequential(nn.Linear(8, 8))
    forward = model.forward
    assert apply_engine_options(model, EngineConfig(prepack=False)) is model
    assert isinstance(model[0], nn.Linear) and model.forward == forward
