"""How the command line turns files, --set overrides and flags into configs (in-process, no model, no Ray)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cluster.cli import build_parser
from cluster.local import _window, check_text, config_from_args
from cluster.serve.cli import read_serve_file, serve_config
from r1.config import (
    GRPOTrainConfig,
    GenerateConfig,
    ServeConfig,
    SFTTrainConfig,
    TelemetryConfig,
    TaskLevel,
    apply_overrides,
    load_yaml,
    read_yaml_file,
)


@pytest.mark.parametrize("override, message", [
    ("sampling.stop=[a", "the value is not valid YAML"),  # an unclosed list
    ("model.model=@foo", "the value is not valid YAML"),  # '@' cannot start a YAML value
    ("sampling.temperature=*a", "the value is not valid YAML"),  # an alias to nothing
    ("samplng.temperature=1", "allowed keys: engine, model, sampling"),  # a misspelt section: the allowed ones
    ("sampling.temperature.x=1", "sampling.temperature is a value, not a section"),
    ("sampling..x=1", "is not a key"),
])
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        apply_overrides(GenerateConfig(), [override])


def test_overrides_reach_keys_inside_mapping_fields():
    config = apply_overrides(ServeConfig(), ["safety.rule_actions.card_number.input=flag"])
    assert config.safety.rule_actions["card_number"].input == "flag"
    train = apply_overrides(SFTTrainConfig(), ["scaling.resources_per_worker.CPU=0.5"])
    assert train.scaling.resources_per_worker == {"CPU": 0.5}


def test_a_bare_off_in_yaml_means_off(tmp_path):
    # YAML 1.1 reads `off` as false; the options that offer "off" take it back.
    path = tmp_path / "serve.yaml"
    path.write_text("safety:\n  rule_actions:\n    card_number:\n      input: off\n  rules:\n"
                    "    - {id: x, kind: keyword, keywords: [foo], output: off}\n")
    config = load_yaml(path, ServeConfig)
    assert config.safety.rule_actions["card_number"].input == "off" and config.safety.rules[0].output == "off"
    assert apply_overrides(TelemetryConfig(), ["exporter=off"]).exporter == "off"
    with pytest.raises(ValueError, match="safety.rule_actions.card_number.input"):
        apply_overrides(ServeConfig(), ["safety.rule_actions.card_number.input=on"])  # true is not an action


@pytest.mark.parametrize("model, override, message", [
    (SFTTrainConfig, "data.levels=[7]", "data.levels.0: Input should be 1, 2 or 3"),
    (SFTTrainConfig, "data.levels=[]", "data.levels: List should have at least 1 item"),
    (GRPOTrainConfig, "prompts.levels=[9]", "prompts.levels.0"),
    (SFTTrainConfig, "scaling.resources_per_worker={CPU: -1}", "scaling.resources_per_worker.CPU"),
    (SFTTrainConfig, "lora.target_modules=[]", "lora.target_modules"),
    # the default config trains on the arithmetic task: a file alone says what else to set
    (SFTTrainConfig, "data.path=/data/corpus.txt", "also set data.task=null"),
    # coding prompts answer with unit tests: the default accuracy reward cannot score them
    (GRPOTrainConfig, "prompts.task=coding", "the accuracy reward checks integer answers"),
    (GRPOTrainConfig, "grpo.rewards=[{name: code_tests}]", "code_tests runs unit tests"),
])
def test_train_configs_refuse_what_would_fail_in_the_workers(model, override, message):
    with pytest.raises(ValueError) as error:
        apply_overrides(model(), [override])
    assert message in str(error.value)
    assert "{'path'" not in str(error.value)  # a section's own check does not print the whole section


def test_task_levels_are_the_tasks_levels():
    from typing import get_args

    from r1.tasks.arithmetic import LEVELS

    assert get_args(TaskLevel) == LEVELS


def test_config_files_that_cannot_be_read_name_the_file(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "latin1.yaml").write_bytes(b"model:\n  model: caf\xe9\n")
    for name, message in (("dir.yaml", "cannot read config file"), ("latin1.yaml", "is not UTF-8 text"),
                          ("missing.yaml", "does not exist")):
        with pytest.raises(ValueError, match=message) as error:
            read_yaml_file(tmp_path / name)
        assert name in str(error.value)


@pytest.mark.parametrize("text, message", [
    ("applications: x\n", "applications must be a non-empty list"),
    ("applications: [x]\n", "applications[0] must be a mapping"),
    ("applications:\n  - args: [1]\n", "applications[0].args must be a mapping"),
    ("applications:\n  - args: {}\nhttp_options: x\n", "http_options must be a mapping"),
    ("model: [\n", "is not valid YAML"),
    # a typo in http_options used to be dropped without a word
    ("applications:\n  - args: {}\nhttp_options: {prot: 9000}\n", "http_options has unknown key(s) ['prot']"),
    # a second section of the same name used to replace the first
    ("model: {dtype: fp32}\nmodel: {device: cpu}\n", "duplicate key 'model'"),
])
def test_malformed_serve_files_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        read_serve_file(str(path))


def test_serve_flags_are_taken_as_written(tmp_path):
    parser = build_parser()
    config, _ = serve_config(parser.parse_args(["serve", "--model", "/models/ckpt #3", "--api-keys-file", "/etc/keys #prod"]))
    assert config.model.model == "/models/ckpt #3" and config.api_keys_file == "/etc/keys #prod"  # not YAML comments
    config, _ = serve_config(parser.parse_args(["serve", "--model", "2024"]))
    assert config.model.model == "2024"  # a directory named 2024, not a number
    with pytest.raises(ValueError, match="pipeline_stages"):
        serve_config(parser.parse_args(["serve", "--pipeline-stages", "0"]))  # 0 was taken as "not given"


def test_api_keys_file_that_cannot_be_read(tmp_path):
    from r1.serving.auth import load_api_keys

    with pytest.raises(ValueError, match="cannot read api_keys_file"):
        load_api_keys("R1_TEST_NO_SUCH_VAR", str(tmp_path))


def test_generate_flags_are_taken_as_written():
    parser = build_parser()
    args = parser.parse_args(["generate", "x", "--stop", "a\x85b", "--stop", "#end", "--model", "/m/ckpt #3"])
    config = config_from_args(args)
    assert config.sampling.stop == ["a\x85b", "#end"] and config.model.model == "/m/ckpt #3"
    with pytest.raises(ValueError, match="--stop is not valid UTF-8"):
        config_from_args(parser.parse_args(["generate", "x", "--stop", "\udcff"]))  # argv byte 0xff
    with pytest.raises(ValueError, match="the prompt is not valid UTF-8"):
        check_text("caf\udce9", "the prompt")
    with pytest.raises(ValueError, match="sampling.temperature"):
        config_from_args(parser.parse_args(["generate", "x", "--temperature", "nan"]))
    penalised = config_from_args(parser.parse_args(["generate", "x", "--frequency-penalty", "0.5", "--presence-penalty", "-1"]))
    assert (penalised.sampling.frequency_penalty, penalised.sampling.presence_penalty) == (0.5, -1.0)
    with pytest.raises(ValueError, match="sampling.presence_penalty"):
        config_from_args(parser.parse_args(["generate", "x", "--presence-penalty", "3"]))
    bounded = config_from_args(parser.parse_args(["generate", "x", "--min-p", "0.1", "--min-tokens", "5"]))
    assert (bounded.sampling.min_p, bounded.sampling.min_tokens) == (0.1, 5)
    with pytest.raises(ValueError, match="sampling.min_p"):
        config_from_args(parser.parse_args(["generate", "x", "--min-p", "2"]))


def test_chat_window():
    history = [{"role": "user", "content": str(i)} for i in range(5)]
    assert _window(history, 2) == history[-2:]
    assert _window(history, 0) == []  # no context (history[-0:] would be all of it)
    assert _window(history, 10) == history


def test_api_keys_reach_the_replicas_only_as_digests(tmp_path, monkeypatch):
    from cluster.serve.cli import replica_env_vars
    from r1.serving.auth import KEY_DIGESTS_ENV, APIKeyChecker, key_id, load_key_digests

    keys_file = tmp_path / "keys"
    keys_file.write_text("# ops\nfile-key-123\n")
    monkeypatch.setenv("R1_API_KEYS", "env-key-456")
    monkeypatch.delenv(KEY_DIGESTS_ENV, raising=False)
    digests = load_key_digests("R1_API_KEYS", str(keys_file))
    env_vars = replica_env_vars(digests, {"HF_HUB_OFFLINE": "1", "R1_API_KEYS": "env-key-456"})
    assert "env-key-456" not in str(env_vars) and "file-key-123" not in str(env_vars)  # Ray logs runtime envs
    assert env_vars["HF_HUB_OFFLINE"] == "1"
    # A replica that only has the digests accepts the keys, and names callers as before.
    monkeypatch.delenv("R1_API_KEYS")
    monkeypatch.setenv(KEY_DIGESTS_ENV, env_vars[KEY_DIGESTS_ENV])
    checker = APIKeyChecker(load_key_digests("R1_API_KEYS", None))
    assert checker.check("Bearer file-key-123") == key_id("file-key-123")
    assert checker.check("Bearer env-key-456") == key_id("env-key-456")
    from r1.serving.protocol import APIError

    with pytest.raises(APIError, match="invalid API key"):
        checker.check("Bearer other")
    monkeypatch.setenv(KEY_DIGESTS_ENV, "not-a-digest")
    with pytest.raises(ValueError, match="not a SHA-256 hex digest"):
        load_key_digests("R1_API_KEYS", None)


@pytest.mark.parametrize("argv, message", [
    # a model directory that does not exist
    (["--model", "/nonexistent/model"], "model.model: model path /nonexistent/model does not exist"),
    # a misspelt rule id in the safety overrides, which only the SafetyFilter knows
    (["--set", "safety.rule_actions.card_numbr.input=block"], "safety: rule_actions names unknown rule(s) ['card_numbr']"),
    # keys required (as on Kubernetes) and none configured: not an open API
    (["--set", "require_api_keys=true"], "require_api_keys is set and no API keys are configured"),
    # a LoRA adapter directory that is not there, and an adapter named as the model itself
    (["--lora", "math=/nonexistent/adapter"],
     "engine.lora_adapters: LoRA adapter 'math' (/nonexistent/adapter): /nonexistent/adapter is not a LoRA adapter"),
    (["--lora", "r1-tiny=/x"], "names an adapter 'r1-tiny', the served model's own name"),
])
def test_serve_refuses_what_would_fail_in_a_replica_before_ray_starts(monkeypatch, capsys, argv, message):
    import ray

    monkeypatch.delenv("R1_API_KEYS", raising=False)

    from cluster.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("ray.init was reached")

    monkeypatch.setattr(ray, "init", no_ray)
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_serve_lora_flags_add_adapters_with_absolute_paths(tmp_path, monkeypatch):
    from cluster.serve.cli import preflight, serve_config
    from tests.lora_helpers import write_adapter

    write_adapter(tmp_path / "adapter", seed=1, targets=["q_proj"])
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["serve", "--lora", "math=adapter", "--set", "engine.lora_adapters={a: /x}"])
    config, _ = serve_config(args)
    assert config.engine.lora_adapters == {"a": "/x", "math": "adapter"}
    args = build_parser().parse_args(["serve", "--lora", "math=adapter"])
    checked = preflight(serve_config(args)[0], "local")
    assert checked.engine.lora_adapters == {"math": str(tmp_path / "adapter")}  # the replicas' cwd may differ


@pytest.mark.parametrize("value", ["math", "=x", "math="])
def test_serve_lora_flag_needs_name_and_path(capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--lora", value])
    assert exit_info.value.code == 2 and "use NAME=PATH" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_serve_ready_timeout_must_be_positive_and_finite(capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--ready-timeout-s", value])
    assert exit_info.value.code == 2 and "--ready-timeout-s" in capsys.readouterr().err


def test_a_misspelt_key_inside_a_mapping_section_names_the_allowed_keys():
    # safety.rule_actions maps rule ids to {input, output}: the key under a rule id is checked too.
    with pytest.raises(ValueError, match="safety.rule_actions.card_number.inptu: unknown key; allowed keys: input, output"):
        apply_overrides(ServeConfig(), ["safety.rule_actions.card_number.inptu=block"])


def test_tensor_parallel_needs_a_gpu_engine():
    # The transformers engine used to ignore it without a word.
    with pytest.raises(ValueError, match="tensor_parallel_size=4 needs engine=vllm or trtllm"):
        apply_overrides(ServeConfig(), ["engine.tensor_parallel_size=4"])
    assert apply_overrides(ServeConfig(), ["engine={engine: vllm, tensor_parallel_size: 4}"]).engine.tensor_parallel_size == 4


@pytest.mark.parametrize("override", ["sampling.max_new_tokens=true", "sampling.temperature=false", "engine.cpu_threads=true"])
def test_booleans_are_not_numbers(override):
    # Pydantic alone reads true as 1 (max_new_tokens: true generated one token).
    with pytest.raises(ValueError, match=r"expected a number, not true/false \(got (True|False)\)"):
        apply_overrides(GenerateConfig(), [override])
    assert apply_overrides(GenerateConfig(), ["engine.compile=true"]).engine.compile is True  # a real boolean field


def test_the_bearer_scheme_is_case_insensitive(monkeypatch):
    from r1.serving.auth import APIKeyChecker, key_id, load_key_digests
    from r1.serving.protocol import APIError

    monkeypatch.setenv("R1_API_KEYS", "secret-key")
    checker = APIKeyChecker(load_key_digests("R1_API_KEYS", None))
    for header in ("Bearer secret-key", "bearer secret-key", "BEARER  secret-key "):
        assert checker.check(header) == key_id("secret-key")
    for header in ("Basic secret-key", "Bearer", "bearer ", "secret-key", None, "Bearer wrong"):
        with pytest.raises(APIError) as error:
            checker.check(header)
        assert error.value.status == 401


def test_ray_is_started_once_more_only_after_its_start_up_race(monkeypatch, caplog):
    # Ray's raylet exits when its agent writes its port files late (a busy machine), and ray.init
    # raises "The current node timed out during startup" (ray-project/ray#65983). That one error gets
    # a second start; any other is raised at once. Reproducing the race itself needs a machine
    # loaded at the right moment, so ray.init is replaced here by one that fails as Ray does.
    import ray

    from cluster.ray_start import init_ray

    calls, shutdowns = [], []
    race = Exception("The current node timed out during startup. This could happen because some of the raylet "
                     "failed to startup or the GCS has become overloaded.")

    def fake_init(failures):
        def init(**kwargs):
            calls.append(kwargs)
            if failures:
                raise failures.pop(0)
            return "context"
        return init

    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(1))
    monkeypatch.setattr(ray, "init", fake_init([race]))
    assert init_ray(address="local", num_cpus=2) == "context"
    assert calls == [{"address": "local", "num_cpus": 2}] * 2 and shutdowns == [1]
    assert "starting it once more" in caplog.text

    calls.clear()
    monkeypatch.setattr(ray, "init", fake_init([race, race]))
    with pytest.raises(Exception, match="timed out during startup"):
        init_ray(address="local")
    assert len(calls) == 2  # one more start, not a loop

    calls.clear()
    monkeypatch.setattr(ray, "init", fake_init([ConnectionError("could not reach the cluster at ray://x:10001")]))
    with pytest.raises(ConnectionError, match="could not reach"):
        init_ray(address="ray://x:10001")
    assert len(calls) == 1


def test_haproxy_mode_environment_and_its_errors(tmp_path):
    from cluster.serve.cli import HAPROXY_ENV, haproxy_env

    # A cluster r1 serve starts: Serve's two switches, and HAProxy's files in a folder of its own
    # (Ray's defaults are fixed paths under /tmp, shared by every cluster on the machine).
    import shutil

    env, other = haproxy_env("local", {}), haproxy_env("local", {})
    try:
        assert {k: env[k] for k in HAPROXY_ENV} == HAPROXY_ENV
        folder = Path(env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"])
        assert folder.is_dir() and folder.name.startswith("r1-haproxy-")
        assert Path(env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent == folder
        assert Path(env["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent == folder
        assert other["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] != str(folder)  # one per server
        # A short drain for the local HAProxy, unless the environment says otherwise.
        assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "5"
        kept = haproxy_env("local", {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "30"})
        shutil.rmtree(kept["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"], ignore_errors=True)
        assert "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S" not in kept
    finally:
        for made in (env, other):
            shutil.rmtree(made["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"], ignore_errors=True)
    # Joining a cluster: its processes must have been started with the switches; nothing to set here.
    with pytest.raises(ValueError, match="RAY_SERVE_ENABLE_DIRECT_INGRESS=1 RAY_SERVE_ENABLE_HA_PROXY=1"):
        haproxy_env("127.0.0.1:6379", {})
    assert haproxy_env("127.0.0.1:6379", dict(HAPROXY_ENV)) == {}
    # A binary that is not one.
    not_executable = tmp_path / "haproxy"
    not_executable.write_text("")
    with pytest.raises(ValueError, match="is not an executable haproxy binary"):
        haproxy_env("local", {"RAY_SERVE_HAPROXY_BINARY_PATH": str(not_executable)})


def test_serve_proxy_flag():
    args = build_parser().parse_args(["serve"])
    assert args.proxy == "serve"
    assert build_parser().parse_args(["serve", "--proxy", "haproxy"]).proxy == "haproxy"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--proxy", "nginx"])
