"""LLMServer: the Serve deployment that owns one engine and streams generations.

Thin by design: it builds an `r1.engine` engine (whole model in-process, or split over
`pipeline_stages` ModelShard actors) and turns its deltas into plain dicts for the ingress. The
first item of every stream is either `{"type": "start", ...}` or `{"type": "error", ...}`, so the
ingress can answer with the right HTTP status before sending any body. The start item also carries
the first delta (its text, token count and finish reason, like the `{"type": "delta", ...}` items
after it): it is sent once the first token is decoded, and one Ray message per stream fewer takes
a hop off every request's first token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

import torch
from ray import serve

from actors import metrics
from actors.tracing import setup_actor_tracing
from r1.config import SamplingConfig, ServeConfig
from r1.engine import Engine, EngineOverloaded, create_engine
from r1.engine.batching import StreamBatcher, stream_window_s
from r1.engine.optimize import packed_linear_count
from r1.model import load_tokenizer
from r1.sequence_spans import RequestCarriers
from r1.telemetry import inject_context, span

logger = logging.getLogger("ray.serve")


def _build_engine(config: ServeConfig, carriers: RequestCarriers) -> Engine:
    if config.pipeline_stages == 1:
        # The configured engine: transformers (with its int8 / compile options) or a GPU engine.
        return create_engine(config.model, config.engine)
    from actors.model_shard import build_sharded_engine

    return build_sharded_engine(config, load_tokenizer(config.model), carriers=carriers)


@serve.deployment(name="LLMServer")
class LLMServer:
    def __init__(self, config: dict[str, Any]):
        setup_actor_tracing("llm")
        self.config = ServeConfig.model_validate(config)
        # Ray set OMP_NUM_THREADS to the replica's whole reserved CPUs (1 for num_cpus < 1);
        # engine.cpu_threads overrides it (see EngineConfig for when more threads hurt).
        if self.config.engine.cpu_threads is not None:
            torch.set_num_threads(self.config.engine.cpu_threads)
        logger.info("LLMServer: the model runs on %d CPU thread(s)", torch.get_num_threads())
        # request id -> trace carrier; the sharded runner sends it along so each shard's span joins the request's trace
        self.carriers = RequestCarriers()
        self.engine = _build_engine(self.config, self.carriers)
        # One-time costs (first kernels of each batch size on a GPU) are paid here, not by the first requests.
        start = time.perf_counter()
        self.engine.warmup()
        self.warmup_s = time.perf_counter() - start
        # Where the model runs decides the r1 engine's warm-up (a pipeline's stages may be on GPUs
        # while this replica is not); the external GPU engines warm up their own way.
        runner = getattr(self.engine, "runner", None)
        kind = "" if runner is None else (" (model on a GPU: every batch size, then a full batch)" if runner.on_gpu
                                          else " (model on the CPU: one short request)")
        logger.info("LLMServer: the engine warmed up in %.2f s%s", self.warmup_s, kind)
        self.engine.start()
        self.think_prefilled = self.engine.think_prefilled
        # Compute utilization relative to the threads the engine runs on (Ray's OMP_NUM_THREADS for the
        # replica's CPUs, or engine.cpu_threads), not the pod's cores: a busy replica reads ~1.
        metrics.start_resource_reporter("llm_server", poll=lambda: metrics.record_engine_load(self.engine.stats()),
                                        cores=torch.get_num_threads())
        self.active_streams = 0  # streams past their first token; they share the message budget

    def _window_s(self) -> float:
        return stream_window_s(self.config.stream_interval_ms, self.active_streams, self.config.stream_messages_per_s)

    def _error(self, status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
        return {"type": "error", "status": status, "message": message, "param": param, "code": code}

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """body: {"request_id", "prompt" (str | token ids | chat messages), "chat" (bool), "sampling" (dict),
        "adapter" (a LoRA adapter's name, optional), "trace" (W3C carrier, optional)}."""
        # attach=False: an async generator must not make its span the caller's current span. The span
        # ends when the stream ends, fails, or is cancelled by the ingress (GeneratorExit / CancelledError).
        with span("llm.generate", body.get("trace"), attach=False, chat=bool(body.get("chat"))) as generate:
            try:
                sampling = SamplingConfig.model_validate(body["sampling"])
                request = self.engine.make_request(body["prompt"], sampling, body.get("request_id"), body.get("adapter"))
            except ValueError as error:
                # A RequestError names the sampling field at fault; any other (the chat template's) is the prompt's.
                field = getattr(error, "field", None)
                param = {"max_new_tokens": "max_tokens", "adapter": "model"}.get(field, field) or ("messages" if body.get("chat") else "prompt")
                status = 404 if field == "adapter" else 400
                generate.set_attribute("http.status_code", status)
                yield self._error(status, str(error).replace("max_new_tokens", "max_tokens"), param=param,
                                  code=getattr(error, "code", "invalid_value"))
                return
            generate.set_attributes({"request_id": request.request_id, "prompt_tokens": len(request.prompt_token_ids),
                                     "max_new_tokens": request.max_new_tokens})
            self.carriers.register(request.request_id, inject_context(generate))
            batcher = None
            try:
                try:
                    # coalesce: tokens that piled up while we were busy come out of the engine as one
                    # delta, so the batcher below awaits once for them, not once per token (measured:
                    # ~100 ms less overhead per 64-token request than the batcher alone).
                    deltas = self.engine.stream(request, coalesce=True)
                    first = await anext(deltas)
                except EngineOverloaded as error:
                    generate.set_attribute("http.status_code", 503)
                    yield self._error(503, str(error), code="overloaded")
                    return
                batcher = StreamBatcher(deltas, self._window_s)
                self.active_streams += 1
                delta = first
                completion_tokens = 0
                while True:
                    completion_tokens += len(delta.token_ids)
                    item = {"type": "delta", "text": delta.text, "num_tokens": len(delta.token_ids), "finish_reason": delta.finish_reason}
                    if delta is first:
                        item.update(type="start", prompt_tokens=len(request.prompt_token_ids),
                                    cached_tokens=request.cached_tokens, think_prefilled=self.think_prefilled)
                        if delta.prompt_logprobs is not None:
                            item["prompt_logprobs"] = [tuple(entry) for entry in delta.prompt_logprobs]
                    if delta.logprobs is not None:  # plain data: (token id, logprob, ((id, logprob), ...), chars) per token
                        item["logprobs"] = [tuple(entry) for entry in delta.logprobs]
                    if delta.usage is not None:
                        item["usage"] = {"prompt_tokens": delta.usage.prompt_tokens, "completion_tokens": delta.usage.completion_tokens}
                    if delta.error:
                        logger.error("generation %s failed: %s", request.request_id, delta.error)
                        item["error"] = "generation failed inside the engine"
                        generate.set_attribute("error.type", "engine")
                    if delta.stop_reason is not None:
                        item["stop_reason"] = delta.stop_reason
                    if delta.finish_reason is not None:
                        generate.set_attributes({"completion_tokens": completion_tokens, "finish_reason": delta.finish_reason})
                    yield item
                    if delta.finish_reason is not None:
                        return
                    delta = await batcher.next()
            finally:
                if batcher is not None:
                    batcher.close()
                    self.active_streams -= 1
                self.carriers.discard(request.request_id)

    def stats(self) -> dict[str, int]:
        # packed_linears: the Linear layers `engine.prepack` put on packed oneDNN weights (0: none, or
        # no local model, as with a sharded or GPU engine). replica: which replica answered (calls
        # through a handle go to whichever Serve picks).
        return {**self.engine.stats(), "cpu_threads": torch.get_num_threads(), "active_streams": self.active_streams,
                "warmup_s": self.warmup_s, "packed_linears": packed_linear_count(getattr(self.engine, "model", None)),
                "replica": serve.get_replica_context().replica_id.unique_id}

    async def check_health(self) -> None:
        # The decode loop, and a sharded engine's model shards: pinging them waits on the shards
        # (behind a step in progress), so off this replica's event loop.
        await asyncio.to_thread(self.engine.check_health)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
