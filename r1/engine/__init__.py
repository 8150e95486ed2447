"""The r1 engine: continuous-batching generation behind one small interface.

`Engine` is the protocol the Serve deployment, the CLI and training rollouts program against.
`TransformersEngine` (default, CPU and GPU) implements it here; GPU engines (TensorRT-LLM, vLLM)
are imported only when selected, through `create_engine`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol, runtime_checkable

from r1.config import EngineConfig, ModelConfig, SamplingConfig
from r1.engine.engine import Prompt, TransformersEngine, resolve_max_new_tokens
from r1.engine.scheduler import EngineOverloaded
from r1.engine.types import Completion, Delta, FinishReason, Request, RequestError, Usage


@runtime_checkable
class Engine(Protocol):
    name: str
    tokenizer: Any
    context_tokens: int

    def make_request(self, prompt: Prompt, sampling: SamplingConfig, request_id: str | None = None,
                     adapter: str | None = None) -> Request:
        """`adapter`: a LoRA adapter's name (`engine.lora_adapters`); None: the base model."""

    # True when the chat template pre-fills "<think>\n" (the reasoning split must know).
    think_prefilled: bool

    def start(self) -> None:
        """Start the background decode loop that `stream` needs (idempotent)."""

    @property
    def alive(self) -> bool:
        """The decode loop is running (the Serve health check)."""

    def stream(
        self, prompt: Prompt | Request, sampling: SamplingConfig | None = None, request_id: str | None = None,
        coalesce: bool = False,
    ) -> AsyncIterator[Delta]:
        """Deltas of one request; `coalesce`: deltas that piled up while the consumer was busy come as one."""

    def abort(self, request_id: str) -> None: ...

    def generate_batch(
        self, prompts: Sequence[Prompt], sampling: SamplingConfig | Sequence[SamplingConfig] | None = None
    ) -> list[Completion]: ...

    def stats(self) -> dict[str, int]:
        """{"running": requests decoding, "waiting": requests queued, "aborted": requests ended with
        `abort` so far (aborted by their caller, failed or shut down)}."""

    def check_health(self) -> None:
        """Raise unless the engine can serve (the Serve health check; it may block briefly)."""

    def warmup(self) -> None:
        """Pay one-time costs (first kernels, allocations) before the first real request."""

    def shutdown(self) -> None: ...


def create_engine(model_config: ModelConfig, engine_config: EngineConfig | None = None) -> Engine:
    """Build the configured engine; GPU engines are imported only here, only when selected."""
    engine_config = engine_config or EngineConfig()
    if engine_config.engine == "transformers":
        return TransformersEngine.from_config(model_config, engine_config)
    from r1.engine.gpu import create_gpu_engine

    return create_gpu_engine(model_config, engine_config)


__all__ = [
    "Completion",
    "Delta",
    "Engine",
    "EngineOverloaded",
    "FinishReason",
    "Prompt",
    "Request",
    "RequestError",
    "TransformersEngine",
    "Usage",
    "create_engine",
    "resolve_max_new_tokens",
]
