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

from actors.code_validator import build_code_validator
from actors.llm_server import LLMServer
from actors.safety import build_safety_filter
from cluster.serve.ingress import OpenAIIngress
from r1.config import ServeConfig, parse_config


def check_pipeline_stages(config: ServeConfig) -> None:
    if config.pipeline_stages == 1:
        return
    from r1.engine.pipeline import split_layers
    from r1.model import load_model_config

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
    llm = LLMServer.options(**llm_options).bind(config_dict)
    validator = build_code_validator(config.code_validator) if config.code_validator is not None else None
    safety = build_safety_filter(config.safety) if config.safety is not None else None
    return OpenAIIngress.options(**config.ingress.serve_options()).bind(llm, validator, safety, config_dict)
