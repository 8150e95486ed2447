"""The TensorRT-LLM engine (`engine: trtllm`): TensorRT-LLM's LLM API behind r1's `Engine` protocol.

Importing this module does not import tensorrt_llm; `TensorRTLLMEngine.from_config` does, and only
after `r1.engine.gpu.check_gpu_engine_available` has ruled out a missing GPU or package. Requests
go through `LLM.generate_async(..., streaming=True)`; r1 encodes prompts, decodes the token ids
with its own incremental detokenizer and applies stop strings (TensorRT-LLM would match stop
strings as token sequences, which misses a string that ends inside a token).

Quantization (`quantization: fp8`): a checkpoint that is already FP8 (ModelOpt's
`hf_quant_config.json` beside `config.json`) runs on the default LLM as it is. Any other
checkpoint is quantized when the engine is built: `QuantConfig(quant_algo=QuantAlgo.FP8)` on
TensorRT-LLM's engine-building LLM, which needs the `nvidia-modelopt` package and calibrates the
activation scales on r1's built-in text corpus (written to a temporary directory; nothing is
downloaded). Building takes minutes for a large model.

Options used: `max_num_seqs` (max_batch_size), `max_queued_requests` (r1's admission limit),
`gpu_memory_utilization` (TensorRT-LLM's `free_gpu_memory_fraction`: the share of the memory left
after loading the weights that the KV cache takes) and `tensor_parallel_size`.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from r1.config import EngineConfig, ModelConfig, SamplingConfig
from r1.engine.engine import Prompt
from r1.engine.gpu import AsyncPackageEngine, CheckpointFacts, engine_dtype_name, first_output, read_checkpoint
from r1.engine.types import Request, RequestError

# Calibration batches for FP8 scales: enough for stable per-tensor maxima, quick for small models.
FP8_CALIBRATION_BATCHES = 256
FP8_CALIBRATION_MAX_SEQ_LENGTH = 512


def trtllm_sampling_kwargs(request: Request, fallback_seed: int) -> dict[str, Any]:
    """Keyword arguments of `tensorrt_llm.SamplingParams` for one request.

    Greedy is top_k=1 (TensorRT-LLM has no temperature-0 convention); top_k None means "off".
    TensorRT-LLM seeds every unseeded request with the same default seed, which would make all
    samples of a prompt identical (GRPO groups would carry no signal), so an unseeded request
    gets `fallback_seed`, which the caller draws at random per request.
    """
    sampling = request.sampling
    kwargs: dict[str, Any] = {
        "n": 1,
        "max_tokens": request.max_new_tokens,
        "ignore_eos": sampling.ignore_eos,
        "stop_token_ids": sorted(request.ending_token_ids()) or None,
        "min_tokens": sampling.min_tokens or None,
        "repetition_penalty": None if sampling.repetition_penalty == 1.0 else sampling.repetition_penalty,
        "frequency_penalty": sampling.frequency_penalty or None,
        "presence_penalty": sampling.presence_penalty or None,
        "detokenize": False,
    }
    if sampling.greedy:
        kwargs.update(top_k=1, top_p=None, temperature=None, seed=None)
    else:
        kwargs.update(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k or None,
            min_p=sampling.min_p or None,
            seed=sampling.seed if sampling.seed is not None else fallback_seed,
        )
    return kwargs


def fp8_plan(quantization: str, checkpoint_dir: str) -> str:
    """How the engine gets FP8 weights: "none", "checkpoint" (already quantized) or "build"."""
    if quantization != "fp8":
        return "none"
    if (Path(checkpoint_dir) / "hf_quant_config.json").exists():
        return "checkpoint"
    return "build"


def trtllm_llm_kwargs(
    facts: CheckpointFacts, model_config: ModelConfig, engine_config: EngineConfig, bf16_supported: bool
) -> dict[str, Any]:
    """Keyword arguments of `tensorrt_llm.LLM` shared by both ways of building it (no config objects)."""
    kwargs = {
        "model": facts.source,
        "tokenizer": facts.source,
        "trust_remote_code": model_config.trust_remote_code,
        "dtype": engine_dtype_name(model_config.dtype, bf16_supported),
        "tensor_parallel_size": engine_config.tensor_parallel_size,
        "max_batch_size": engine_config.max_num_seqs,
        "max_seq_len": facts.context_tokens,
    }
    if model_config.revision is not None:
        kwargs["revision"] = model_config.revision
    return kwargs


def write_calibration_dataset(directory: Path, texts: list[str]) -> Path:
    """A local dataset TensorRT-LLM's calibration loads offline: `train.jsonl` with a "text" column."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "train.jsonl", "w", encoding="utf-8") as out:
        for text in texts:
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return directory



class TensorRTLLMEngine(AsyncPackageEngine):
    """TensorRT-LLM's `LLM` (PyTorch backend; TensorRT engine build for on-the-fly FP8). Satisfies `r1.engine.Engine`."""

    name = "trtllm"

    def __init__(self, facts: CheckpointFacts, model_config: ModelConfig, engine_config: EngineConfig):
        super().__init__(facts, engine_config)
        self._calibration_dir: Path | None = None
        try:
            self._llm = self._build_llm(facts, model_config, engine_config)
        except BaseException:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._remove_calibration_dir()
            raise

    @classmethod
    def from_config(cls, model_config: ModelConfig, engine_config: EngineConfig) -> TensorRTLLMEngine:
        return cls(read_checkpoint(model_config), model_config, engine_config)

    def make_request(self, prompt: Prompt, sampling: SamplingConfig, request_id: str | None = None,
                     adapter: str | None = None) -> Request:
        for field, value in (("logit_bias", sampling.logit_bias), ("allowed_token_ids", sampling.allowed_token_ids),
                             ("bad_words", sampling.bad_words), ("thinking_token_budget", sampling.thinking_token_budget)):
            if value not in (None, {}, []):
                raise RequestError(f"{field} is not supported with engine.name: trtllm; use the transformers or vllm "
                                   "engine", field, "unsupported")
        return super().make_request(prompt, sampling, request_id, adapter)

    def _build_llm(self, facts: CheckpointFacts, model_config: ModelConfig, engine_config: EngineConfig) -> Any:
        import torch
        from tensorrt_llm.llmapi import KvCacheConfig

        kwargs = trtllm_llm_kwargs(facts, model_config, engine_config, torch.cuda.is_bf16_supported())
        kwargs["kv_cache_config"] = KvCacheConfig(free_gpu_memory_fraction=engine_config.gpu_memory_utilization)
        if fp8_plan(engine_config.quantization, facts.source) != "build":
            from tensorrt_llm import LLM

            return LLM(**kwargs)
        from tensorrt_llm.llmapi import CalibConfig, QuantAlgo, QuantConfig

        from r1.model.tiny import training_corpus

        self._calibration_dir = write_calibration_dataset(Path(tempfile.mkdtemp(prefix="r1-fp8-calib-")), training_corpus())
        kwargs["quant_config"] = QuantConfig(quant_algo=QuantAlgo.FP8)
        kwargs["calib_config"] = CalibConfig(
            calib_dataset=str(self._calibration_dir),
            calib_batches=FP8_CALIBRATION_BATCHES,
            calib_max_seq_length=min(FP8_CALIBRATION_MAX_SEQ_LENGTH, facts.context_tokens),
        )
        return _engine_building_llm_class()(**kwargs)

    async def _generate(self, request: Request) -> AsyncIterator[tuple[Sequence[int], str | None]]:
        from tensorrt_llm import SamplingParams

        params = SamplingParams(**trtllm_sampling_kwargs(request, fallback_seed=random.getrandbits(63)))
        # Called on the engine loop: the result binds its queue to the running loop.
        result = self._llm.generate_async({"prompt_token_ids": request.prompt_token_ids}, params, streaming=True)
        try:
            async for output in result:
                yield first_output(output)
        finally:
            if not result.finished:
                result.abort()

    def _shutdown_backend(self) -> None:
        try:
            self._llm.shutdown()
        finally:
            self._remove_calibration_dir()

    def _remove_calibration_dir(self) -> None:
        if self._calibration_dir is not None:
            shutil.rmtree(self._calibration_dir, ignore_errors=True)
            self._calibration_dir = None


def _engine_building_llm_class() -> Any:
    """The LLM class that builds a TensorRT engine (and so can quantize while building)."""
    try:
        from tensorrt_llm._tensorrt_engine import LLM  # 1.x: the default LLM is the PyTorch backend
    except ImportError:
        from tensorrt_llm import LLM  # 0.x: the default LLM builds TensorRT engines
    return LLM
