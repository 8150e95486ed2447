"""GPU-only engines (vLLM, TensorRT-LLM): selection, clear errors, and what both adapters share.

`create_gpu_engine` is reached only through `r1.engine.create_engine` when `engine: vllm | trtllm`
is configured; the engine's package is imported only then (`r1/engine/vllm_engine.py`,
`r1/engine/trtllm_engine.py`). Selecting one on a machine without a CUDA GPU or without the
package, or with an option the engine cannot honour (int8, compile, prepack), is a `ValueError` that names
the option and the fix; r1-cluster never falls back to another engine silently.

Both adapters hand token ids to r1's own incremental detokenizer (`r1/engine/detok.py`), so text,
stop strings and finish reasons follow the same rules as the transformers engine: a delta's text
never ends inside a character or a possible stop string, and a stop string ends the request with
`finish_reason="stop"`. The pure parts (checks, dtype and finish-reason mapping, turning an
engine's cumulative output into deltas) are plain functions tested on CPU; the adapters around
them need the package and a GPU and are exercised by `bench/gpu_check.sh`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from r1.config import EngineConfig, ModelConfig, SamplingConfig
from r1.engine.detok import IncrementalDetokenizer
from r1.engine.structured import constraint_field, constraint_of
from r1.engine.lora import adapter_index, adapter_indices
from r1.engine.engine import (
    BatchResults,
    Mailboxes,
    Prompt,
    chat_template_prefills_think,
    encode_prompt,
    new_request,
    per_prompt_sampling,
    stop_token_ids,
)
from r1.engine.scheduler import EngineOverloaded
from r1.engine.types import Completion, Delta, FinishReason, Request, RequestError, Usage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuEngineSpec:
    title: str  # how the engine is called in messages
    module: str  # the package imported when the engine is selected
    extra: str  # r1-cluster's pip extra that installs it


GPU_ENGINES = {
    "vllm": GpuEngineSpec("vLLM", "vllm", "vllm"),
    "trtllm": GpuEngineSpec("TensorRT-LLM", "tensorrt_llm", "tensorrt"),
}


def package_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def gpu_engine_problem(
    engine_config: EngineConfig, model_config: ModelConfig, *, cuda_available: bool, package_available: bool
) -> str | None:
    """Why the configured GPU engine cannot run here (a message naming option and fix), or None.

    Configuration mistakes come first, so a wrong setting is reported the same on every machine.
    """
    engine = engine_config.engine
    spec = GPU_ENGINES[engine]
    if engine_config.quantization == "int8":
        return (
            f"quantization=int8 is the transformers engine's CPU quantization; engine={engine} supports "
            "quantization=fp8 or none. Use quantization=fp8 on the GPU, or engine=transformers for int8"
        )
    if engine_config.compile or engine_config.prepack is True:
        option = "compile" if engine_config.compile else "prepack"
        return (
            f"{option}=true applies to engine=transformers only ({spec.title} brings its own kernels); "
            f"set {option}=false"
        )
    if model_config.device == "cpu":
        return f"engine={engine} runs on a CUDA GPU but device=cpu is configured; use engine=transformers on CPU"
    if not cuda_available:
        return f"engine={engine} needs a CUDA GPU and none is available; use engine=transformers"
    if not package_available:
        return (
            f"engine={engine} needs the {spec.module} package ({spec.title}), which is not installed; "
            f"pip install 'r1-cluster[{spec.extra}]' in the environment that runs the engine"
        )
    return None


def check_gpu_engine_available(engine_config: EngineConfig, model_config: ModelConfig | None = None) -> None:
    """Raise the `gpu_engine_problem` for this machine, if any."""
    problem = gpu_engine_problem(
        engine_config,
        model_config or ModelConfig(),
        cuda_available=torch.cuda.is_available(),
        package_available=package_installed(GPU_ENGINES[engine_config.engine].module),
    )
    if problem:
        raise ValueError(problem)


def create_gpu_engine(model_config: ModelConfig, engine_config: EngineConfig):
    """Build the configured GPU engine; its package is imported here and nowhere earlier."""
    check_gpu_engine_available(engine_config, model_config)
    if engine_config.engine == "vllm":
        from r1.engine.vllm_engine import VLLMEngine

        return VLLMEngine.from_config(model_config, engine_config)
    from r1.engine.trtllm_engine import TensorRTLLMEngine

    return TensorRTLLMEngine.from_config(model_config, engine_config)


# -- pure mapping shared by both adapters -------------------------------------------------------


def engine_dtype_name(dtype: str, bf16_supported: bool) -> str:
    """The dtype name vLLM and TensorRT-LLM take for a `ModelConfig.dtype`.

    "auto" resolves as the transformers engine resolves it on CUDA (bf16 where supported, else
    fp16), not as the packages would (from the checkpoint, which is fp32 for r1-tiny), so all
    engines run the same precision unless told otherwise.
    """
    if dtype == "auto":
        return "bfloat16" if bf16_supported else "float16"
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]


# Finish reasons the packages report -> ours (plus an error text where the request did not end
# normally). vLLM: stop | length | abort (| error in recent releases); TensorRT-LLM: stop | length |
# timeout | cancelled.
_FINISH_REASONS: dict[str, tuple[FinishReason, str | None]] = {
    "stop": ("stop", None),
    "length": ("length", None),
    "abort": ("abort", None),
    "cancelled": ("abort", None),
    "timeout": ("abort", "the engine timed the request out"),
    "error": ("abort", "the engine reported an error for this request"),
}


def map_finish_reason(raw: str) -> tuple[FinishReason, str | None]:
    """(our finish reason, error or None) for a finished request's reason as the package gives it."""
    if raw in _FINISH_REASONS:
        return _FINISH_REASONS[raw]
    return "abort", f"the engine ended the request with an unknown finish reason {raw!r}"


def inflight_stats(num_in_flight: int, max_num_seqs: int, num_aborted: int = 0) -> dict[str, int]:
    """`Engine.stats()` for an engine that batches at most `max_num_seqs` requests at once.

    The packages keep their own queues; the split into running and waiting follows from the
    configured batch limit, which both honour. `aborted`: requests ended with `abort` so far.
    """
    running = min(num_in_flight, max_num_seqs)
    return {"running": running, "waiting": num_in_flight - running, "aborted": num_aborted}


class TokenStream:
    """Turns one request's cumulative output token ids, as an engine reports them, into deltas.

    Same rules as the transformers engine's scheduler: a stop token ends the request with
    "stop" (the token is counted, its text is not shown); a stop string ends it with "stop" at
    the token that completed it, text cut before the string; `max_new_tokens` ends it with
    "length". Tokens the engine produced past such an end are dropped; the caller then aborts
    the request in the engine.
    """

    def __init__(self, request: Request, tokenizer: Any):
        self.request = request
        self.detok = IncrementalDetokenizer(tokenizer, request.sampling.stop, request.sampling.min_tokens,
                                            request.sampling.include_stop_str_in_output)
        self.output_ids: list[int] = []
        self.num_seen = 0  # engine output tokens already consumed
        self.finished = False

    def update(self, cumulative_ids: Sequence[int], engine_finish: str | None) -> Delta | None:
        """The delta for tokens new since the last update (None when there is nothing to report).

        `engine_finish` is the package's finish reason once the request finished there, else None.
        """
        if self.finished:
            return None
        new_ids = list(cumulative_ids[self.num_seen :])
        self.num_seen = max(self.num_seen, len(cumulative_ids))
        token_ids: list[int] = []
        texts: list[str] = []
        reason: FinishReason | None = None
        stop_reason = None
        for token in new_ids:
            self.output_ids.append(token)
            token_ids.append(token)
            stop = self.request.stop_kind(token)
            if stop == "eos":
                reason = "stop"
                break
            texts.append(self.detok.add(token))
            if stop or self.detok.stopped:
                reason = "stop"
                stop_reason = self.request.stop_reason(token, self.detok)
            elif len(self.output_ids) >= self.request.max_new_tokens:
                reason = "length"
            if reason is not None:
                break
        error = None
        if reason is None and engine_finish is not None:
            reason, error = map_finish_reason(engine_finish)
        if reason is None:
            return Delta(self.request.request_id, token_ids, "".join(texts)) if token_ids else None
        return self.finish(reason, error, token_ids, "".join(texts), stop_reason)

    def finish(
        self, reason: FinishReason, error: str | None = None, token_ids: list[int] | None = None, text: str = "",
        stop_reason: str | int | None = None,
    ) -> Delta:
        """The last delta of the request (flushes text held back for stop strings)."""
        self.finished = True
        if error is None:
            text += self.detok.finish()
        usage = Usage(len(self.request.prompt_token_ids), len(self.output_ids))
        return Delta(self.request.request_id, token_ids or [], text, finish_reason=reason, usage=usage, error=error,
                     stop_reason=stop_reason)


# -- loading what every adapter needs from the checkpoint -----------------------------------------


@dataclass
class CheckpointFacts:
    """What r1 reads from a checkpoint itself: the adapters encode prompts and decode text here."""

    source: str  # local directory or hub id, as the package should load it
    tokenizer: Any
    context_tokens: int
    vocab_size: int
    stop_ids: frozenset[int]


def read_checkpoint(model_config: ModelConfig) -> CheckpointFacts:
    from r1.model import context_length, load_generation_config, load_model_config, load_tokenizer, resolve_source

    source, _ = resolve_source(model_config.model)
    tokenizer = load_tokenizer(model_config)
    hf_config = load_model_config(model_config)
    return CheckpointFacts(
        source=source,
        tokenizer=tokenizer,
        context_tokens=context_length(hf_config, tokenizer),
        vocab_size=int(hf_config.vocab_size),
        stop_ids=stop_token_ids(None, tokenizer, load_generation_config(model_config)),
    )


# -- the adapter base: an asyncio package engine behind r1's Engine protocol ----------------------


@dataclass
class _Job:
    request: Request
    emit: Any  # Callable[[Delta], None], called on the engine loop's thread
    finished: bool = False


def first_output(result: Any) -> tuple[Sequence[int], str | None]:
    """(cumulative token ids, finish reason once finished) of a vLLM or TensorRT-LLM request output
    with n=1 (both packages shape it the same way: `outputs[0].token_ids`, `finished`)."""
    completion = result.outputs[0]
    if not result.finished:
        return completion.token_ids, None
    return completion.token_ids, completion.finish_reason or "unknown"


class AsyncPackageEngine:
    """Runs a package's asyncio engine on a private event loop thread, behind `r1.engine.Engine`.

    The packages' async engines bind to the event loop they first run on, while r1's callers come
    from many places: a Serve replica's loop, `asyncio.run` in the CLI, plain threads in training.
    So every call into the package happens on one loop owned here; `stream` hands deltas to the
    caller's loop (batched, one wakeup per drain), and `generate_batch` blocks the calling thread.

    Subclasses implement `_generate(request)`, an async iterator of (cumulative output token ids,
    package finish reason or None) that aborts the package's request when closed early, and
    `_shutdown_backend()`.
    """

    name = "gpu"

    def __init__(self, facts: CheckpointFacts, config: EngineConfig):
        self.tokenizer = facts.tokenizer
        self.context_tokens = facts.context_tokens
        self.vocab_size = facts.vocab_size
        self.stop_token_ids = facts.stop_ids
        self.config = config
        # LoRA adapter name -> index (1, 2, ...: the order of engine.lora_adapters; 0 is the base model)
        self.adapters = adapter_indices(config.lora_adapters)
        self._lock = threading.Lock()
        self._num_in_flight = 0
        self._num_aborted = 0
        self._jobs: dict[str, asyncio.Task] = {}  # engine loop only
        self._mailboxes = Mailboxes()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"r1-{self.name}-loop", daemon=True)
        self._thread.start()

    # -- inputs (the same rules as TransformersEngine) ------------------------------------------
    def encode_prompt(self, prompt: Prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.vocab_size)

    def make_request(self, prompt: Prompt, sampling: SamplingConfig, request_id: str | None = None,
                     adapter: str | None = None) -> Request:
        # Adapters of engine.lora_adapters (vLLM; the config refuses them for the others).
        index = adapter_index(self.adapters, adapter)
        if sampling.logprobs is not None or sampling.prompt_logprobs is not None:
            raise RequestError(f"logprobs is not supported with engine.name: {self.name}; use the transformers engine",
                               "logprobs", "unsupported")
        constraint = constraint_of(sampling)
        if constraint is not None:
            field = constraint_field(constraint[0])
            raise RequestError(f"structured output ({field}) is not supported with engine.name: {self.name}; use the "
                               "transformers engine", field, "unsupported")
        request = new_request(self.tokenizer, prompt, sampling, request_id, vocab_size=self.vocab_size,
                              context_tokens=self.context_tokens, stop_ids=self.stop_token_ids,
                              scheduling_policy=self.config.scheduling_policy)
        request.adapter = index
        request.cached_tokens = None  # unless the package says (vLLM's num_cached_tokens)
        return request

    @property
    def think_prefilled(self) -> bool:
        return chat_template_prefills_think(self.tokenizer)

    # -- the package side (subclasses) ---------------------------------------------------------
    def _generate(self, request: Request) -> AsyncIterator[tuple[Sequence[int], str | None]]:
        raise NotImplementedError

    def _shutdown_backend(self) -> None:
        raise NotImplementedError

    def _backend_healthy(self) -> bool:
        return True

    # -- running requests on the engine loop ---------------------------------------------------
    def call_in_loop(self, coro: Any, timeout_s: float | None = None) -> Any:
        """Run a coroutine on the engine loop from another thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def submit(self, request: Request, emit: Any) -> None:
        """Start a request; `emit(delta)` is called on the engine loop's thread. Raises EngineOverloaded."""
        if self._closed:
            raise RuntimeError(f"the {self.name} engine was shut down")
        limit = self.config.max_num_seqs + self.config.max_queued_requests
        with self._lock:
            if self._num_in_flight >= limit:
                raise EngineOverloaded(f"the engine queue is full ({self._num_in_flight} requests in flight); retry later")
            self._num_in_flight += 1
        self._loop.call_soon_threadsafe(self._start, _Job(request, emit))

    def _start(self, job: _Job) -> None:
        task = self._loop.create_task(self._run(job))
        self._jobs[job.request.request_id] = task
        task.add_done_callback(lambda finished_task: self._done(job, finished_task))

    def _done(self, job: _Job, task: asyncio.Task) -> None:
        """Every job ends here, even one cancelled before it ran: its stream always gets a last delta."""
        if self._jobs.get(job.request.request_id) is task:
            del self._jobs[job.request.request_id]
        if not job.finished:
            self._emit(job, TokenStream(job.request, self.tokenizer).finish("abort"))

    def _emit(self, job: _Job, delta: Delta) -> None:
        if delta.finish_reason is not None and not job.finished:
            # Counted out before the caller sees the last delta, so stats() never lags behind it.
            job.finished = True
            with self._lock:
                self._num_in_flight -= 1
                self._num_aborted += delta.finish_reason == "abort"
        try:
            job.emit(delta)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass

    async def _run(self, job: _Job) -> None:
        stream = TokenStream(job.request, self.tokenizer)
        updates = self._generate(job.request)
        try:
            async for cumulative_ids, engine_finish in updates:
                delta = stream.update(cumulative_ids, engine_finish)
                if delta is not None:
                    self._emit(job, delta)
                if stream.finished:
                    break
            if not stream.finished:
                self._emit(job, stream.finish("abort", "the engine's output ended before the request finished"))
        except asyncio.CancelledError:
            if not stream.finished:
                self._emit(job, stream.finish("abort"))
            raise
        except Exception as error:  # a package failure must end the stream, never hang it
            logger.exception("%s engine: request %s failed", self.name, job.request.request_id)
            if not stream.finished:
                self._emit(job, stream.finish("abort", f"{type(error).__name__}: {error}"))
        finally:
            await updates.aclose()  # aborts the package's request when it is still running

    def abort(self, request_id: str) -> None:
        if not self._closed:
            self._loop.call_soon_threadsafe(self._cancel, request_id)

    def _cancel(self, request_id: str) -> None:
        task = self._jobs.get(request_id)
        if task is not None:
            task.cancel()

    # -- streaming API -------------------------------------------------------------------------
    def start(self) -> None:
        """Nothing to start: the engine loop runs from construction (kept for the LLM server)."""

    def stream(
        self, prompt: Prompt | Request, sampling: SamplingConfig | None = None, request_id: str | None = None,
        coalesce: bool = False,
    ) -> AsyncIterator[Delta]:
        """Stream deltas for one request; leaving the loop early aborts the request (see
        `TransformersEngine.stream`)."""
        request = prompt if isinstance(prompt, Request) else self.make_request(prompt, sampling or SamplingConfig(), request_id)
        return self._mailboxes.stream(request, self.submit, self.abort, coalesce)

    # -- blocking API ----------------------------------------------------------------------------
    def generate_batch(
        self, prompts: Sequence[Prompt], sampling: SamplingConfig | Sequence[SamplingConfig] | None = None
    ) -> list[Completion]:
        """Generate for many prompts at once; blocks the calling thread until all finish."""
        requests = [self.make_request(p, s) for p, s in zip(prompts, per_prompt_sampling(prompts, sampling))]
        batch = BatchResults(requests)
        collect = batch.collect

        for request in requests:
            while True:
                try:
                    self.submit(request, collect)
                    break
                except EngineOverloaded:
                    threading.Event().wait(0.01)
        return batch.wait()

    def warmup(self) -> None:
        """Run one short request so the first real one does not pay one-time costs."""
        self.generate_batch([[0]], SamplingConfig(temperature=0, max_new_tokens=2))

    # -- health and lifecycle --------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        with self._lock:
            return inflight_stats(self._num_in_flight, self.config.max_num_seqs, self._num_aborted)

    @property
    def alive(self) -> bool:
        """False once the engine loop died or the package reports its engine dead."""
        return self._closed or (self._thread.is_alive() and self._backend_healthy())

    def check_health(self) -> None:
        if not self.alive:
            raise RuntimeError(f"the {self.name} engine's loop or the package's engine is not running")

    def shutdown(self) -> None:
        """Abort what is in flight, shut the package's engine down, stop the loop. Idempotent."""
        if self._closed:
            return
        self._closed = True

        async def cancel_all() -> None:
            tasks = list(self._jobs.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.call_in_loop(cancel_all(), timeout_s=30)
        except Exception:  # shutting down anyway
            logger.exception("%s engine: cancelling in-flight requests failed", self.name)
        try:
            self._shutdown_backend()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
