"""The vLLM engine (`engine: vllm`): vLLM's async engine behind r1's `Engine` protocol.

Importing this module does not import vllm; `VLLMEngine.from_config` does, and only after
`r1.engine.gpu.check_gpu_engine_available` has ruled out a missing GPU or package. vLLM schedules,
batches and samples; r1 encodes prompts (chat template included), decodes the token ids with its
own incremental detokenizer and applies stop strings, so text and finish reasons follow the same
rules as the transformers engine (`r1/engine/gpu.py`).

Options used: `max_num_seqs`, `max_queued_requests` (r1's admission limit), `quantization`
(fp8: weights quantized to FP8 on load, activations scaled dynamically; no calibration data),
`gpu_memory_utilization` (share of the GPU vLLM may take, weights and KV cache together),
`tensor_parallel_size` and `lora_adapters` (vLLM's own multi-LoRA: `enable_lora`, every adapter
resident, `max_lora_rank` the smallest of vLLM's sizes that holds the largest rank; each request
names its adapter with a `LoRARequest`). `max_prefill_tokens`, `cpu_threads`, `prefix_cache_mb`
and the `cuda_*` cache settings are the transformers engine's and do not apply (vLLM's own automatic
prefix caching is on by default).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from r1.config import EngineConfig, ModelConfig
from r1.engine.gpu import AsyncPackageEngine, CheckpointFacts, engine_dtype_name, first_output, read_checkpoint
from r1.engine.types import Request


def vllm_sampling_kwargs(request: Request) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for one request.

    vLLM treats temperature 0 as greedy and top_k -1 as "off" (every release; recent ones also take
    0). Stop strings are left to r1's detokenizer, so vLLM does not detokenize at all. The stop
    token ids are the checkpoint's end-of-sequence ids as r1 reads them (so every engine stops at
    the same tokens; `ignore_eos` drops them) and the request's own `stop_token_ids`.
    """
    sampling = request.sampling
    greedy = sampling.greedy
    # Only when asked for: releases before vLLM 0.7 have no allowed_token_ids/bad_words, before 0.20
    # no thinking_token_budget (SamplingParams refuses fields it does not know).
    masks = {key: value for key, value in (("allowed_token_ids", sampling.allowed_token_ids),
                                           ("bad_words", sampling.bad_words),
                                           ("thinking_token_budget", sampling.thinking_token_budget))
             if value not in (None, [])}
    return {
        **masks,
        "n": 1,
        "max_tokens": request.max_new_tokens,
        "temperature": 0.0 if greedy else sampling.temperature,
        "top_p": 1.0 if greedy else sampling.top_p,
        "top_k": -1 if greedy or sampling.top_k == 0 else sampling.top_k,
        "min_p": 0.0 if greedy else sampling.min_p,
        "min_tokens": sampling.min_tokens,
        "repetition_penalty": sampling.repetition_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "presence_penalty": sampling.presence_penalty,
        "logit_bias": dict(sampling.logit_bias) or None,
        "seed": sampling.seed,
        "ignore_eos": sampling.ignore_eos,
        "stop_token_ids": sorted(request.ending_token_ids()),
        "detokenize": False,
    }


# The values vLLM accepts for max_lora_rank.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_kwargs(engine_config: EngineConfig) -> dict[str, Any]:
    """`AsyncEngineArgs` for `engine.lora_adapters` (none without adapters); ValueError naming an
    adapter r1 does not serve (`r1.engine.lora.check_adapter`) or a rank vLLM has no size for."""
    if not engine_config.lora_adapters:
        return {}
    from r1.engine.lora import check_adapter

    ranks = []
    for name, path in engine_config.lora_adapters.items():
        config = check_adapter(name, path)
        ranks += [int(config.get("r", 8)), *(int(rank) for rank in (config.get("rank_pattern") or {}).values())]
    rank = next((size for size in VLLM_LORA_RANKS if size >= max(ranks)), None)
    if rank is None:
        raise ValueError(f"engine.lora_adapters: rank {max(ranks)} is above vLLM's largest max_lora_rank "
                         f"({VLLM_LORA_RANKS[-1]}); serve the adapter with engine=transformers")
    return {"enable_lora": True, "max_loras": len(engine_config.lora_adapters), "max_lora_rank": rank}


def vllm_lora_request_args(request: Request, engine_config: EngineConfig) -> tuple[str, int, str] | None:
    """`vllm.lora.request.LoRARequest(name, int id, path)` arguments for the request's adapter (None: the base)."""
    if not request.adapter:
        return None
    name, path = list(engine_config.lora_adapters.items())[request.adapter - 1]
    return name, request.adapter, path


def vllm_engine_kwargs(
    facts: CheckpointFacts, model_config: ModelConfig, engine_config: EngineConfig, bf16_supported: bool
) -> dict[str, Any]:
    """Keyword arguments of `vllm.AsyncEngineArgs` for the configured model and engine."""
    return {
        "model": facts.source,
        "tokenizer": facts.source,
        "revision": model_config.revision,
        "trust_remote_code": model_config.trust_remote_code,
        "dtype": engine_dtype_name(model_config.dtype, bf16_supported),
        "quantization": "fp8" if engine_config.quantization == "fp8" else None,
        "tensor_parallel_size": engine_config.tensor_parallel_size,
        "gpu_memory_utilization": engine_config.gpu_memory_utilization,
        "max_num_seqs": engine_config.max_num_seqs,
        "max_model_len": facts.context_tokens,
        "disable_log_stats": True,
        **vllm_lora_kwargs(engine_config),
        # vLLM's own priority queue (requests' priority goes with each generate call).
        **({"scheduling_policy": "priority"} if engine_config.scheduling_policy == "priority" else {}),
    }



class VLLMEngine(AsyncPackageEngine):
    """vLLM's `AsyncLLMEngine` (the v1 `AsyncLLM` in current releases). Satisfies `r1.engine.Engine`."""

    name = "vllm"

    def __init__(self, facts: CheckpointFacts, model_config: ModelConfig, engine_config: EngineConfig):
        super().__init__(facts, engine_config)
        import torch

        engine_kwargs = vllm_engine_kwargs(facts, model_config, engine_config, torch.cuda.is_bf16_supported())
        try:
            # Built on the engine loop: vLLM's async engine binds to the loop it first runs on.
            self._backend = self.call_in_loop(self._build(engine_kwargs))
        except BaseException:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise

    @classmethod
    def from_config(cls, model_config: ModelConfig, engine_config: EngineConfig) -> VLLMEngine:
        return cls(read_checkpoint(model_config), model_config, engine_config)

    @staticmethod
    async def _build(engine_kwargs: dict[str, Any]) -> Any:
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        return AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**engine_kwargs))

    async def _generate(self, request: Request) -> AsyncIterator[tuple[Sequence[int], str | None]]:
        from vllm import SamplingParams

        params = SamplingParams(**vllm_sampling_kwargs(request))
        lora = vllm_lora_request_args(request, self.config)
        extra: dict[str, Any] = {"priority": request.sampling.priority} if request.sampling.priority else {}
        if lora is not None:
            from vllm.lora.request import LoRARequest

            extra["lora_request"] = LoRARequest(*lora)
        outputs = self._backend.generate({"prompt_token_ids": request.prompt_token_ids}, params, request.request_id,
                                         **extra)
        try:
            async for request_output in outputs:
                if request.cached_tokens is None:  # its prompt tokens vLLM's prefix cache held, before the first delta
                    request.cached_tokens = getattr(request_output, "num_cached_tokens", None)
                yield first_output(request_output)
        finally:
            # Closing vLLM's generator before it finished aborts the request inside vLLM.
            await outputs.aclose()

    def _backend_healthy(self) -> bool:
        return not getattr(self._backend, "errored", False)

    def _shutdown_backend(self) -> None:
        shutdown = getattr(self._backend, "shutdown", None) or getattr(self._backend, "shutdown_background_loop", None)
        if shutdown is not None:
            shutdown()
