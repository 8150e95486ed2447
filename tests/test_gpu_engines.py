"""GPU engines (vLLM, TensorRT-LLM) on a CPU machine: selection, errors, and the shared logic.

The packages and a GPU are absent here, so these tests cover what does not need them: that
selecting a GPU engine fails with an error naming the option and the fix, that nothing imports
vllm or tensorrt_llm unless selected, the pure translation of r1's sampling options into each
package's, and the adapters' shared machinery (`r1.engine.gpu.AsyncPackageEngine`: cumulative
token ids in, r1 deltas out, streaming, abort, overload, shutdown), checked against the real
transformers engine on r1-tiny. The adapters' package calls run in `bench/gpu_check.sh`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from r1.config import EngineConfig, GenerateConfig, ModelConfig, SamplingConfig, ServeConfig
from r1.engine import EngineOverloaded, Request, TransformersEngine, create_engine
from r1.engine.gpu import (
    GPU_ENGINES,
    AsyncPackageEngine,
    TokenStream,
    engine_dtype_name,
    gpu_engine_problem,
    inflight_stats,
    map_finish_reason,
    package_installed,
    read_checkpoint,
)
from r1.engine.trtllm_engine import (
    fp8_plan,
    trtllm_llm_kwargs,
    trtllm_sampling_kwargs,
    write_calibration_dataset,
)
from r1.engine.trtllm_engine import first_output as trtllm_first_output
from r1.engine.vllm_engine import first_output as vllm_first_output
from r1.engine.vllm_engine import vllm_engine_kwargs, vllm_lora_kwargs, vllm_lora_request_args, vllm_sampling_kwargs

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 30.0


# -- selection and errors ------------------------------------------------------------------------

PROBLEMS = [
    # (engine settings, model device, cuda available, package installed, expected fragments or None)
    # int8 is the transformers engine's CPU quantization: a config error wherever it is checked.
    ({"engine": "vllm", "quantization": "int8"}, "auto", True, True, ["quantization=int8", "engine=transformers"]),
    ({"engine": "trtllm", "quantization": "int8"}, "auto", False, False, ["quantization=int8", "quantization=fp8"]),
    # torch.compile wraps the transformers engine's forward; the GPU engines compile themselves.
    ({"engine": "trtllm", "compile": True}, "auto", True, True, ["compile=true", "compile=false"]),
    # prepack packs weights for the transformers engine's oneDNN kernels; the GPU engines bring their own.
    ({"engine": "vllm", "prepack": True}, "auto", True, True, ["prepack=true", "prepack=false"]),
    # device=cpu contradicts a GPU-only engine.
    ({"engine": "vllm"}, "cpu", True, True, ["device=cpu", "engine=transformers"]),
    # No GPU: name the engine and the fix.
    ({"engine": "vllm"}, "auto", False, True, ["engine=vllm needs a CUDA GPU", "use engine=transformers"]),
    ({"engine": "trtllm"}, "cuda", False, False, ["engine=trtllm needs a CUDA GPU", "use engine=transformers"]),
    # GPU but no package: name the package and the pip extra that installs it.
    ({"engine": "vllm"}, "auto", True, False, ["the vllm package", "pip install 'r1-cluster[vllm]'"]),
    ({"engine": "trtllm"}, "auto", True, False, ["the tensorrt_llm package", "pip install 'r1-cluster[tensorrt]'"]),
    # Everything there: no problem, fp8 included.
    ({"engine": "vllm", "quantization": "fp8"}, "auto", True, True, None),
    ({"engine": "trtllm", "quantization": "fp8", "tensor_parallel_size": 2}, "cuda", True, True, None),
]


@pytest.mark.parametrize("engine, device, cuda, package, fragments", PROBLEMS)
def test_gpu_engine_problem_names_option_and_fix(engine, device, cuda, package, fragments):
    problem = gpu_engine_problem(
        EngineConfig(**engine), ModelConfig(device=device), cuda_available=cuda, package_available=package
    )
    if fragments is None:
        assert problem is None
    else:
        assert problem is not None
        for fragment in fragments:
            assert fragment in problem


@pytest.mark.parametrize("engine", ["vllm", "trtllm"])
def test_create_engine_here_raises_this_machines_problem(engine):
    """On this machine (no GPU engine package, usually no GPU) creating a GPU engine is the clear error."""
    config = EngineConfig(engine=engine)
    expected = gpu_engine_problem(
        config, ModelConfig(), cuda_available=torch.cuda.is_available(),
        package_available=package_installed(GPU_ENGINES[engine].module),
    )
    assert expected is not None, "this test covers machines that cannot run the engine; use bench/gpu_check.sh"
    with pytest.raises(ValueError) as raised:
        create_engine(ModelConfig(), config)
    assert str(raised.value) == expected
    if not torch.cuda.is_available():
        assert f"engine={engine} needs a CUDA GPU" in expected


@pytest.mark.parametrize("engine, package, extra", [("vllm", "vllm", "vllm"), ("trtllm", "tensorrt_llm", "tensorrt")])
def test_missing_package_error_path_with_a_gpu(engine, package, extra, monkeypatch):
    """With a GPU present (pretended) but no package installed, create_engine names the package."""
    assert not package_installed(package), "this test needs a machine without the package"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match=rf"needs the {package} package.*r1-cluster\[{extra}\]"):
        create_engine(ModelConfig(), EngineConfig(engine=engine))
    assert package not in sys.modules


def test_config_errors_come_before_machine_checks():
    with pytest.raises(ValueError, match="quantization=int8"):
        create_engine(ModelConfig(), EngineConfig(engine="vllm", quantization="int8"))


def test_serve_config_refuses_a_sharded_gpu_engine():
    with pytest.raises(ValueError, match="pipeline_stages=2 needs engine=transformers"):
        ServeConfig.model_validate({"engine": {"engine": "vllm"}, "pipeline_stages": 2})


@pytest.mark.parametrize("engine", ["vllm", "trtllm"])
def test_llm_server_builds_the_configured_engine(engine):
    """The Serve LLM server goes through create_engine: here it meets the same clear error."""
    from actors.llm_server import _build_engine
    from r1.sequence_spans import RequestCarriers

    config = ServeConfig.model_validate({"engine": {"engine": engine}})
    with pytest.raises(ValueError) as raised:
        _build_engine(config, RequestCarriers())
    with pytest.raises(ValueError) as direct:
        create_engine(config.model, config.engine)
    assert str(raised.value) == str(direct.value) and f"engine={engine}" in str(raised.value)


def test_generate_config_refuses_a_gpu_engine_on_cpu():
    with pytest.raises(ValueError, match="engine=trtllm needs a GPU"):
        GenerateConfig.model_validate({"model": {"device": "cpu"}, "engine": {"engine": "trtllm"}})


def test_gpu_engine_packages_are_imported_only_when_selected():
    code = (
        "import sys\n"
        "from r1.config import EngineConfig, ModelConfig, SamplingConfig\n"
        "from r1.engine import create_engine\n"
        "import r1.engine.gpu, r1.engine.vllm_engine, r1.engine.trtllm_engine\n"
        "engine = create_engine(ModelConfig(device='cpu', dtype='fp32'), EngineConfig())\n"
        "assert engine.name == 'transformers'\n"
        "out = engine.generate_batch(['1 + 1'], SamplingConfig(temperature=0, max_new_tokens=2))\n"
        "assert len(out[0].token_ids) >= 1\n"
        "for name in ('vllm', 'trtllm'):\n"
        "    try:\n"
        "        create_engine(ModelConfig(), EngineConfig(engine=name))\n"
        "    except ValueError:\n"
        "        pass\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'tensorrt_llm', 'tensorrt'))\n"
        "print(leaked)\n"
        "sys.exit(1 if leaked else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


# -- pure translation ----------------------------------------------------------------------------


def _request(sampling: SamplingConfig, max_new_tokens: int = 16, stop_ids=frozenset({1, 7})) -> Request:
    return Request("r", [5, 6], sampling, max_new_tokens=max_new_tokens, stop_token_ids=frozenset(stop_ids))


SAMPLING_CASES = [
    # (sampling, expected vLLM kwargs subset, expected TensorRT-LLM kwargs subset)
    # Greedy: vLLM temperature 0 with filters off; TensorRT-LLM top_k=1, no temperature, no seed.
    (
        SamplingConfig(temperature=0, top_p=0.5, top_k=20, seed=3),
        {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "seed": 3},
        {"top_k": 1, "top_p": None, "temperature": None, "seed": None},
    ),
    # Sampling with top-k off (0): vLLM -1, TensorRT-LLM None; an unseeded request gets the fallback seed.
    (
        SamplingConfig(temperature=0.7, top_p=0.9, top_k=0),
        {"temperature": 0.7, "top_p": 0.9, "top_k": -1, "seed": None},
        {"temperature": 0.7, "top_p": 0.9, "top_k": None, "seed": 12345},
    ),
    # Explicit top-k and seed pass through unchanged.
    (
        SamplingConfig(temperature=1.3, top_k=40, seed=9),
        {"temperature": 1.3, "top_k": 40, "seed": 9},
        {"temperature": 1.3, "top_k": 40, "seed": 9},
    ),
    # Repetition penalty: vLLM always takes the value (1.0 = off); TensorRT-LLM None when off.
    (
        SamplingConfig(temperature=0, repetition_penalty=1.0),
        {"repetition_penalty": 1.0},
        {"repetition_penalty": None},
    ),
    (
        SamplingConfig(temperature=0, repetition_penalty=1.3),
        {"repetition_penalty": 1.3},
        {"repetition_penalty": 1.3},
    ),
    # Frequency and presence penalties: the same OpenAI semantics in both packages; TensorRT-LLM None when off.
    (
        SamplingConfig(temperature=0, frequency_penalty=0.5, presence_penalty=-1.0),
        {"frequency_penalty": 0.5, "presence_penalty": -1.0},
        {"frequency_penalty": 0.5, "presence_penalty": -1.0},
    ),
    (
        SamplingConfig(temperature=0),
        {"frequency_penalty": 0.0, "presence_penalty": 0.0},
        {"frequency_penalty": None, "presence_penalty": None},
    ),
    # logit_bias: vLLM takes the token -> bias map (None when empty); TensorRT-LLM refuses it at
    # make_request, so its kwargs never carry one.
    (
        SamplingConfig(temperature=0, logit_bias={5: -100.0}),
        {"logit_bias": {5: -100.0}},
        {},
    ),
    (
        SamplingConfig(temperature=0),
        {"logit_bias": None},
        {},
    ),
    # Stop tokens: the checkpoint's EOS ids, sorted; ignore_eos drops them in both packages.
    (
        SamplingConfig(temperature=0),
        {"stop_token_ids": [1, 7], "ignore_eos": False},
        {"stop_token_ids": [1, 7], "ignore_eos": False},
    ),
    (
        SamplingConfig(temperature=0, ignore_eos=True),
        {"stop_token_ids": [], "ignore_eos": True},
        {"stop_token_ids": None, "ignore_eos": True},
    ),
    # vLLM's extensions: min_p and min_tokens pass on (off: vLLM 0, TensorRT-LLM None; greedy
    # needs no min_p); the request's stop_token_ids join the end-of-sequence ids, with ignore_eos alone.
    (
        SamplingConfig(temperature=0.8, min_p=0.1, min_tokens=4, stop_token_ids=[9, 3]),
        {"min_p": 0.1, "min_tokens": 4, "stop_token_ids": [1, 3, 7, 9]},
        {"min_p": 0.1, "min_tokens": 4, "stop_token_ids": [1, 3, 7, 9]},
    ),
    (
        SamplingConfig(temperature=0, min_p=0.1, ignore_eos=True, stop_token_ids=[9]),
        {"min_p": 0.0, "min_tokens": 0, "stop_token_ids": [9], "ignore_eos": True},
        {"min_tokens": None, "stop_token_ids": [9], "ignore_eos": True},
    ),
    # Stop strings are r1's job (its detokenizer), so neither package gets them nor detokenizes.
    (
        SamplingConfig(temperature=0, stop=["\n\n", "</answer>"]),
        {"detokenize": False, "n": 1, "max_tokens": 16},
        {"detokenize": False, "n": 1, "max_tokens": 16},
    ),
]


@pytest.mark.parametrize("sampling, vllm_expected, trtllm_expected", SAMPLING_CASES)
def test_sampling_translation(sampling, vllm_expected, trtllm_expected):
    request = _request(sampling)
    vllm = vllm_sampling_kwargs(request)
    trtllm = trtllm_sampling_kwargs(request, fallback_seed=12345)
    assert {k: vllm[k] for k in vllm_expected} == vllm_expected
    assert {k: trtllm[k] for k in trtllm_expected} == trtllm_expected
    assert "stop" not in vllm and "stop" not in trtllm


def test_token_masks_go_to_vllm_only_when_asked_and_trtllm_refuses_them():
    # vLLM's own allowed_token_ids and bad_words (its SamplingParams tokenizes the words); absent
    # when not asked for (vLLM releases before 0.7 have no such fields). TensorRT-LLM has no
    # equivalent here: refused naming the field, before anything reaches the package.
    from r1.engine.trtllm_engine import TensorRTLLMEngine

    masked = vllm_sampling_kwargs(_request(SamplingConfig(temperature=0, allowed_token_ids=[3, 4], bad_words=["x"],
                                                          thinking_token_budget=0)))
    assert (masked["allowed_token_ids"], masked["bad_words"], masked["thinking_token_budget"]) == ([3, 4], ["x"], 0)
    plain = vllm_sampling_kwargs(_request(SamplingConfig(temperature=0)))
    assert not {"allowed_token_ids", "bad_words", "thinking_token_budget"} & set(plain)
    engine = object.__new__(TensorRTLLMEngine)  # no package needed: the refusal comes first
    for field, value in (("allowed_token_ids", [3]), ("bad_words", ["x"]), ("logit_bias", {3: 1.0}),
                         ("thinking_token_budget", 0)):
        with pytest.raises(ValueError, match=f"^{field} is not supported with engine.name: trtllm") as error:
            engine.make_request("hi", SamplingConfig(**{field: value}))
        assert error.value.field == field


def test_priority_scheduling_goes_to_vllm_and_trtllm_refuses_it():
    # engine.scheduling_policy: priority is vLLM's --scheduling-policy (absent for fcfs, which older
    # releases know as their only policy); TensorRT-LLM has no priority queue here.
    facts, config = SimpleNamespace(source="/models/m", context_tokens=1024), ModelConfig(model="r1-tiny")
    assert vllm_engine_kwargs(facts, config, EngineConfig(engine="vllm", scheduling_policy="priority"),
                              True)["scheduling_policy"] == "priority"
    assert "scheduling_policy" not in vllm_engine_kwargs(facts, config, EngineConfig(engine="vllm"), True)
    with pytest.raises(ValueError, match="scheduling_policy=priority is served by engine=transformers or vllm"):
        EngineConfig(engine="trtllm", scheduling_policy="priority")


def test_max_new_tokens_is_the_resolved_request_limit():
    request = _request(SamplingConfig(temperature=0), max_new_tokens=37)
    assert vllm_sampling_kwargs(request)["max_tokens"] == 37
    assert trtllm_sampling_kwargs(request, 0)["max_tokens"] == 37


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("stop", ("stop", None)),
        ("length", ("length", None)),
        ("abort", ("abort", None)),  # vLLM
        ("cancelled", ("abort", None)),  # TensorRT-LLM
        ("timeout", ("abort", "the engine timed the request out")),  # TensorRT-LLM
        ("error", ("abort", "the engine reported an error for this request")),  # recent vLLM
        ("unknown", ("abort", "the engine ended the request with an unknown finish reason 'unknown'")),
    ],
)
def test_finish_reason_mapping(raw, expected):
    assert map_finish_reason(raw) == expected


@pytest.mark.parametrize(
    "dtype, bf16, expected",
    [("auto", True, "bfloat16"), ("auto", False, "float16"), ("bf16", False, "bfloat16"), ("fp16", True, "float16"),
     ("fp32", True, "float32")],
)
def test_engine_dtype_name(dtype, bf16, expected):
    assert engine_dtype_name(dtype, bf16) == expected


@pytest.mark.parametrize("in_flight, limit, expected", [(0, 4, (0, 0)), (3, 4, (3, 0)), (4, 4, (4, 0)), (9, 4, (4, 5))])
def test_inflight_stats(in_flight, limit, expected):
    assert inflight_stats(in_flight, limit) == {"running": expected[0], "waiting": expected[1], "aborted": 0}
    assert inflight_stats(in_flight, limit, 7)["aborted"] == 7


def test_package_engine_arguments(tmp_path):
    facts = SimpleNamespace(source="/models/m", context_tokens=1024)
    model = ModelConfig(dtype="auto", revision="abc", trust_remote_code=True)
    engine = EngineConfig(engine="vllm", quantization="fp8", gpu_memory_utilization=0.5, tensor_parallel_size=2,
                          max_num_seqs=48)
    vllm = vllm_engine_kwargs(facts, model, engine, bf16_supported=True)
    assert vllm == {
        "model": "/models/m", "tokenizer": "/models/m", "revision": "abc", "trust_remote_code": True,
        "dtype": "bfloat16", "quantization": "fp8", "tensor_parallel_size": 2, "gpu_memory_utilization": 0.5,
        "max_num_seqs": 48, "max_model_len": 1024, "disable_log_stats": True,
    }
    assert vllm_engine_kwargs(facts, model, EngineConfig(engine="vllm"), True)["quantization"] is None
    trtllm = trtllm_llm_kwargs(facts, ModelConfig(dtype="fp16"), EngineConfig(engine="trtllm", max_num_seqs=8), True)
    assert trtllm == {
        "model": "/models/m", "tokenizer": "/models/m", "trust_remote_code": False, "dtype": "float16",
        "tensor_parallel_size": 1, "max_batch_size": 8, "max_seq_len": 1024,
    }


def test_vllm_serves_lora_adapters_with_its_own_multi_lora(tmp_path):
    """engine=vllm with lora_adapters: vLLM's engine arguments enable LoRA for all of them at the
    smallest rank size vLLM has that holds the largest; each request names its adapter."""
    import json

    from safetensors.torch import save_file

    adapters = {}
    for name, rank, pattern in (("small", 4, {}), ("wide", 8, {"q_proj": 24})):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 8,
                                                                    "rank_pattern": pattern}))
        save_file({"base_model.model.x.lora_A.weight": torch.zeros(rank, 4)}, str(directory / "adapter_model.safetensors"))
        adapters[name] = str(directory)
    config = EngineConfig(engine="vllm", lora_adapters=adapters)
    facts = SimpleNamespace(source="/models/m", context_tokens=1024)
    arguments = vllm_engine_kwargs(facts, ModelConfig(), config, bf16_supported=True)
    assert (arguments["enable_lora"], arguments["max_loras"], arguments["max_lora_rank"]) == (True, 2, 32)
    assert "enable_lora" not in vllm_engine_kwargs(facts, ModelConfig(), EngineConfig(engine="vllm"), True)
    request = Request("r", [1], SamplingConfig(), 4)
    assert vllm_lora_request_args(request, config) is None
    request.adapter = 2
    assert vllm_lora_request_args(request, config) == ("wide", 2, adapters["wide"])
    (tmp_path / "wide" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1024}))
    with pytest.raises(ValueError, match="rank 1024 is above vLLM's largest max_lora_rank"):
        vllm_lora_kwargs(config)
    (tmp_path / "wide" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "use_dora": True}))
    with pytest.raises(ValueError, match="uses DoRA"):
        vllm_lora_kwargs(config)


def test_fp8_plan_and_offline_calibration_set(tmp_path):
    assert fp8_plan("none", str(tmp_path)) == "none"
    assert fp8_plan("fp8", str(tmp_path)) == "build"
    (tmp_path / "hf_quant_config.json").write_text("{}")
    assert fp8_plan("fp8", str(tmp_path)) == "checkpoint"
    texts = ["12 + 7 = 19", "忘记密码怎么办？", "line one\nline two"]
    directory = write_calibration_dataset(tmp_path / "calib", texts)
    rows = [json.loads(line) for line in (directory / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows == [{"text": t} for t in texts]


def test_first_output_reads_cumulative_ids_and_the_reason_only_when_finished():
    # Objects shaped like the packages' documented RequestOutput (outputs[0].token_ids,
    # outputs[0].finish_reason, finished); a test double of those fields only.
    running = SimpleNamespace(finished=False, outputs=[SimpleNamespace(token_ids=[3, 4], finish_reason=None)])
    done = SimpleNamespace(finished=True, outputs=[SimpleNamespace(token_ids=[3, 4, 1], finish_reason="stop")])
    silent = SimpleNamespace(finished=True, outputs=[SimpleNamespace(token_ids=[3], finish_reason=None)])
    for first_output in (vllm_first_output, trtllm_first_output):
        assert first_output(running) == ([3, 4], None)
        assert first_output(done) == ([3, 4, 1], "stop")
        assert first_output(silent) == ([3], "unknown")


# -- TokenStream: cumulative engine output -> r1 deltas ---------------------------------------


@pytest.fixture(scope="module")
def reference_engine(tiny):
    model, tokenizer = tiny
    engine = TransformersEngine(model, tokenizer, EngineConfig(max_num_seqs=8))
    yield engine
    engine.shutdown()


REFERENCE_CASES = [
    # (prompt, sampling) — each ends a different way in the transformers engine.
    ("Tom has 5 pens. He buys 17 more.", SamplingConfig(temperature=0, max_new_tokens=20, ignore_eos=True)),  # length
    ([{"role": "user", "content": "What is 12 + 7?"}], SamplingConfig(temperature=0, max_new_tokens=60)),  # eos or length
    ("Mia has 23 apples.", SamplingConfig(temperature=0, max_new_tokens=40, ignore_eos=True, stop=[" "])),  # stop string
    ("忘记密码怎么办？", SamplingConfig(temperature=0, max_new_tokens=24, ignore_eos=True, stop=["。", "\n"])),  # multi-byte
    # A stop string kept at the end (vLLM's include_stop_str_in_output).
    ("Mia has 23 apples.", SamplingConfig(temperature=0, max_new_tokens=40, ignore_eos=True, stop=[" "],
                                          include_stop_str_in_output=True)),
]


def _replay(stream: TokenStream, token_ids: list[int], chunk: int, overrun: list[int]) -> list:
    """Feed an engine's cumulative output `chunk` tokens at a time, then tokens past the end."""
    deltas = []
    produced = token_ids + overrun
    for end in range(chunk, len(produced) + chunk, chunk):
        cumulative = produced[:end]
        finish = "length" if end >= len(produced) else None
        delta = stream.update(cumulative, finish)
        if delta is not None:
            deltas.append(delta)
        if stream.finished:
            break
    return deltas


@pytest.fixture(scope="module")
def reference_completions(reference_engine):
    return reference_engine.generate_batch([p for p, _ in REFERENCE_CASES], [s for _, s in REFERENCE_CASES])


@pytest.mark.parametrize("case", range(len(REFERENCE_CASES)))
@pytest.mark.parametrize("chunk", [1, 3])
def test_token_stream_reproduces_the_transformers_engine(reference_engine, reference_completions, case, chunk):
    prompt, sampling = REFERENCE_CASES[case]
    request = reference_engine.make_request(prompt, sampling)
    expected = reference_completions[case]
    # An engine that keeps producing past r1's end (stop string, EOS) must not leak those tokens.
    overrun = [] if expected.finish_reason == "length" else [9, 10, 11]
    deltas = _replay(TokenStream(request, reference_engine.tokenizer), expected.token_ids, chunk, overrun)
    assert "".join(d.text for d in deltas) == expected.text
    assert [t for d in deltas for t in d.token_ids] == expected.token_ids
    assert deltas[-1].finish_reason == expected.finish_reason
    assert deltas[-1].stop_reason == expected.stop_reason  # the stop string that matched, or None
    assert deltas[-1].usage.completion_tokens == len(expected.token_ids)
    assert deltas[-1].usage.prompt_tokens == len(request.prompt_token_ids)
    assert all(d.finish_reason is None for d in deltas[:-1])


def test_token_stream_rules(tiny):
    _, tokenizer = tiny
    eos = tokenizer.eos_token_id
    hello = tokenizer.encode("12 + 7 = 19", add_special_tokens=False)
    request = Request("r", [5], SamplingConfig(temperature=0), max_new_tokens=50, stop_token_ids=frozenset({eos}))

    stream = TokenStream(request, tokenizer)
    assert stream.update([], None) is None  # nothing new yet
    first = stream.update(hello, None)
    assert first.token_ids == hello and first.finish_reason is None
    last = stream.update(hello + [eos], "stop")
    # The stop token is counted but shows no text.
    assert (last.token_ids, last.finish_reason, last.usage.completion_tokens) == ([eos], "stop", len(hello) + 1)
    assert first.text + last.text == "12 + 7 = 19"
    assert stream.update(hello + [eos, 9], "stop") is None  # finished streams stay finished

    # The engine ends a request early (its own context limit): its reason is ours.
    stream = TokenStream(request, tokenizer)
    delta = stream.update(hello[:2], "length")
    assert delta.finish_reason == "length" and delta.token_ids == hello[:2]

    # The engine aborts (TensorRT-LLM says "cancelled"); held-back text is still flushed.
    stream = TokenStream(request, tokenizer)
    delta = stream.update(hello, "cancelled")
    assert (delta.finish_reason, delta.error, delta.text) == ("abort", None, "12 + 7 = 19")

    # A timeout is an abort that carries an error.
    stream = TokenStream(request, tokenizer)
    delta = stream.update([], "timeout")
    assert delta.finish_reason == "abort" and "timed" in delta.error and delta.usage.completion_tokens == 0

    # max_new_tokens is enforced even if the engine sends more.
    short = Request("r", [5], SamplingConfig(temperature=0), max_new_tokens=2, stop_token_ids=frozenset({eos}))
    stream = TokenStream(short, tokenizer)
    delta = stream.update(hello, None)
    assert delta.token_ids == hello[:2] and delta.finish_reason == "length"


# -- AsyncPackageEngine: the adapters' shared machinery -------------------------------------


class ReplayEngine(AsyncPackageEngine):
    """A test subclass of r1's adapter base (not a stand-in for vLLM or TensorRT-LLM).

    Its `_generate` plays back scripted cumulative token ids, `chunk` at a time, the way the
    packages report output, and records which requests were closed before they finished (what the
    real adapters turn into an abort inside the package).
    """

    name = "replay"

    def __init__(self, facts, config, script, chunk=2, step_s=0.0):
        super().__init__(facts, config)
        self.script = script  # request -> list of token ids, or an Exception to raise
        self.chunk = chunk
        self.step_s = step_s
        self.closed_early: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.shut_down = False

    async def _generate(self, request):
        produced = self.script(request)
        sent = 0
        try:
            while sent < len(produced):
                while not self.gate.is_set():
                    await asyncio.sleep(0.005)
                if self.step_s:
                    await asyncio.sleep(self.step_s)
                sent = min(sent + self.chunk, len(produced))
                if isinstance(produced[sent - 1], Exception):
                    raise produced[sent - 1]
                yield produced[:sent], ("length" if sent == len(produced) else None)
        finally:
            if sent < len(produced):
                self.closed_early.append(request.request_id)

    def _shutdown_backend(self):
        self.shut_down = True


@pytest.fixture(scope="module")
def facts(tiny):
    return read_checkpoint(ModelConfig())


def test_read_checkpoint_agrees_with_the_transformers_engine(facts, reference_engine):
    assert facts.context_tokens == reference_engine.context_tokens
    assert facts.stop_ids == reference_engine.stop_token_ids
    assert facts.vocab_size == reference_engine.runner.vocab_size
    assert Path(facts.source, "config.json").exists()


def _script(outputs: dict[tuple[int, ...], list[int]]):
    """Replays, per prompt token ids, the given output; the "package" then runs on past the end,
    and r1 must stop at its own limits (max_new_tokens, stop strings)."""
    return lambda request: outputs[tuple(request.prompt_token_ids)] + [9, 9, 9]


PROMPTS = ["Tom has 5 pens.", "Mia has 23 apples.", "1", "Reason step by step: 12 + 7 - 3", "忘记密码怎么办？"]


def test_generate_batch_equals_the_transformers_engine(facts, reference_engine):
    samplings = [SamplingConfig(temperature=0, max_new_tokens=12 + i, ignore_eos=True, stop=["\n\n"])
                 for i in range(len(PROMPTS))]
    raw = SamplingConfig(temperature=0, max_new_tokens=16, ignore_eos=True)  # what the "package" generates
    reference = reference_engine.generate_batch(PROMPTS * 2, samplings + [raw] * len(PROMPTS))
    expected, generated = reference[: len(PROMPTS)], reference[len(PROMPTS) :]
    script = _script({tuple(c.prompt_token_ids): c.token_ids for c in generated})
    engine = ReplayEngine(facts, EngineConfig(max_num_seqs=2, max_queued_requests=1), script)
    try:
        # 5 requests through a limit of 3 in flight: generate_batch waits for room instead of failing.
        got = engine.generate_batch(PROMPTS, samplings)
        assert [(c.text, c.token_ids, c.finish_reason) for c in got] == [
            (c.text, c.token_ids, c.finish_reason) for c in expected
        ]
        assert engine.stats() == {"running": 0, "waiting": 0, "aborted": 0}
    finally:
        engine.shutdown()


def test_stream_stop_string_ends_the_request_and_closes_the_package_stream(facts, reference_completions):
    prompt, sampling = REFERENCE_CASES[2]
    expected = reference_completions[2]
    assert expected.finish_reason == "stop" and sampling.stop == [" "]
    engine = ReplayEngine(facts, EngineConfig(), _script({tuple(expected.prompt_token_ids): expected.token_ids}), chunk=1)

    async def collect():
        return [d async for d in engine.stream(prompt, sampling, request_id="s1")]

    try:
        # Two separate event loops: the engine serves callers from any loop.
        for _ in range(2):
            deltas = asyncio.run(asyncio.wait_for(collect(), DEADLINE_S))
            assert "".join(d.text for d in deltas) == expected.text
            assert deltas[-1].finish_reason == "stop"
            assert deltas[-1].usage.completion_tokens == len(expected.token_ids)
        # The engine closes the package's stream on its own loop, possibly just after the last delta.
        _wait_until(lambda: engine.closed_early == ["s1", "s1"])
    finally:
        engine.shutdown()


def _wait_until(predicate) -> None:
    done = threading.Event()
    for _ in range(int(DEADLINE_S / 0.01)):
        if predicate():
            return
        done.wait(0.01)
    raise AssertionError("condition not reached within the deadline")


def test_leaving_a_stream_early_aborts_the_request(facts):
    engine = ReplayEngine(facts, EngineConfig(), lambda request: list(range(10, 400)), chunk=1, step_s=0.002)

    async def read_two():
        seen = []
        async for delta in engine.stream("hello", SamplingConfig(temperature=0, max_new_tokens=300), request_id="a1"):
            seen.append(delta)
            if len(seen) == 2:
                break
        return seen

    try:
        seen = asyncio.run(asyncio.wait_for(read_two(), DEADLINE_S))
        assert len(seen) == 2 and all(d.finish_reason is None for d in seen)
        _wait_until(lambda: engine.stats()["running"] == 0)
        assert engine.closed_early == ["a1"]
    finally:
        engine.shutdown()


def test_abort_from_another_thread_ends_the_stream_with_abort(facts):
    engine = ReplayEngine(facts, EngineConfig(), lambda request: list(range(10, 400)), chunk=1, step_s=0.002)

    async def read_all():
        deltas = []
        async for delta in engine.stream("hello", SamplingConfig(temperature=0, max_new_tokens=300), request_id="b1"):
            deltas.append(delta)
            if len(deltas) == 3:
                threading.Thread(target=engine.abort, args=("b1",)).start()
        return deltas

    try:
        deltas = asyncio.run(asyncio.wait_for(read_all(), DEADLINE_S))
        assert deltas[-1].finish_reason == "abort" and deltas[-1].error is None
        assert len(deltas) < 300
        assert engine.closed_early == ["b1"]
        assert engine.stats() == {"running": 0, "waiting": 0, "aborted": 1}
    finally:
        engine.shutdown()


def test_a_package_failure_ends_the_request_with_an_error(facts):
    engine = ReplayEngine(facts, EngineConfig(), lambda request: [10, 11, RuntimeError("CUDA error: device lost")], chunk=1)
    try:
        with pytest.raises(RuntimeError, match="1 of 1 generations failed: RuntimeError: CUDA error: device lost"):
            engine.generate_batch(["hello"], SamplingConfig(temperature=0, max_new_tokens=8))
        assert engine.stats() == {"running": 0, "waiting": 0, "aborted": 1}
        assert engine.alive
        engine.check_health()  # one failed generation does not make the engine unhealthy ...
        engine._backend_healthy = lambda: False  # ... the package reporting its engine dead does
        with pytest.raises(RuntimeError, match="package's engine is not running"):
            engine.check_health()
    finally:
        engine.shutdown()


def test_full_engine_refuses_fast_and_shutdown_aborts_what_is_in_flight(facts):
    engine = ReplayEngine(facts, EngineConfig(max_num_seqs=1, max_queued_requests=1), lambda request: list(range(10, 40)))
    engine.gate.clear()  # hold every request inside the "package"
    received: list = []
    sampling = SamplingConfig(temperature=0, max_new_tokens=30)
    for i in range(2):
        engine.submit(engine.make_request("hello", sampling, f"q{i}"), received.append)
    assert engine.stats() == {"running": 1, "waiting": 1, "aborted": 0}
    with pytest.raises(EngineOverloaded):
        engine.submit(engine.make_request("hello", sampling, "q2"), received.append)
    engine.shutdown()
    engine.shutdown()  # idempotent
    assert engine.shut_down
    finals = sorted((d.request_id, d.finish_reason) for d in received if d.finish_reason is not None)
    assert finals == [("q0", "abort"), ("q1", "abort")]
    assert engine.stats() == {"running": 0, "waiting": 0, "aborted": 2}
    with pytest.raises(RuntimeError, match="shut down"):
        engine.submit(engine.make_request("hello", sampling, "q3"), received.append)


def test_adapter_inputs_follow_the_transformers_engine(facts, reference_engine):
    engine = ReplayEngine(facts, EngineConfig(), lambda request: [])
    try:
        messages = [{"role": "user", "content": "What is 12 + 7?"}]
        sampling = SamplingConfig(temperature=0)
        for prompt in ("Tom has 5 pens.", messages, [3, 4, 5]):
            ours, theirs = engine.make_request(prompt, sampling), reference_engine.make_request(prompt, sampling)
            assert (ours.prompt_token_ids, ours.max_new_tokens, ours.stop_token_ids) == (
                theirs.prompt_token_ids, theirs.max_new_tokens, theirs.stop_token_ids)
        assert engine.think_prefilled == reference_engine.think_prefilled
        with pytest.raises(ValueError, match="prompt token ids must be in"):
            engine.make_request([facts.vocab_size], sampling)
        with pytest.raises(ValueError, match="exceeds the model's context"):
            engine.make_request("hello", SamplingConfig(max_new_tokens=facts.context_tokens))
        # The package adapters return no log-probabilities: a request for them is refused, not
        # answered without (the LLM server makes this a 400 naming logprobs).
        with pytest.raises(ValueError, match="^logprobs is not supported with engine.name: replay"):
            engine.make_request("hello", SamplingConfig(logprobs=0))
        with pytest.raises(ValueError, match=r"^structured output \(response_format\) is not supported") as refused:
            engine.make_request("hello", SamplingConfig(json_schema={"type": "object"}))
        assert refused.value.field == "response_format"
        # So is guided decoding, naming its field.
        with pytest.raises(ValueError, match=r"^structured output \(choice\) is not supported") as refused:
            engine.make_request("hello", SamplingConfig(choice=["yes", "no"]))
        assert refused.value.field == "choice"
        # A request names a LoRA adapter of engine.lora_adapters by name; the adapter gets its index.
        with pytest.raises(ValueError, match="no LoRA adapter 'math' is loaded") as unknown:
            engine.make_request("hello", sampling, adapter="math")
        assert unknown.value.field == "adapter"
    finally:
        engine.shutdown()
    engine = ReplayEngine(facts, EngineConfig(lora_adapters={"math": "/a", "code": "/b"}), lambda request: [])
    try:
        assert [engine.make_request("hello", sampling, adapter=name).adapter for name in (None, "math", "code")] == [0, 1, 2]
    finally:
        engine.shutdown()
