"""ModelShard actors: one pipeline stage of a model each, and the runner that chains them.

An LLMServer replica with `pipeline_stages: N` is deployed with a placement group of N bundles
(one per stage, a GPU each when the cluster has GPUs); the replica starts one ModelShard actor in
each bundle. Stage outputs travel as object refs straight from one shard to the next, so a decode
step costs one `ray.get` in the replica, not N. The shards are owned by the replica and die with it.
"""

from __future__ import annotations

from typing import Any

import ray
import torch
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors import metrics
from actors.tracing import setup_actor_tracing
from r1.config import ServeConfig
from r1.engine import TransformersEngine
from r1.engine.engine import stop_token_ids
from r1.engine.optimize import check_sharded_options
from r1.engine.pipeline import ModelStage, PipelineRunner, split_layers
from r1.model import context_length, load_generation_config, load_model, load_model_config
from r1.sequence_spans import RequestCarriers, SequenceSpans

SHARD_CALL_TIMEOUT_S = 120.0


@ray.remote
class ModelShard:
    def __init__(self, model_config: dict[str, Any], stage_index: int, num_stages: int, pad_token_id: int,
                 cpu_threads: int | None = None):
        from r1.config import ModelConfig

        setup_actor_tracing("model-shard")
        if cpu_threads is not None:  # else as Ray set them (the shard's reserved CPUs)
            torch.set_num_threads(cpu_threads)
        model, _ = load_model(ModelConfig.model_validate(model_config))
        self.stage = ModelStage.from_full_model(model, stage_index, num_stages, pad_token_id, copy_model=False)
        # One span per traced request in this stage: opened at prefill, ended when the sequence is removed.
        self.spans = SequenceSpans("model_shard.generate", stage_index=stage_index, num_stages=num_stages,
                                   first_layer=self.stage.layers.start, end_layer=self.stage.layers.stop)
        metrics.start_resource_reporter("model_shard", cores=torch.get_num_threads())  # its threads, as the LLM server

    def add(self, seq_ids: list[str], payload: Any, carriers: dict[str, dict[str, str]] | None = None,
            all_logits: bool = False) -> Any:
        self.spans.open(seq_ids, carriers, batch_size=len(seq_ids))
        return to_host(self.stage.add(seq_ids, payload, all_logits))

    def step(self, seq_ids: list[str], payload: Any) -> Any:
        self.spans.count_step(seq_ids)
        return to_host(self.stage.step(seq_ids, payload))

    def remove(self, seq_ids: list[str]) -> None:
        self.stage.remove(seq_ids)
        self.spans.close(seq_ids)

    def layers(self) -> tuple[int, int]:
        return self.stage.layers.start, self.stage.layers.stop


def to_host(output: Any) -> Any:
    """A stage's output as it leaves the shard's process: its tensors on the CPU.

    A pickled CUDA tensor is rebuilt on a GPU by whoever unpickles it: the replica, which samples on
    the CPU and holds no GPU, could not, and the next shard moves its input to its own device anyway.
    """
    if isinstance(output, dict):
        return {key: to_host(value) for key, value in output.items()}
    return output.cpu() if isinstance(output, torch.Tensor) else output


class RemoteStage:
    """Proxy with ModelStage's methods that returns object refs instead of waiting."""

    def __init__(self, actor: Any, carriers: RequestCarriers | None = None):
        self.actor = actor
        self.carriers = carriers

    def add(self, seq_ids: list[str], payload: Any, all_logits: bool = False) -> Any:
        carriers = self.carriers.for_sequences(seq_ids) if self.carriers is not None else {}
        return self.actor.add.remote(seq_ids, payload, carriers or None, all_logits)

    def step(self, seq_ids: list[str], payload: Any) -> Any:
        return self.actor.step.remote(seq_ids, payload)

    def remove(self, seq_ids: list[str]) -> Any:
        return self.actor.remove.remote(seq_ids)

    def ping(self) -> Any:
        return self.actor.layers.remote()


def resolve(ref: Any) -> Any:
    return ray.get(ref, timeout=SHARD_CALL_TIMEOUT_S)


def shard_gpus(config: ServeConfig) -> float:
    if config.shards.num_gpus == "auto":
        return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    return float(config.shards.num_gpus)


def placement_bundles(config: ServeConfig, gpus_per_stage: float) -> list[dict[str, float]]:
    """One bundle per stage; bundle 0 also holds the LLMServer replica itself."""
    bundles = []
    for stage in range(config.pipeline_stages):
        bundle = {"CPU": config.shards.num_cpus + (config.llm.num_cpus if stage == 0 else 0.0)}
        if gpus_per_stage:
            bundle["GPU"] = gpus_per_stage
        bundles.append(bundle)
    return bundles


def start_shards(config: ServeConfig, pad_token_id: int) -> list[Any]:
    num_stages = config.pipeline_stages
    split_layers(load_model_config(config.model).num_hidden_layers, num_stages)  # config error before starting actors
    group = get_current_placement_group()
    gpus = shard_gpus(config)
    actors = []
    for stage in range(num_stages):
        options: dict[str, Any] = {"num_cpus": config.shards.num_cpus, "num_gpus": gpus}
        if group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=stage)
        actors.append(ModelShard.options(**options).remote(config.model.model_dump(), stage, num_stages, pad_token_id,
                                                             config.engine.cpu_threads))
    # Wait (bounded) until every shard has loaded its layers.
    ray.get([a.layers.remote() for a in actors], timeout=600)
    return actors


def build_sharded_engine(config: ServeConfig, tokenizer: Any, actors: list[Any] | None = None,
                         carriers: RequestCarriers | None = None) -> TransformersEngine:
    check_sharded_options(config.engine)  # int8 / compile: a config error before any shard starts
    model_config = load_model_config(config.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    actors = actors or start_shards(config, pad_id)
    runner = PipelineRunner([RemoteStage(a, carriers) for a in actors], model_config.vocab_size, resolve=resolve,
                            on_gpu=shard_gpus(config) > 0)
    engine = TransformersEngine(
        None, tokenizer, config.engine, runner=runner, context_tokens=context_length(model_config, tokenizer),
        stop_ids=stop_token_ids(None, tokenizer, load_generation_config(config.model)),
    )
    engine.shards = actors
    return engine
