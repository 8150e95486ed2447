"""Config errors name the bad key and what is allowed."""

from __future__ import annotations

import pytest

from r1.config import GenerateConfig, ModelConfig, SamplingConfig, apply_overrides, load_config, load_yaml, parse_config


@pytest.mark.parametrize(
    "yaml_text, fragments",
    [
        # a typo in a key: name it and list the allowed keys of that section
        ("model:\n  modle: r1-tiny\n", ["model.modle: unknown key", "allowed keys:", "attn_implementation", "dtype"]),
        # a value outside a Literal: name the key and the allowed values
        ("model:\n  dtype: float64\n", ["model.dtype", "'auto', 'bf16', 'fp16' or 'fp32'", "float64"]),
        # a number out of range
        ("sampling:\n  top_p: 1.5\n", ["sampling.top_p", "less than or equal to 1"]),
        # a wrong type
        ("sampling:\n  max_new_tokens: lots\n", ["sampling.max_new_tokens", "valid integer"]),
        # an unknown top-level section
        ("sampler:\n  temperature: 0.1\n", ["sampler: unknown key", "engine, model, sampling"]),
        # empty stop strings would stop at once
        ("sampling:\n  stop: ['']\n", ["sampling.stop", "non-empty"]),
        # YAML's .inf is a number to pydantic, but no size, time or limit here is infinite
        ("sampling:\n  temperature: .inf\n", ["sampling.temperature", "finite number"]),
    ],
)
def test_yaml_errors_name_key_and_allowed_values(tmp_path, yaml_text, fragments):
    path = tmp_path / "generate.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError) as info:
        load_yaml(path, GenerateConfig)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_yaml_loads_valid_config(tmp_path):
    path = tmp_path / "generate.yaml"
    path.write_text("model:\n  dtype: bf16\nsampling:\n  temperature: 0.3\n  stop: ['</answer>']\n")
    config = load_yaml(path, GenerateConfig)
    assert config.model.dtype == "bf16"
    assert config.sampling.temperature == 0.3
    assert config.sampling.stop == ["</answer>"]
    assert config.model.attn_implementation == "sdpa"  # default kept


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml", GenerateConfig)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_yaml(bad, GenerateConfig)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_yaml(listy, GenerateConfig)


@pytest.mark.parametrize("text", ["[]\n", "0\n", '""\n', "- 1\n"])
@pytest.mark.parametrize("overrides", [[], ["sampling.temperature=0.2"]])
def test_a_config_file_that_is_no_mapping_is_refused_with_or_without_overrides(tmp_path, text, overrides):
    # Empty-looking values ([], 0, "") are no mapping either: not the defaults.
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="expected a mapping"):
        load_config(GenerateConfig, path, overrides)


def test_an_empty_config_file_is_the_defaults(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("# nothing set\n")
    assert load_config(GenerateConfig, path, ["sampling.temperature=0.2"]).sampling.temperature == 0.2


def test_overrides_apply_and_validate():
    config = apply_overrides(GenerateConfig(), ["sampling.temperature=0.2", "model.dtype=fp32"])
    assert config.sampling.temperature == 0.2 and config.model.dtype == "fp32"
    with pytest.raises(ValueError, match="unknown key"):
        apply_overrides(GenerateConfig(), ["sampling.temprature=0.2"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(GenerateConfig(), ["sampling.temperature"])


def test_defaults_work_and_greedy_flag():
    assert ModelConfig().model == "r1-tiny"
    assert SamplingConfig(temperature=0).greedy
    assert parse_config(SamplingConfig, None) == SamplingConfig()


def test_gpu_engine_on_cpu_is_an_error_naming_the_option():
    with pytest.raises(ValueError, match="engine=vllm needs a GPU"):
        GenerateConfig.model_validate({"model": {"device": "cpu"}, "engine": {"engine": "vllm"}})


def test_a_partial_deployment_section_keeps_that_deployments_own_defaults():
    # `safety.deployment: {min_replicas: 3}` used to rebuild the section from the class defaults,
    # turning the SafetyFilter's per-call access log back on and halving its concurrency.
    from r1.config import SafetyConfig, ServeConfig

    serve = parse_config(ServeConfig, {"llm": {"min_replicas": 3}, "ingress": {"max_replicas": 4},
                                       "safety": {"deployment": {"min_replicas": 3}}})
    defaults = ServeConfig()
    assert serve.llm == defaults.llm.model_copy(update={"min_replicas": 3})
    assert serve.ingress == defaults.ingress.model_copy(update={"max_replicas": 4})
    assert serve.safety.deployment == SafetyConfig().deployment.model_copy(update={"min_replicas": 3})
    assert serve.safety.deployment.access_log is False and serve.safety.deployment.max_ongoing_requests == 64
    # A value given still wins over the default it replaces.
    assert parse_config(ServeConfig, {"llm": {"num_cpus": 0.5}}).llm.num_cpus == 0.5


def test_autoscaling_settings_reach_serves_options():
    from r1.config import ServeConfig

    llm = parse_config(ServeConfig, {"llm": {"upscale_delay_s": 1, "downscale_delay_s": 4, "look_back_period_s": 6}}).llm
    autoscaling = llm.serve_options()["autoscaling_config"]
    assert (autoscaling["upscale_delay_s"], autoscaling["downscale_delay_s"], autoscaling["look_back_period_s"]) == (1, 4, 6)
    assert ServeConfig().llm.serve_options()["autoscaling_config"]["look_back_period_s"] == 15
    with pytest.raises(ValueError, match="look_back_period_s"):
        parse_config(ServeConfig, {"llm": {"look_back_period_s": 0}})
