"""GPU-only engines (TensorRT-LLM, vLLM), imported only when selected.

Selecting one on a machine without a CUDA GPU, or without the engine's package installed, is an
error that names the option and the fix; r1-cluster never falls back to another engine silently.
"""

from __future__ import annotations

import importlib.util

import torch

from r1.config import EngineConfig, ModelConfig

_PACKAGES = {"trtllm": ("tensorrt_llm", "pip install 'r1-cluster[tensorrt]'"), "vllm": ("vllm", "pip install 'r1-cluster[vllm]'")}


def check_gpu_engine_available(engine: str) -> None:
    module, install = _PACKAGES[engine]
    if not torch.cuda.is_available():
        raise ValueError(f"engine={engine} needs a CUDA GPU and none is available; use engine=transformers")
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"engine={engine} needs the {module} package, which is not installed; {install}")


def create_gpu_engine(model_config: ModelConfig, engine_config: EngineConfig):
    check_gpu_engine_available(engine_config.engine)
    raise ValueError(f"engine={engine_config.engine} is not implemented yet in this release; use engine=transformers")
