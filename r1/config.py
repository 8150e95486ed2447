"""Configuration models for every r1-cluster component.

One config system: these pydantic models back the YAML files in `ray_configs/`, the CLI flags and
the Serve application arguments. Every model forbids unknown keys, so a typo in a YAML file is an
error that names the key and lists the allowed ones instead of a silently ignored setting.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

# Hard cap on new tokens per request (the guide's fix for truncated answers is a 4096 window).
# MiB of prefix cache for `engine.prefix_cache_mb: auto` where it applies (EngineConfig).
DEFAULT_PREFIX_CACHE_MB = 256
DEFAULT_MAX_NEW_TOKENS_CAP = 4096


def _yaml_off(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads a bare `off` as False; options whose values include "off" take it back."""
    return "off" if value is False else value


class StrictModel(BaseModel):
    """Base for all config models: unknown keys are errors."""

    # allow_inf_nan=False: every number is a size, a rate, a time or a limit; "inf" in YAML is a mistake
    # that would surface far away (a Redis TTL that overflows, a timeout that never fires).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: Any) -> Any:
        # Pydantic reads true as 1 for an int or float field: `max_new_tokens: true` is a mistake.
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            annotation = cls.model_fields[info.field_name].annotation
            if bool not in _scalar_types(annotation) and _scalar_types(annotation) & {int, float}:
                raise ValueError("expected a number, not true/false")
        return value


def _scalar_types(annotation: Any) -> set[Any]:
    """The plain types a field accepts: {int} for `int`, {int, NoneType} for `int | None`."""
    args = get_args(annotation)
    if args and get_origin(annotation) not in (dict, list, Literal):
        return {a for arg in args for a in _scalar_types(arg)}
    return {annotation}


class ModelConfig(StrictModel):
    """Which checkpoint to load and how."""

    # "r1-tiny" is the embedded default model; anything else is a local directory or a hub id.
    model: str = "r1-tiny"
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    revision: str | None = None
    trust_remote_code: bool = False


SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
MAX_STOP_CHARS = 256
# Tokens one request may bias (OpenAI takes up to 300; each costs a little per decode step).
MAX_LOGIT_BIAS_TOKENS = 1024
# Most stop_token_ids a request may name.
MAX_STOP_TOKEN_IDS = 1024
# Most alternatives a request may ask log-probabilities for at each token (OpenAI's chat API allows 20).
MAX_LOGPROBS = 20
# Guided decoding: the longest regex or grammar a request may give, and the most choices.
MAX_GUIDE_CHARS = 65536
MAX_CHOICES = 1024
# bad_words: the most words a request may ban.
MAX_BAD_WORDS = 256


# Temperatures below this decode greedily (see SamplingConfig.greedy).
GREEDY_TEMPERATURE = 1e-5


# SamplingConfig's fields that constrain the reply (structured output); at most one per request.
STRUCTURED_FIELDS = ("json_schema", "regex", "choice", "grammar")


class SamplingConfig(StrictModel):
    """Per-request sampling parameters."""

    # temperature 0 (or below GREEDY_TEMPERATURE) means greedy decoding.
    temperature: float = Field(default=0.6, ge=0.0, le=10.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    # top_k 0 disables top-k filtering.
    top_k: int = Field(default=0, ge=0)
    # min_p (vLLM's): drop tokens less likely than min_p times the most likely one (0 disables).
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    # None: as many as the context allows, at most DEFAULT_MAX_NEW_TOKENS_CAP.
    max_new_tokens: int | None = Field(default=None, ge=1)
    # 1.0 disables the penalty; >1 discourages repeating tokens already in prompt or output.
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    # OpenAI's penalties (0 disables them): each token's logit is lowered by frequency_penalty times
    # the number of times the reply has generated it, plus presence_penalty if it has at all
    # (negative values encourage repeats). The prompt does not count, as with OpenAI and vLLM.
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # OpenAI's logit_bias: token id -> a value from -100 to 100 added to that token's logit before
    # sampling (-100 in effect bans the token, 100 forces it). Token ids must be in the vocabulary.
    logit_bias: dict[int, float] = Field(default_factory=dict)
    # Log-probabilities: None returns none; k returns each generated token's log-probability and the
    # k most likely tokens at its position, from the model's own distribution (before temperature,
    # penalties, logit_bias and top-k/top-p, as vLLM's default "raw" logprobs).
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # The same for each prompt token after the first (vLLM's prompt_logprobs): the log-probability the
    # model gives it after the tokens before it. The prompt is then prefilled alone, with the logits
    # of every position (context × vocabulary floats).
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    stop: list[str] = Field(default_factory=list)
    # Keep the stop string that ended the reply at its end (vLLM's include_stop_str_in_output).
    include_stop_str_in_output: bool = False
    # Structured output (OpenAI's response_format): the reply must be compact JSON valid against this
    # JSON schema ({"type": "object"} for json_object); a chat reply of a reasoning model is
    # constrained after its reasoning. Needs the `structured` extra (xgrammar); transformers engine.
    json_schema: dict[str, Any] | None = None
    # Guided decoding (vLLM's guided_regex / guided_choice / guided_grammar; constrained the same way,
    # after the reasoning): the reply matches this regular expression, is exactly one of these
    # strings, or is a sentence of this EBNF grammar (GBNF: `root ::= ...`). At most one of
    # json_schema, regex, choice and grammar.
    regex: str | None = Field(default=None, min_length=1, max_length=MAX_GUIDE_CHARS)
    choice: list[Annotated[str, Field(min_length=1)]] | None = Field(default=None, min_length=1, max_length=MAX_CHOICES)
    grammar: str | None = Field(default=None, min_length=1, max_length=MAX_GUIDE_CHARS)
    # Token ids that end the reply when generated (vLLM's stop_token_ids), besides end-of-sequence;
    # they apply with ignore_eos too. Their text stays in the reply (none for special tokens).
    stop_token_ids: list[int] = Field(default_factory=list, max_length=MAX_STOP_TOKEN_IDS)
    # End-of-sequence and stop_token_ids cannot end the reply before it has min_tokens tokens, nor
    # a stop string ending in the text of the tokens before (vLLM's min_tokens). At most the
    # reply's max_new_tokens.
    min_tokens: int = Field(default=0, ge=0)
    # A 64-bit signed integer (torch's generator seed range, and what OpenAI-compatible servers take).
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    # Stop at the tokenizer's end-of-sequence token(s).
    ignore_eos: bool = False
    # vLLM's priority (engine.scheduling_policy: priority): lower values get a free slot first. Not a
    # sampling setting, but it travels with the request's other per-request settings.
    priority: int = Field(default=0, ge=-(2**31), le=2**31 - 1)
    # vLLM's thinking_token_budget: the reasoning (between <think> and </think>, or from the reply's
    # start when the chat template opens it) takes at most this many tokens; then </think> is forced
    # and the answer follows. 0: no reasoning. None: no limit. Needs one-token <think> and </think>.
    thinking_token_budget: int | None = Field(default=None, ge=0)
    # vLLM's allowed_token_ids: the reply's tokens are only these (None: any); ids in the vocabulary.
    allowed_token_ids: list[int] | None = Field(default=None, min_length=1)
    # vLLM's bad_words: words the reply never writes. Each is banned as the tokens the tokenizer
    # gives it alone and after a space: the word's last token cannot follow the tokens before it in
    # the reply (`r1.engine.engine.bad_words_token_ids`).
    bad_words: list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]] = Field(
        default_factory=list, max_length=MAX_BAD_WORDS)

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, stop: list[str]) -> list[str]:
        if any(s == "" for s in stop):
            raise ValueError("stop strings must be non-empty")
        if len(stop) > 16:
            raise ValueError(f"at most 16 stop strings are allowed, got {len(stop)}")
        # The detokenizer holds back text that may still become a stop string at every token, so
        # their length bounds its work per token.
        longest = max((len(s) for s in stop), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(f"a stop string is {longest} characters; at most {MAX_STOP_CHARS} are allowed")
        return stop

    @field_validator("stop_token_ids", "allowed_token_ids")
    @classmethod
    def _ids_not_negative(cls, ids: list[int] | None, info: Any) -> list[int] | None:
        if ids and any(token < 0 for token in ids):
            raise ValueError(f"{info.field_name} must be >= 0")
        return ids

    @field_validator("logit_bias")
    @classmethod
    def _bias_in_range(cls, bias: dict[int, float]) -> dict[int, float]:
        if len(bias) > MAX_LOGIT_BIAS_TOKENS:
            raise ValueError(f"logit_bias names {len(bias)} tokens; at most {MAX_LOGIT_BIAS_TOKENS} are allowed")
        for token, value in bias.items():
            if token < 0:
                raise ValueError(f"logit_bias: token id {token} must be >= 0")
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"logit_bias: the bias of token {token} is {value}; use -100 to 100")
        return bias

    @model_validator(mode="after")
    def _one_constraint(self) -> SamplingConfig:
        given = [name for name in STRUCTURED_FIELDS if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} each constrain the reply; give at most one of them")
        return self

    @property
    def greedy(self) -> bool:
        # Below GREEDY_TEMPERATURE, logits / temperature overflows float32 (1e-39 gave NaN
        # probabilities); such a temperature means greedy anyway, as vLLM treats it.
        return self.temperature < GREEDY_TEMPERATURE


# A LoRA adapter's name as a model name clients send (`engine.lora_adapters`).
ADAPTER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


class EngineConfig(StrictModel):
    """The continuous-batching engine."""

    # Which engine implementation; GPU engines are imported only when selected.
    engine: Literal["transformers", "trtllm", "vllm"] = "transformers"
    # Most sequences decoded together in one step.
    max_num_seqs: int = Field(default=32, ge=1, le=1024)
    # Most requests waiting for a slot; beyond this `submit` refuses (the server answers 429/503).
    max_queued_requests: int = Field(default=256, ge=0)
    # Which waiting request gets the next free slot: fcfs (the oldest), or priority (the lowest
    # sampling.priority, the oldest among equals; vLLM's --scheduling-policy). Running requests
    # are never preempted.
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    # Most prompt tokens prefilled in one step (long prompts are prefilled alone).
    max_prefill_tokens: int = Field(default=8192, ge=1)
    # CUDA only: call torch.cuda.empty_cache() every N decode steps while idle slots exist
    # (0 = never). A no-op on CPU. See r1/engine/memory.py for the policy.
    cuda_empty_cache_every_steps: int = Field(default=0, ge=0)
    # Fraction of reserved-but-unallocated CUDA memory above which the cache is flushed when a
    # request finishes. A no-op on CPU.
    cuda_fragmentation_flush_ratio: float = Field(default=0.5, gt=0.0, le=1.0)
    # Weight quantization. int8: dynamic int8 quantization of the Linear layers (transformers
    # engine, CPU). fp8: FP8 weights and activations (GPU engines: trtllm, vllm).
    quantization: Literal["none", "int8", "fp8"] = "none"
    # transformers engine: wrap the model's forward in torch.compile (first steps compile).
    compile: bool = False
    # transformers engine, CPU: run the Linear layers through oneDNN with their weights packed once
    # at load (fp32 or bf16), which speeds up small-batch decoding. "auto": packed wherever it
    # applies (a model on an x86-64 CPU whose weights it can pack, no int8, no compile,
    # pipeline_stages 1) and left alone elsewhere; true: packed, an error where it cannot be; false: never.
    prepack: bool | Literal["auto"] = "auto"
    # GPU engines only: fraction of GPU memory the engine may reserve (weights + KV cache).
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    # GPU engines only: tensor-parallel degree (GPUs per engine instance).
    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    # CPU threads torch uses for the model in a Serve replica or model shard. None: as Ray set
    # them (OMP_NUM_THREADS = the actor's whole reserved CPUs, 1 for a fractional num_cpus).
    # More threads speed up a replica that has cores to itself; on cores shared with other busy
    # processes (the ingress, other replicas) OpenMP threads wait for each other and decoding can
    # get many times slower, so raise it only up to cores / busy processes on the node.
    cpu_threads: int | None = Field(default=None, ge=1, le=1024)
    # transformers engine: LoRA adapters served beside the base model, name -> adapter directory
    # (peft's format, as `r1 train` with lora.enabled writes it). Each name is a model clients can
    # ask for; requests of different adapters and of the base model decode in one batch
    # (r1/engine/lora.py; with engine=vllm, vLLM's own multi-LoRA). Not with compile,
    # pipeline_stages > 1 or engine=trtllm.
    lora_adapters: dict[str, str] = Field(default_factory=dict)
    # transformers engine: MiB of memory for the prefix cache, 0 for none. The keys and values of
    # finished sequences are kept in blocks of 16 tokens, and a prompt that starts with kept blocks
    # (a chat's history, a shared system text) is prefilled from them: only the rest goes through
    # the model (r1/engine/prefix_cache.py). Least recently used blocks go first. "auto":
    # DEFAULT_PREFIX_CACHE_MB for an engine that loads its own model (r1 serve, r1 chat, r1 generate),
    # none for one built around a model object it is given (TransformersEngine(model, ...), as
    # training's rollouts do: their weights change under it). Not with pipeline_stages > 1; vLLM and
    # TensorRT-LLM keep prefix caches of their own (this setting is not theirs).
    prefix_cache_mb: int | Literal["auto"] = "auto"

    @field_validator("lora_adapters")
    @classmethod
    def _adapter_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, path in value.items():
            if not ADAPTER_NAME_RE.fullmatch(name):
                raise ValueError(f"adapter name {name!r} must be 1-128 characters from A-Z a-z 0-9 . _ : / - "
                                 "(starting with a letter or digit)")
            if not path.strip():
                raise ValueError(f"adapter {name!r} needs the path of its directory")
        return value

    @field_validator("prefix_cache_mb", mode="before")
    @classmethod
    def _prefix_cache_size(cls, value: Any) -> Any:
        # One clear error, not one per member of the union.
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 1 << 20:
            return value
        raise ValueError("expected auto or a size in MiB from 0 (none) to 1048576")

    @field_validator("prepack", mode="before")
    @classmethod
    def _prepack_word(cls, value: Any) -> Any:
        # One clear error for the three words, not one per member of the union.
        if isinstance(value, str) and value.lower() in ("true", "false", "auto"):
            return value.lower() if value.lower() == "auto" else value.lower() == "true"
        if isinstance(value, bool):
            return value
        raise ValueError("expected true, false or auto")

    @model_validator(mode="after")
    def _tensor_parallel_needs_a_gpu_engine(self) -> EngineConfig:
        if self.engine == "transformers" and self.tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} needs engine=vllm or trtllm; the "
                             "transformers engine splits a model across actors with pipeline_stages")
        return self

    @model_validator(mode="after")
    def _priority_needs_a_queue_that_orders(self) -> EngineConfig:
        if self.scheduling_policy == "priority" and self.engine == "trtllm":
            raise ValueError("scheduling_policy=priority is served by engine=transformers or vllm, not trtllm")
        return self

    @model_validator(mode="after")
    def _adapters_need_the_transformers_engine(self) -> EngineConfig:
        if self.lora_adapters and self.engine == "trtllm":
            raise ValueError("lora_adapters are served by engine=transformers or vllm, not trtllm; merge each "
                             "adapter with `r1 model merge-lora` and serve the merged model")
        if self.lora_adapters and self.compile:
            raise ValueError("lora_adapters cannot be combined with compile=true (each batch's mix of adapters "
                             "would recompile the model); set compile=false")
        return self


M = TypeVar("M", bound=BaseModel)


def format_validation_error(error: ValidationError, model_cls: type[BaseModel], source: str) -> str:
    """Turn a pydantic error into lines that name the key, the problem and what is allowed."""
    lines = [f"invalid config in {source}:"]
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            parent = _model_at(model_cls, item["loc"][:-1])
            allowed = ", ".join(sorted(parent.model_fields)) if parent else "?"
            lines.append(f"  {loc}: unknown key; allowed keys: {allowed}")
        elif item["type"] == "value_error" and isinstance(item.get("input"), dict):
            # A check of a whole section (a model validator): its message says what is wrong; the
            # input is the whole section, too long to be of use.
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"  {loc}: {message}")
        else:
            lines.append(f"  {loc}: {item['msg'].removeprefix('Value error, ')} (got {item.get('input')!r})")
    return "\n".join(lines)


def _model_at(model_cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The config model at `loc`, stepping through optional sections, lists and the values of
    mapping sections (`safety.rule_actions.<rule id>`)."""
    current: Any = model_cls
    for part in loc:
        if isinstance(part, int):
            continue
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part)
            if field is None:
                return None
            current = field.annotation
        elif get_origin(current) is dict:  # `part` is a key of a mapping section
            current = get_args(current)[1]
        else:
            return None
        current = _section_type(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _section_type(annotation: Any) -> Any:
    """Optional[X] / X | None -> X (a model or a mapping preferred); list[X] -> X."""
    args = get_args(annotation)
    if args and get_origin(annotation) not in (dict, list):
        annotation = next((a for a in args if (isinstance(a, type) and issubclass(a, BaseModel)) or get_origin(a) is dict),
                          annotation)
    if get_origin(annotation) is list:
        annotation = get_args(annotation)[0]
    return annotation


def parse_config(model_cls: type[M], data: Any, source: str = "config") -> M:
    """Validate `data` against `model_cls`; raise ValueError with a readable message."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"invalid config in {source}: expected a mapping, got {type(data).__name__}")
    try:
        return model_cls.model_validate(data)
    except ValidationError as error:
        raise ValueError(format_validation_error(error, model_cls, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that repeats a key (YAML's own loader keeps the last
    one, so a second `sampling:` section would silently replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """The parsed YAML of a file; a ValueError naming the file for every way reading it can fail."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{what} {path} does not exist")
    try:
        with path.open(encoding="utf-8") as stream:  # a file stream: YAML's error marks name the file
            return yaml.load(stream, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        raise ValueError(f"{what} {path} is not valid YAML: {error}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} {path} is not UTF-8 text: {error}") from None
    except OSError as error:  # a directory, no permission, ...
        raise ValueError(f"cannot read {what} {path}: {error.strerror or error}") from None


def load_yaml(path: str | Path, model_cls: type[M]) -> M:
    """Load a YAML file into `model_cls`, with errors naming the bad key and allowed values."""
    return parse_config(model_cls, read_yaml_file(path), source=str(path))


def set_values(config: M, values: dict[str, Any], source: str) -> M:
    """Set dotted keys (`sampling.temperature`) to Python values and revalidate.

    Missing levels are created, so keys inside mapping fields work (`safety.rule_actions.card_number.input`)
    and a misspelt section is reported by validation with the allowed keys."""
    data = config.model_dump()
    _set_dotted(data, values, source)
    return parse_config(type(config), data, source=source)


def _set_dotted(data: dict[str, Any], values: dict[str, Any], source: str) -> None:
    for key, value in values.items():
        target = data
        parts = key.split(".")
        if not all(parts):
            raise ValueError(f"{source}: {key!r} is not a key (use section.key, e.g. sampling.temperature)")
        for depth, part in enumerate(parts[:-1]):
            if target.get(part) is None:
                target[part] = {}
            if not isinstance(target[part], dict):
                raise ValueError(f"{source}: {'.'.join(parts[:depth + 1])} is a value, not a section (in {key!r})")
            target = target[part]
        target[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`key.sub=value` strings as {dotted key: value}, values parsed as YAML (lists and mappings work too)."""
    values: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. sampling.temperature=0.3)")
        key, raw = item.split("=", 1)
        try:
            values[key] = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            problem = str(getattr(error, "problem", None) or error).strip()
            raise ValueError(f"override {item!r}: the value is not valid YAML ({problem}); quote it, "
                             f"e.g. --set \"{key}='...'\"") from None
    return values


def apply_overrides(config: M, overrides: list[str]) -> M:
    """Apply `key.sub=value` overrides (values parsed as YAML, so lists and mappings work too) and revalidate."""
    return set_values(config, parse_overrides(overrides), "--set overrides")


def load_config(model_cls: type[M], path: str | Path | None, overrides: list[str]) -> M:
    """A config from a YAML file (or the defaults) with `--set` overrides, validated once, after
    the overrides: a required key (a training run's `data.path`) may come from either."""
    data = read_yaml_file(path) if path else None
    if data is None:  # no file, or an empty one: the defaults
        data = {}
    source = str(path) if path else "defaults"
    if overrides and isinstance(data, dict):  # parse_config names a file that is not a mapping
        _set_dotted(data, parse_overrides(overrides), "--set overrides")
        source += " with --set overrides"
    return parse_config(model_cls, data, source=source)


class GenerateConfig(StrictModel):
    """What `r1 generate` / `r1 chat` read: a model, sampling defaults and the engine."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)

    @model_validator(mode="after")
    def _gpu_engine_needs_cuda(self) -> GenerateConfig:
        if self.engine.engine != "transformers" and self.model.device == "cpu":
            raise ValueError(f"engine={self.engine.engine} needs a GPU; use engine=transformers on device=cpu")
        return self


def _over_defaults(defaults: dict[str, Any]) -> BeforeValidator:
    """Merge a (partial) section given in YAML or --set over a field's own defaults, so that
    `llm: {min_replicas: 3}` keeps the llm deployment's other settings instead of the class's."""
    return BeforeValidator(lambda value: {**defaults, **value} if isinstance(value, dict) else value)


class DeploymentConfig(StrictModel):
    """Replicas and resources of one Ray Serve deployment (maps onto Serve's autoscaling_config)."""

    min_replicas: int = Field(default=2, ge=0)
    max_replicas: int = Field(default=10, ge=1)
    # Average in-flight requests per replica the autoscaler aims for; explicit so it really scales.
    target_ongoing_requests: float = Field(default=4.0, gt=0)
    # Requests one replica accepts at once; beyond this Serve queues them at the caller.
    max_ongoing_requests: int = Field(default=32, ge=1)
    # Requests queued at the caller before Serve answers "overloaded" (-1: unbounded).
    max_queued_requests: int = Field(default=64, ge=-1)
    upscale_delay_s: float = Field(default=5.0, ge=0)
    downscale_delay_s: float = Field(default=30.0, ge=0)
    # The window over which Serve averages in-flight requests before deciding (Serve's own default
    # is 30 s); shorter reacts faster to load and to its end.
    look_back_period_s: float = Field(default=15.0, gt=0)
    num_cpus: float = Field(default=0.1, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    health_check_period_s: float = Field(default=10.0, gt=0)
    health_check_timeout_s: float = Field(default=30.0, gt=0)
    # Serve's access log line per call. Off for internal deployments called per streamed chunk
    # (the SafetyFilter), where writing it costs more CPU than the call's own work.
    access_log: bool = True

    @model_validator(mode="after")
    def _replica_bounds(self) -> DeploymentConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} exceeds max_replicas={self.max_replicas}")
        return self

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options(...)`."""
        return {
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "initial_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
                "look_back_period_s": self.look_back_period_s,
            },
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "logging_config": {"enable_access_log": self.access_log},
        }


class ShardConfig(StrictModel):
    """Resources of one ModelShard actor (a pipeline stage)."""

    num_cpus: float = Field(default=0.1, ge=0)
    # GPUs per stage; "auto" = 1 when the cluster has GPUs, else 0.
    num_gpus: float | Literal["auto"] = "auto"


# Each deployment's own defaults; a partial section in a config is merged over them.
INGRESS_DEPLOYMENT: dict[str, Any] = {"num_cpus": 0.05, "target_ongoing_requests": 8}
LLM_DEPLOYMENT: dict[str, Any] = {"num_cpus": 0.1, "target_ongoing_requests": 4}
SAFETY_DEPLOYMENT: dict[str, Any] = {"num_cpus": 0.1, "target_ongoing_requests": 16, "max_ongoing_requests": 64,
                                     "access_log": False}


class ServeConfig(StrictModel):
    """The OpenAI-compatible Serve application (`ray_configs/serve.yaml` `args:`, `r1 serve`)."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    # Defaults for request fields the client leaves out.
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    # The model name clients send and /v1/models lists (default: the model setting).
    served_model_name: str | None = None
    # Split the model's decoder layers into this many ModelShard actors per LLM-server replica.
    pipeline_stages: int = Field(default=1, ge=1)
    shards: ShardConfig = Field(default_factory=ShardConfig)
    # API keys: from the env var R1_API_KEYS (comma-separated) and/or this file (one key per line).
    api_keys_file: str | None = None
    api_keys_env: str = "R1_API_KEYS"
    # Refuse to start without API keys (an empty or unset R1_API_KEYS would otherwise serve an open
    # API, with a warning): for deployments that listen beyond loopback, e.g. on Kubernetes.
    require_api_keys: bool = False
    # Request limits (violations are 4xx that name the limit).
    max_request_bytes: int = Field(default=1_000_000, ge=1024)
    max_tokens_limit: int = Field(default=DEFAULT_MAX_NEW_TOKENS_CAP, ge=1)
    max_n: int = Field(default=8, ge=1)
    max_messages: int = Field(default=256, ge=1)
    # The thinking_token_budget each reasoning_effort a request may name stands for (OpenAI's chat
    # reasoning_effort, the Responses API's reasoning.effort); null: no limit for that level.
    reasoning_effort_budgets: dict[str, Annotated[int, Field(ge=0)] | None] = Field(default_factory=lambda: {
        "none": 0, "minimal": 128, "low": 1024, "medium": 2048, "high": 8192})
    # Seconds a request may wait for the first token before the server answers 503.
    request_timeout_s: float = Field(default=300.0, gt=0)
    # The LLM server sends the first token at once, then gathers the tokens decoded within this many
    # ms into one message to the ingress (0: no window; tokens that piled up still go together).
    # Every message is a Ray hop plus a SafetyFilter call; on a busy CPU they cost more than the
    # model step of a small model.
    stream_interval_ms: float = Field(default=20.0, ge=0, le=1000)
    # The messages per second one LLM server replica sends over all its streams: with many streams
    # each stream's window widens past stream_interval_ms to active streams / this (16 streams at
    # 200/s: 80 ms). null: every stream keeps stream_interval_ms.
    stream_messages_per_s: float | None = Field(default=200.0, gt=0)
    # Run the ingress's request handling and the routing of its calls to the other deployments on
    # the replica's own event loop, instead of Ray Serve's separate user-code thread and router loop
    # (Serve's RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 and RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0,
    # set for the ingress replicas only): fewer thread hand-offs per request and per streamed
    # message. Safe because the ingress never blocks its loop for long (the model runs in the LLM
    # server; the code-repair loop runs in a worker thread).
    ingress_single_loop: bool = True
    ingress: Annotated[DeploymentConfig, _over_defaults(INGRESS_DEPLOYMENT)] = Field(
        default_factory=lambda: DeploymentConfig(**INGRESS_DEPLOYMENT))
    llm: Annotated[DeploymentConfig, _over_defaults(LLM_DEPLOYMENT)] = Field(
        default_factory=lambda: DeploymentConfig(**LLM_DEPLOYMENT))
    # How the ingress picks an LLM-server replica. prefix_affinity: the replica a request's prompt
    # start belongs to (a chat's turns, requests of one long system text), where its prefix cache
    # holds it, within `llm_routing_imbalance` queued requests of the key's second replica
    # (cluster/serve/routing.py); power_of_two: Serve's default (the less loaded of two random ones).
    llm_routing: Literal["prefix_affinity", "power_of_two"] = "prefix_affinity"
    llm_routing_imbalance: int = Field(default=4, ge=0)
    # Dialog sessions (SessionStore actors); classes defined further down in this module.
    sessions: SessionConfig = Field(default_factory=lambda: SessionConfig())
    # The SafetyFilter deployment screening input and output (fail-closed); null disables screening.
    safety: SafetyConfig | None = Field(default_factory=lambda: SafetyConfig())
    # The CodeValidator deployment behind `code_validation: true` requests; null disables it.
    code_validator: CodeValidatorConfig | None = Field(default_factory=lambda: CodeValidatorConfig())

    @model_validator(mode="after")
    def _adapters_named_apart(self) -> ServeConfig:
        if self.model_name in self.engine.lora_adapters:
            raise ValueError(f"engine.lora_adapters names an adapter {self.model_name!r}, the served model's own "
                             "name; give the adapter another name")
        if self.engine.lora_adapters and self.pipeline_stages > 1:
            raise ValueError(f"engine.lora_adapters are not served with pipeline_stages={self.pipeline_stages}; "
                             "use pipeline_stages=1, or merge each adapter with `r1 model merge-lora`")
        return self

    @model_validator(mode="after")
    def _gpu_engine_unsharded(self) -> ServeConfig:
        if self.engine.engine != "transformers" and self.pipeline_stages > 1:
            raise ValueError(f"engine={self.engine.engine} runs the whole model itself (use its tensor_parallel_size); "
                             f"pipeline_stages={self.pipeline_stages} needs engine=transformers")
        return self

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.model


# Component configs added by other parts of r1-cluster go below this line.


# --- Training (`r1 train {sft,reward,grpo}`; ray_configs/train_*.yaml) ---------------------------


# Difficulty levels of the built-in arithmetic task (r1.tasks.arithmetic.LEVELS).
TaskLevel = Literal[1, 2, 3]


class TrainScalingConfig(StrictModel):
    """How many Ray Train workers and what each one reserves."""

    num_workers: int = Field(default=2, ge=1)
    # One GPU per worker and the NCCL backend when true; gloo on CPU otherwise.
    use_gpu: bool = False
    # Ray resources per worker, e.g. {"CPU": 0.5}; None keeps Ray Train's default (1 CPU, +1 GPU with use_gpu).
    resources_per_worker: dict[str, Annotated[float, Field(ge=0)]] | None = None


class TrainStrategyConfig(StrictModel):
    """Data parallelism: torch DDP, or DeepSpeed ZeRO (stage 0-3, optional CPU offload)."""

    name: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = Field(default=0, ge=0, le=3)
    # "optimizer" needs zero_stage >= 1; "optimizer_and_params" needs zero_stage 3.
    offload: Literal["none", "optimizer", "optimizer_and_params"] = "none"
    # DeepSpeed's shared-memory all-reduce for CPU workers on one node. It is a C++ op compiled on
    # first use (about a minute, once per TORCH_EXTENSIONS_DIR); off, CPU workers all-reduce over gloo.
    cpu_shm_comm: bool = False

    @model_validator(mode="after")
    def _zero_options_need_deepspeed(self) -> TrainStrategyConfig:
        if self.name == "ddp" and (self.zero_stage != 0 or self.offload != "none" or self.cpu_shm_comm):
            raise ValueError(
                f"zero_stage={self.zero_stage} / offload={self.offload} / cpu_shm_comm={self.cpu_shm_comm} "
                "need strategy.name=deepspeed (DDP has none of them)"
            )
        if self.offload == "optimizer" and self.zero_stage < 1:
            raise ValueError("offload=optimizer needs zero_stage >= 1; raise zero_stage or set offload=none")
        if self.offload == "optimizer_and_params" and self.zero_stage != 3:
            raise ValueError("offload=optimizer_and_params needs zero_stage=3")
        return self


class TrainLoraConfig(StrictModel):
    """LoRA adapters via peft; only the adapters train and only they are saved."""

    enabled: bool = False
    rank: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0.0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)


class TrainOptimConfig(StrictModel):
    """AdamW with linear warmup and an optional decay schedule."""

    lr: float = Field(default=1e-4, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    beta2: float = Field(default=0.95, ge=0.0, lt=1.0)
    warmup_steps: int = Field(default=0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    # 0 disables gradient clipping.
    max_grad_norm: float = Field(default=1.0, ge=0.0)


class TrainCheckpointConfig(StrictModel):
    """Where a run lives and how often it saves (through ray.train.report)."""

    # 0: checkpoint only at the end of the run.
    every_steps: int = Field(default=50, ge=0)
    # None: "r1-<stage>". Rerunning the same name and storage_path continues from its latest checkpoint.
    run_name: str | None = None
    # Use an absolute or ~ path for `ray job submit` (the job's working dir is temporary).
    storage_path: str = "~/r1-runs"
    num_to_keep: int = Field(default=2, ge=1)
    # Where the final model (Hugging Face format; LoRA adapters when lora.enabled) is written.
    # None: <storage_path>/<run_name>/final.
    export_dir: str | None = None


class TrainFailureConfig(StrictModel):
    # Restarts from the latest checkpoint after a worker failure; -1 retries forever.
    max_failures: int = Field(default=0, ge=-1)


class TrainCommonConfig(StrictModel):
    """Sections every training stage shares."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    scaling: TrainScalingConfig = Field(default_factory=TrainScalingConfig)
    # Autocast dtype; weights stay fp32. fp16 adds a GradScaler.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    strategy: TrainStrategyConfig = Field(default_factory=TrainStrategyConfig)
    lora: TrainLoraConfig = Field(default_factory=TrainLoraConfig)
    optim: TrainOptimConfig = Field(default_factory=TrainOptimConfig)
    checkpoint: TrainCheckpointConfig = Field(default_factory=TrainCheckpointConfig)
    failure: TrainFailureConfig = Field(default_factory=TrainFailureConfig)
    seed: int = 0
    max_steps: int = Field(default=100, ge=1)
    log_every_steps: int = Field(default=1, ge=1)
    # JSON lines written by the driver; None: <storage_path>/<run_name>/metrics.jsonl.
    metrics_path: str | None = None
    progress_bar: bool = True
    # Measure the time spent in gradient all-reduce (DDP: a comm hook with CUDA events, cheap;
    # DeepSpeed: its comms logger, which syncs the device after every collective).
    measure_comm: bool = True

    @model_validator(mode="after")
    def _gpu_options_need_gpu(self) -> TrainCommonConfig:
        if self.strategy.name == "deepspeed" and self.precision != "fp32" and not self.scaling.use_gpu:
            raise ValueError(f"strategy=deepspeed with precision={self.precision} needs GPUs; use precision=fp32 on CPU")
        return self


class SFTDataConfig(StrictModel):
    """SFT data: a file (plain text, or chat JSONL) or a generated task."""

    # .txt/.md: plain-text corpus (loss on every token). .jsonl: {"messages": [...]} (loss on assistant
    # tokens only) or {"text": "..."} lines.
    path: str | None = None
    # Generate examples from a built-in task instead of a file.
    task: Literal["arithmetic"] | None = None
    num_examples: int = Field(default=2000, ge=1)
    levels: list[TaskLevel] = Field(default_factory=lambda: [1], min_length=1)
    # task only: this many more train-split problems whose worked lines ("23 + 45 = 68") form a
    # plain-text corpus with loss on every token (self-supervised, far denser in arithmetic than chat).
    corpus_examples: int = Field(default=0, ge=0)
    max_seq_len: int = Field(default=256, ge=8)

    @model_validator(mode="after")
    def _one_source(self) -> SFTDataConfig:
        if self.path is not None and self.task is not None:
            raise ValueError(f"data.path and data.task={self.task} are both set; to train on the file, also set "
                             "data.task=null (e.g. --set data.task=null; the default config uses the arithmetic task)")
        if self.path is None and self.task is None:
            raise ValueError("set exactly one of data.path (a .txt or .jsonl file) or data.task (arithmetic)")
        if self.corpus_examples and self.task is None:
            raise ValueError("data.corpus_examples needs data.task; with data.path put the corpus in the file")
        return self


class SFTTrainConfig(TrainCommonConfig):
    data: SFTDataConfig = Field(default_factory=lambda: SFTDataConfig(task="arithmetic"))
    batch_size_per_worker: int = Field(default=8, ge=1)


class RewardDataConfig(StrictModel):
    """Preference JSONL: one {"prompt", "chosen", "rejected"} object per line."""

    path: str
    # Share of pairs held out to report pairwise accuracy.
    eval_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    max_seq_len: int = Field(default=256, ge=8)


class RewardTrainConfig(TrainCommonConfig):
    data: RewardDataConfig
    batch_size_per_worker: int = Field(default=8, ge=1)


class GRPORewardSpec(StrictModel):
    """One term of the GRPO reward: weight * reward(completion)."""

    # format: <think>…</think> then an answer; accuracy: the task's answer checker;
    # reward_model: the score of a model trained with `r1 train reward` (model_path);
    # code_tests: the share of the prompt's unit tests (its "answer") the completion's code passes,
    # run in the sandbox.
    name: Literal["format", "accuracy", "reward_model", "code_tests"]
    weight: float = 1.0
    model_path: str | None = None
    # code_tests only: CodeValidator Ray actors that run the tests for every training worker
    # (0: each training worker runs them in its own sandbox; unset: 2).
    validators: int | None = Field(default=None, ge=0, le=64)

    @model_validator(mode="after")
    def _reward_model_needs_path(self) -> GRPORewardSpec:
        if (self.name == "reward_model") != (self.model_path is not None):
            raise ValueError("model_path is required for name=reward_model and only allowed there")
        if self.validators is not None and self.name != "code_tests":
            raise ValueError(f"validators is only used by name=code_tests (got name={self.name})")
        return self

    @property
    def num_validators(self) -> int:
        """CodeValidator actors to start for this term (0 for every term but code_tests)."""
        if self.name != "code_tests":
            return 0
        return 2 if self.validators is None else self.validators


class GRPOPromptsConfig(StrictModel):
    """Prompts with reference answers: a JSONL file ({"prompt": str, "answer": ...}) or a task."""

    path: str | None = None
    # arithmetic: generated word problems (answer: the number); coding: r1.codecheck's coding tasks
    # (answer: their unit tests, for the code_tests reward).
    task: Literal["arithmetic", "coding"] | None = None
    # How many task prompts (a prompts.path file is used whole).
    num_prompts: int = Field(default=2000, ge=1)
    levels: list[TaskLevel] = Field(default_factory=lambda: [2], min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> GRPOPromptsConfig:
        if self.path is not None and self.task is not None:
            raise ValueError(f"prompts.path and prompts.task={self.task} are both set; to use the file, also set "
                             "prompts.task=null (e.g. --set prompts.task=null)")
        if self.path is None and self.task is None:
            raise ValueError("set exactly one of prompts.path (a .jsonl file) or prompts.task (arithmetic|coding)")
        return self


class GRPOConfig(StrictModel):
    """Group Relative Policy Optimization (DeepSeek-R1's RL algorithm)."""

    # Samples per prompt; advantages are normalised within each group.
    group_size: int = Field(default=8, ge=2)
    # Prompts per optimizer step on each worker.
    prompts_per_step: int = Field(default=4, ge=1)
    clip_eps: float = Field(default=0.2, gt=0.0)
    # Weight of the k3 KL estimate to the frozen reference; 0 loads no reference model.
    kl_beta: float = Field(default=0.001, ge=0.0)
    # Sampling temperature of the rollouts (the guide's reward_temperature, default 0.7): higher gives
    # more diverse groups, hence more reward variance for the advantages to learn from.
    reward_temperature: float = Field(default=0.7, gt=0.0, le=10.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(default=128, ge=1)
    # Optimizer steps per batch of rollouts (the ratio is exactly 1 on the first).
    num_iterations: int = Field(default=1, ge=1)
    adv_eps: float = Field(default=1e-4, gt=0.0)
    # token: mean over all completion tokens of the batch; sequence: mean per sequence, then over sequences.
    loss_aggregation: Literal["token", "sequence"] = "token"
    rewards: list[GRPORewardSpec] = Field(
        default_factory=lambda: [GRPORewardSpec(name="format", weight=0.5), GRPORewardSpec(name="accuracy", weight=1.0)]
    )

    @field_validator("rewards")
    @classmethod
    def _rewards_not_empty(cls, rewards: list[GRPORewardSpec]) -> list[GRPORewardSpec]:
        if not rewards:
            raise ValueError("grpo.rewards is empty; add at least one of format, accuracy, reward_model")
        return rewards


class GRPOTrainConfig(TrainCommonConfig):
    prompts: GRPOPromptsConfig = Field(default_factory=lambda: GRPOPromptsConfig(task="arithmetic"))
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    # Held-out prompts scored greedily at the end (0 skips); reported as eval_accuracy / eval_format_rate.
    eval_num_problems: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _rewards_fit_the_task(self) -> GRPOTrainConfig:
        # A task's answers are what its rewards check: numbers for arithmetic, unit tests for coding.
        names = {reward.name for reward in self.grpo.rewards}
        if self.prompts.task == "coding" and "accuracy" in names:
            raise ValueError("grpo.rewards: the accuracy reward checks integer answers and prompts.task=coding "
                             "answers with unit tests; use code_tests (e.g. --set 'grpo.rewards=[{name: format, "
                             "weight: 0.5}, {name: code_tests, weight: 1.0}]')")
        if self.prompts.task == "arithmetic" and "code_tests" in names:
            raise ValueError("grpo.rewards: code_tests runs unit tests and prompts.task=arithmetic answers with "
                             "numbers; use accuracy, or prompts.task=coding")
        return self


class CodeCheckConfig(StrictModel):
    """Code validation: the sandbox's limits, the test harness and the repair loop (r1/codecheck)."""

    # "auto": bubblewrap when it works here, else rlimits (+ a uid switch when root); the level
    # actually obtained is reported on every RunResult. "bwrap"/"rlimits" force one level.
    isolation: Literal["auto", "bwrap", "rlimits"] = "auto"
    # Wall-clock budget of one sandbox run (a whole validation: import, all tests), counted from the
    # program's start, so that a slow start on a busy host does not eat into it.
    timeout_s: float = Field(default=5.0, gt=0.0, le=600.0)
    # Allowance for getting the program started: waiting for a free sandbox uid, the launcher and
    # bubblewrap's namespaces (normally well under a second). Past it the run fails with
    # `started: false` ("did not start"), which the repair loop and the GRPO reward treat as the
    # sandbox's failure, not the program's.
    start_timeout_s: float = Field(default=20.0, gt=0.0, le=600.0)
    # Address-space limit (RLIMIT_AS) of every process in the sandbox.
    memory_mb: int = Field(default=512, ge=64, le=65536)
    # stdout and stderr are each cut at this many bytes (the pipe is then closed).
    max_output_bytes: int = Field(default=64 * 1024, ge=1024, le=64 * 1024 * 1024)
    # Largest file the program may write (RLIMIT_FSIZE).
    max_file_mb: int = Field(default=16, ge=1, le=4096)
    # Size of each private tmpfs (/sandbox, the working directory, and /tmp) under bubblewrap.
    tmpfs_mb: int = Field(default=64, ge=1, le=4096)
    # RLIMIT_NOFILE of the program.
    max_open_files: int = Field(default=64, ge=16, le=65536)
    # Processes + threads the program may have at once (RLIMIT_NPROC, per sandbox uid).
    max_processes: int = Field(default=32, ge=1, le=4096)
    # Each run gets its own uid from [sandbox_uid_base, sandbox_uid_base + sandbox_uid_count) so
    # RLIMIT_NPROC budgets are per run and leftovers can be swept by uid. The range must be unused
    # on the host and mapped in its user namespace; used only when running as root.
    sandbox_uid_base: int = Field(default=1_990_000_000, ge=1000, le=2_147_483_646)
    sandbox_uid_count: int = Field(default=256, ge=1, le=65536)
    # Interpreter that runs untrusted code; None picks the first of this interpreter's base
    # executable, /usr/bin/python3, /usr/local/bin/python3 that the sandbox uid can execute.
    python_executable: str | None = None
    # Repair loop (stage 3): attempts after the first, and the lower temperature they use.
    max_repairs: int = Field(default=2, ge=0, le=16)
    repair_temperature: float = Field(default=0.2, ge=0.0, le=10.0)
    # How many test cases to ask the model for when a request brings no tests.
    num_generated_tests: int = Field(default=5, ge=1, le=50)

    @model_validator(mode="after")
    def _uid_range_fits(self) -> CodeCheckConfig:
        last = self.sandbox_uid_base + self.sandbox_uid_count - 1
        if last > 2_147_483_646:
            raise ValueError(
                f"sandbox uid range ends at {last}, above 2147483646 (bubblewrap rejects larger uids); "
                "lower sandbox_uid_base or sandbox_uid_count"
            )
        return self


class CodeValidatorConfig(StrictModel):
    """The CodeValidator Serve deployment: its sandbox settings and how it scales."""

    codecheck: CodeCheckConfig = Field(default_factory=CodeCheckConfig)
    # Fractional CPU per replica: replicas mostly wait on sandbox subprocesses.
    num_cpus: float = Field(default=0.1, gt=0.0, le=64.0)
    min_replicas: int = Field(default=1, ge=0, le=1000)
    max_replicas: int = Field(default=4, ge=1, le=1000)
    target_ongoing_requests: float = Field(default=2.0, gt=0.0, le=1000.0)
    # Requests a replica accepts at once; further requests queue at the handle/router.
    max_ongoing_requests: int = Field(default=4, ge=1, le=1000)
    # Sandbox runs a replica executes at once (each is one subprocess tree).
    max_concurrent_runs: int = Field(default=2, ge=1, le=256)

    @model_validator(mode="after")
    def _replicas_ordered(self) -> CodeValidatorConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} exceeds max_replicas={self.max_replicas}")
        if self.max_concurrent_runs > self.codecheck.sandbox_uid_count:
            raise ValueError(
                f"max_concurrent_runs={self.max_concurrent_runs} exceeds codecheck.sandbox_uid_count="
                f"{self.codecheck.sandbox_uid_count}; raise sandbox_uid_count"
            )
        return self


# --- Safety filter (r1/safety, actors/safety.py) -------------------------------------------------

# What a rule does when it fires, per direction: block the whole text, redact the span, flag it
# (reported in findings and metrics, text unchanged), or off (the rule is not evaluated).
# YAML 1.1 reads a bare `off` as false: take it as "off", since that is what was written.
SafetyRuleAction = Annotated[Literal["block", "redact", "flag", "off"], BeforeValidator(_yaml_off)]


class SafetyRuleConfig(StrictModel):
    """One detection rule of the safety filter (see r1/safety/rules.py for the kinds)."""

    # Names the rule in findings and metrics; never contains matched content.
    id: str = Field(pattern=r"^[a-z][a-z0-9_.-]{0,63}$")
    kind: Literal["keyword", "regex", "card_number", "secret"]
    # keyword: words to find anywhere (CJK-aware, no word boundaries; ASCII words not inside
    # longer ASCII words; ASCII case ignored). secret: words whose following value is redacted.
    keywords: list[str] = Field(default_factory=list)
    # secret: words that follow a short digit code ("384920是您的验证码").
    code_keywords: list[str] = Field(default_factory=list)
    # regex: a Python regex matched against the folded copy (NFKC, zero-width removed).
    pattern: str | None = None
    # regex: longest span a match (with any lookahead) can cover; streams hold back this much.
    # Needed when the pattern is unbounded (`+`, `*`) or uses lookahead.
    max_match_chars: int | None = Field(default=None, ge=1, le=4096)
    # card_number: digit count of a number, separators (space, dash) and zero-width chars allowed.
    min_digits: int = Field(default=16, ge=4, le=64)
    # None: no upper bound (any run of min_digits or more digits).
    max_digits: int | None = Field(default=19, ge=4, le=64)
    # card_number: "valid" = Luhn checksum passes, "invalid" = fails, "any" = not checked.
    luhn: Literal["valid", "invalid", "any"] = "valid"
    input: SafetyRuleAction = "redact"
    output: SafetyRuleAction = "redact"

    @model_validator(mode="after")
    def _fields_match_kind(self) -> SafetyRuleConfig:
        kind = self.kind
        if kind in ("keyword", "secret") and not (self.keywords or self.code_keywords):
            raise ValueError(f"rule {self.id!r} of kind {kind} needs a non-empty `keywords` list")
        if kind == "keyword" and self.code_keywords:
            raise ValueError(f"rule {self.id!r}: `code_keywords` is only for kind secret")
        if kind not in ("keyword", "secret") and (self.keywords or self.code_keywords):
            raise ValueError(f"rule {self.id!r}: `keywords` is only for kinds keyword and secret")
        if any(not word.strip() for word in self.keywords + self.code_keywords):
            raise ValueError(f"rule {self.id!r}: keywords must be non-empty strings")
        if (kind == "regex") != (self.pattern is not None):
            raise ValueError(f"rule {self.id!r}: `pattern` is required for kind regex and only allowed there")
        if self.max_match_chars is not None and kind != "regex":
            raise ValueError(f"rule {self.id!r}: `max_match_chars` is only for kind regex")
        if self.pattern is not None:
            import re

            try:
                re.compile(self.pattern)
            except re.error as error:
                raise ValueError(f"rule {self.id!r}: pattern {self.pattern!r} is not a valid regex: {error}") from None
        if self.max_digits is not None and self.max_digits < self.min_digits:
            raise ValueError(f"rule {self.id!r}: max_digits={self.max_digits} < min_digits={self.min_digits}")
        if self.max_digits is None and self.luhn != "any":
            # Whether an unbounded run passes a checksum changes with every digit that follows, so a
            # stream could never emit any of it (and the check is quadratic in the run's length).
            raise ValueError(f"rule {self.id!r}: max_digits=null (any run of min_digits or more) needs luhn=any; "
                             "set max_digits (at most 64) to check the Luhn checksum")
        return self


class SafetyRuleActions(StrictModel):
    """Per-direction action override for a rule of the chosen profile (None keeps the profile's)."""

    input: SafetyRuleAction | None = None
    output: SafetyRuleAction | None = None


class SafetyConfig(StrictModel):
    """The safety filter: a profile, extra rules, action overrides and the actor call's limits."""

    # strict: the guide's filter (信用卡/密码/验证码 or 16+ digits → whole text blocked).
    # default: redact card numbers and secrets, let harmless mentions through.
    profile: Literal["default", "strict"] = "default"
    # Extra rules evaluated after the profile's; ids must not repeat profile rule ids.
    rules: list[SafetyRuleConfig] = Field(default_factory=list)
    # Per-direction overrides of the profile's rule actions, by rule id.
    rule_actions: dict[str, SafetyRuleActions] = Field(default_factory=dict)
    # The whole text becomes this when a block rule fires (the guide's message).
    block_message: str = "内容包含敏感信息"
    # Each redacted span becomes this.
    redaction_text: str = "[已隐藏]"
    # Longest a caller waits for the SafetyFilter deployment; past it the request fails (503).
    timeout_s: float = Field(default=5.0, gt=0.0, le=60.0)
    # The SafetyFilter Serve deployment. A check takes micro- to milliseconds, so a replica
    # serves many requests at once on a tenth of a CPU.
    deployment: Annotated[DeploymentConfig, _over_defaults(SAFETY_DEPLOYMENT)] = Field(
        default_factory=lambda: DeploymentConfig(**SAFETY_DEPLOYMENT))

    @field_validator("rules")
    @classmethod
    def _unique_rule_ids(cls, rules: list[SafetyRuleConfig]) -> list[SafetyRuleConfig]:
        seen: set[str] = set()
        for rule in rules:
            if rule.id in seen:
                raise ValueError(f"rule id {rule.id!r} appears twice; rule ids must be unique")
            seen.add(rule.id)
        return rules


# --- Dialog sessions (r1/sessions, actors/session_store.py) -------------------------------------


class SessionConfig(StrictModel):
    """Dialog sessions: history stored per session by SessionStore actors, windowed into the prompt."""

    enabled: bool = True
    # SessionStore actors; a session lives on partition sha256(id) % num_partitions. Keep it fixed
    # for a deployment's lifetime (the storage is shared, but each session must have one actor).
    num_partitions: int = Field(default=4, ge=1, le=1024)
    # sqlite:///~/path or sqlite:////abs/path (one node; the actors run on the head node), or
    # redis://host:6379/0 (multi-node; run Redis with appendonly yes, appendfsync always).
    backend_url: str = "sqlite:///~/.cache/r1-cluster/sessions.db"
    # Stored messages (user and assistant) the prompt carries, newest last; older ones stay stored.
    window_messages: int = Field(default=10, ge=0, le=10_000)
    # Extra cap on prompt tokens (window + new messages); None: only the model's context minus the reply's room.
    window_tokens: int | None = Field(default=None, ge=1)
    # Room kept for the reply when a request sets no max_tokens (at most half the context).
    reply_reserve_tokens: int = Field(default=1024, ge=1)
    # A session idle this long is gone (reads as missing, then removed). A stored turn refreshes it, and
    # so does a turn starting after half of it (so every turn has at least half of it to finish).
    # At most 100 years: Redis keeps the TTL as an integer of milliseconds.
    idle_ttl_s: float = Field(default=7 * 24 * 3600.0, gt=0, le=100 * 365 * 24 * 3600.0)
    # Oldest messages beyond this are removed from storage.
    max_stored_messages: int = Field(default=10_000, ge=2)
    # SQLite only. full: a commit survives power loss; normal: survives process crashes only.
    sqlite_synchronous: Literal["full", "normal"] = "full"
    # SQLite only: how often an actor deletes expired sessions.
    sweep_interval_s: float = Field(default=300.0, gt=0)
    num_cpus: float = Field(default=0.05, ge=0)
    # Deadline of one call to a SessionStore actor (including a restart of that actor).
    call_timeout_s: float = Field(default=15.0, gt=0)
    # Ray namespace of the named (detached) SessionStore actors.
    namespace: str = Field(default="r1-cluster", min_length=1)

    @field_validator("backend_url")
    @classmethod
    def _known_backend(cls, url: str) -> str:
        from r1.sessions.store import parse_backend_url

        parse_backend_url(url)
        return url


# --- Telemetry (r1/telemetry.py, r1/metrics.py, actors/metrics.py) -------------------------------


class TelemetryConfig(StrictModel):
    """Tracing (OpenTelemetry) for every process of a deployment or training run.

    Every Ray worker sets tracing up from environment variables on first use, so a driver passes
    `r1.telemetry.telemetry_env_vars(config)` in its runtime_env; unset fields fall back to them.
    """

    # auto: JSON lines when a trace file is set, OTLP when an OTLP endpoint is set (both when both
    # are), otherwise off. otlp / jsonl: exactly that exporter (its target must be set). off: no tracing.
    exporter: Annotated[Literal["auto", "otlp", "jsonl", "off"], BeforeValidator(_yaml_off)] = "auto"
    # JSON-lines trace file shared by all processes of the node (one span per line); None: $R1_TRACE_FILE.
    trace_file: str | None = None
    # OTLP collector, e.g. http://otel-collector:4318 (http/protobuf) or http://otel-collector:4317
    # (grpc); None: $OTEL_EXPORTER_OTLP_ENDPOINT.
    otlp_endpoint: str | None = None
    # None: $OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf (the OpenTelemetry default).
    otlp_protocol: Literal["grpc", "http/protobuf"] | None = None
    # service.name of the spans; each component appends its role (r1-cluster-ingress, ...).
    service_name: str = Field(default="r1-cluster", min_length=1)
    # Opt-in: put prompt and completion text into span attributes. Off: sizes and ids only.
    record_content: bool = False
    # How often each actor samples its memory and compute utilization into the metrics.
    resource_sample_interval_s: float = Field(default=5.0, gt=0.0, le=3600.0)
