"""The Serve application: `build_app(args)` for `serve run` / `serve deploy` and `r1 serve`.

    OpenAIIngress (FastAPI, autoscaling) ──> LLMServer (autoscaling) ──> ModelShard actors (N > 1)
                                         ├─> SafetyFilter (input before the model, output while streaming)
                                         ├─> CodeValidator (sandbox workers; `code_validation: true`)
                                         └─> SessionStore actors (partitioned, durable)

`args` is the `applications[].args` mapping of `ray_configs/serve.yaml`; its keys map 1:1 onto
`r1.config.ServeConfig`.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from actors.code_validator import build_code_validator
from actors.llm_server import LLMServer
from actors.safety import build_safety_filter
from cluster.serve.ingress import OpenAIIngress
from cluster.serve.routing import ROUTER_CLASS
from r1.config import ServeConfig, parse_config


def check_pipeline_stages(config: ServeConfig) -> None:
    """Sharding settings that cannot work, refused when the app is built (not when a replica starts)."""
    if config.pipeline_stages == 1:
        return
    from r1.engine.optimize import check_sharded_options
    from r1.engine.pipeline import split_layers
    from r1.model import load_model_config

    check_sharded_options(config.engine)
    split_layers(load_model_config(config.model).num_hidden_layers, config.pipeline_stages)


def build_app(args: dict[str, Any] | ServeConfig | None = None) -> Application:
    config = args if isinstance(args, ServeConfig) else parse_config(ServeConfig, args or {}, source="serve application args")
    check_pipeline_stages(config)
    config_dict = config.model_dump()
    llm_options = config.llm.serve_options()
    if config.pipeline_stages > 1:
        from actors.model_shard import placement_bundles, shard_gpus

        # One placement group per replica: bundle i holds stage i (bundle 0 the replica too).
        llm_options["placement_group_bundles"] = placement_bundles(config, shard_gpus(config))
        llm_options["placement_group_strategy"] = "PACK"
    if config.llm_routing == "prefix_affinity":
        llm_options["request_router_config"] = RequestRouterConfig(
            request_router_class=ROUTER_CLASS, request_router_kwargs={"imbalance_threshold": config.llm_routing_imbalance})
    llm = LLMServer.options(**llm_options).bind(config_dict)
    validator = build_code_validator(config.code_validator) if config.code_validator is not None else None
    safety = build_safety_filter(config.safety) if config.safety is not None else None
    ingress_options = config.ingress.serve_options()
    if config.ingress_single_loop:
        ingress_options["ray_actor_options"] = with_env_vars(ingress_options["ray_actor_options"], SINGLE_LOOP_ENV_VARS)
    return OpenAIIngress.options(**ingress_options).bind(llm, validator, safety, config_dict)


# Ray Serve reads these when a replica process starts; Serve merges a deployment's env_vars with
# the application's and the job's, so only the ingress replicas get them.
SINGLE_LOOP_ENV_VARS = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def with_env_vars(actor_options: dict[str, Any], env_vars: dict[str, str]) -> dict[str, Any]:
    """`actor_options` (not modified) with `env_vars` added to its runtime_env."""
    runtime_env = dict(actor_options.get("runtime_env") or {})
    runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), **env_vars}
    return {**actor_options, "runtime_env": runtime_env}
