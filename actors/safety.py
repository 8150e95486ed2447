"""SafetyFilter: the Serve deployment that screens request input and streamed output.

Thin by design: each replica builds one `r1.safety.SafetyFilter` from a `SafetyConfig` and
answers `check` (a whole text) and `stream_feed` / `stream_flush` (one step of an output stream).

Why streams are stateless here. The hold-back buffer of a stream lives for one request, but an
autoscaling deployment gives no replica affinity: consecutive calls of one request may reach
different replicas, and a replica may be replaced mid-stream. So no stream lives in a replica.
Each step takes the stream's state as plain data (`SafetyStream.to_state()`) and returns the new
state with the text that is safe to emit; the caller keeps the state for the request's lifetime,
in memory only. Any replica can serve any step, and fail-closed stays simple: if a step fails or
times out, the caller has emitted only what earlier steps returned — screened text — and fails
the request. The state holds unscreened text (the held-back tail): never log or store it.

`SafetyClient` is the caller's side (the ingress): every call has a deadline (`timeout_s`), and
any error or timeout becomes `SafetyUnavailable`, which the ingress turns into a 503. Its messages
name the failure, never the text.

Metrics: each replica counts findings by rule id and direction (`r1_safety_findings_total`);
matched text never reaches logs, traces or metric labels.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from actors.metrics import record_safety_findings, start_resource_reporter
from actors.tracing import setup_actor_tracing
from r1.config import SafetyConfig, parse_config
from r1.safety import SafetyFilter
from r1.telemetry import inject_context, span

_DEFAULTS = SafetyConfig().deployment.serve_options()
# A canary the health check screens: a Luhn-valid test card number must not pass unscreened.
_CANARY = "卡号 4111 1111 1111 1111"


@serve.deployment(name="SafetyFilter", **_DEFAULTS)
class SafetyFilterDeployment:
    def __init__(self, config: dict[str, Any] | None = None) -> None:
        setup_actor_tracing("safety")
        start_resource_reporter("safety")
        self.config = parse_config(SafetyConfig, config, source="SafetyFilter config")
        self.filter = SafetyFilter(self.config)
        self._counts: Counter[str] = Counter()

    async def check(self, text: str, direction: str = "input", trace: dict[str, str] | None = None) -> dict[str, Any]:
        """Verdict.to_dict() of `text`: action (allow|redact|block), text, findings."""
        with span("safety.check", trace, direction=direction, chars=len(text)) as current:
            verdict = self.filter.check(text, direction)  # type: ignore[arg-type]
            rule_ids = [f.rule_id for f in verdict.findings]
            current.set_attributes({"action": verdict.action, "rule_ids": rule_ids})
        self._record(direction, rule_ids)
        return verdict.to_dict()

    async def check_many(self, texts: list[str], direction: str = "input", trace: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """`check` of several texts (e.g. every message of a chat request) in one call."""
        return [await self.check(text, direction, trace) for text in texts]

    async def stream_feed(self, state: dict[str, Any] | None, chunk: str, direction: str = "output",
                          context: str = "") -> dict[str, Any]:
        """One step of a stream: {"text": safe to emit now, "state": pass to the next step,
        "action": allow|redact|block so far, "rule_ids": rules seen so far}. state=None opens one,
        with `context` (text shown before the stream, e.g. the prompt a completion continues)."""
        self._counts["requests:stream_feed"] += 1
        return self._feed(state, chunk, direction, context)

    def _open(self, state: dict[str, Any] | None, direction: str, context: str):
        if state is None:
            return self.filter.stream(direction, context)  # type: ignore[arg-type]
        return self.filter.resume_stream(state)

    def _feed(self, state: dict[str, Any] | None, chunk: str, direction: str, context: str = "") -> dict[str, Any]:
        stream = self._open(state, direction, context)
        seen = len(stream.findings)
        text = stream.feed(chunk)
        self._record(stream.direction, [f.rule_id for f in stream.findings[seen:]])
        return {"text": text, "state": stream.to_state(), "action": stream.action, "rule_ids": list(stream.rule_ids)}

    async def stream_feed_batch(
        self, steps: list[tuple[dict[str, Any] | None, str, str, str, dict[str, str] | None]],
    ) -> list[dict[str, Any]]:
        """`stream_feed` for many streams in one call: [(state, chunk, direction, context, final), ...]
        -> their replies. `final` is None for an ordinary step; for a stream's last step it is the
        caller's trace carrier (may be empty), and the step is `stream_flush` after feeding the chunk.
        The ingress sends every chunk that arrived while its previous call was in flight, so under
        load one call screens a step of all its streams instead of one call per stream."""
        self._counts["requests:stream_feed_batch"] += 1
        return [self._feed_or_error(*step) for step in steps]

    def _feed_or_error(self, state: dict[str, Any] | None, chunk: str, direction: str, context: str,
                       final: dict[str, str] | None) -> dict[str, Any]:
        """One step of a batch; a step that fails (e.g. a state made under other rules) fails alone."""
        try:
            if final is not None:
                return self._finish(self._open(state, direction, context), chunk, final or None)
            return self._feed(state, chunk, direction, context)
        except Exception as error:
            return {"error": type(error).__name__}

    async def stream_flush(self, state: dict[str, Any], trace: dict[str, str] | None = None) -> dict[str, Any]:
        """The last step: everything still held, screened; the reply carries no state."""
        # One span per screened stream (at its end), not one per chunk (`stream_feed` takes no trace):
        # a 4096-token reply would otherwise add thousands of spans.
        self._counts["requests:stream_flush"] += 1
        return self._finish(self.filter.resume_stream(state), "", trace)

    def _finish(self, stream: Any, chunk: str, trace: dict[str, str] | None) -> dict[str, Any]:
        """Feed the last chunk and flush: everything still held, screened; the reply carries no state."""
        with span("safety.stream", trace) as current:
            seen = len(stream.findings)
            text = stream.feed(chunk) + stream.flush()
            current.set_attributes({"direction": stream.direction, "action": stream.action,
                                    "rule_ids": list(stream.rule_ids)})
        self._record(stream.direction, [f.rule_id for f in stream.findings[seen:]])
        # Offsets only, no text: which of the streamed text the client does not see as it was.
        return {"text": text, "action": stream.action, "rule_ids": list(stream.rule_ids),
                "withheld": [list(span) for span in stream.withheld]}

    def _record(self, direction: str, rule_ids: list[str]) -> None:
        self._counts[f"{direction}:calls"] += 1
        for rule_id in rule_ids:
            self._counts[f"{direction}:{rule_id}"] += 1
        if rule_ids:
            record_safety_findings(rule_ids, direction)

    def stats(self) -> dict[str, Any]:
        """Call and finding counts of this replica (rule ids only)."""
        return {"pid": os.getpid(), "profile": self.config.profile, "counts": dict(self._counts)}

    async def check_health(self) -> None:
        # The filter must still catch a known card number (redacted, or blocked under strict);
        # otherwise Serve replaces the replica.
        if self.filter.check(_CANARY, "output").action == "allow":
            raise RuntimeError("safety filter canary passed unscreened")


def build_safety_filter(config: SafetyConfig | dict[str, Any] | None = None) -> serve.Application:
    """The deployment bound to `config`, with replicas and resources taken from `config.deployment`."""
    config = config if isinstance(config, SafetyConfig) else parse_config(SafetyConfig, config, source="safety config")
    return SafetyFilterDeployment.options(**config.deployment.serve_options()).bind(config.model_dump())


class SafetyUnavailable(RuntimeError):
    """The safety filter gave no answer (error or timeout). Fail the request (HTTP 503) and emit,
    store and log nothing that was not screened."""


class SafetyClient:
    """The ingress's side of the SafetyFilter deployment: deadlines and fail-closed errors."""

    def __init__(self, handle: DeploymentHandle, timeout_s: float = 2.0) -> None:
        self.handle = handle
        self.timeout_s = timeout_s
        self._feeds = _FeedBatcher(self)

    async def feed(self, state: dict[str, Any] | None, chunk: str, direction: str, context: str = "",
                   final: dict[str, str] | None = None) -> dict[str, Any]:
        """One `stream_feed` step (the last one, flushing, when `final` is a trace carrier), sent
        together with the other streams' steps that are waiting."""
        return await self._feeds.feed(state, chunk, direction, context, final)

    async def check(self, text: str, direction: str = "input") -> dict[str, Any]:
        """Verdict dict of `text`; raises SafetyUnavailable when the filter does not answer."""
        return await self._call("check", text, direction)

    async def check_many(self, texts: list[str], direction: str = "input") -> list[dict[str, Any]]:
        """Verdict dicts of `texts`, screened in one call."""
        return await self._call("check_many", texts, direction)

    def stream(self, direction: str = "output", context: str = "") -> ScreenedStream:
        """A stream screened through the deployment; `context` as in `SafetyFilter.stream`."""
        return ScreenedStream(self, direction, context)

    async def _call(self, method: str, *args: Any) -> dict[str, Any]:
        # The caller's current span (the ingress's request span) continues in the deployment, except
        # in the per-chunk `stream_feed(_batch)`, which opens no span (so it gets no carrier on the hot path).
        kwargs = {} if method.startswith("stream_feed") else {"trace": inject_context()}
        response = getattr(self.handle, method).remote(*args, **kwargs)
        try:
            return await asyncio.wait_for(response, timeout=self.timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            raise SafetyUnavailable(f"safety filter did not answer {method} within {self.timeout_s}s") from None
        except Exception as error:  # any failure of the call fails the request, never opens it
            raise SafetyUnavailable(f"safety filter failed on {method}: {type(error).__name__}") from None


class ScreenedStream:
    """One request's output stream screened through the deployment; keeps the state in memory."""

    def __init__(self, client: SafetyClient, direction: str, context: str = "") -> None:
        self._client = client
        self._direction = direction
        self._context = context  # sent with the first step only
        self._state: dict[str, Any] | None = None
        self.action = "allow"
        self.rule_ids: list[str] = []
        self.screened_chars = 0  # characters of the fed text decided on (emitted or replaced), until `finish`
        self.withheld_spans: list[list[int]] = []  # (start, end) in the fed text of what was replaced or dropped

    async def feed(self, chunk: str) -> str:
        """Text safe to emit now; raises SafetyUnavailable (emit nothing more, fail the request)."""
        reply = await self._client.feed(self._state, chunk, self._direction, self._context)
        self._state, self._context = reply["state"], ""
        self.action, self.rule_ids = reply["action"], reply["rule_ids"]
        self.screened_chars, self.withheld_spans = self._state["emitted_chars"], self._state["withheld"]
        return reply["text"]

    async def flush(self) -> str:
        """Everything still held, screened; the stream is done after it."""
        return await self.finish("")

    async def finish(self, chunk: str) -> str:
        """The last chunk and everything still held, screened, in one step (one call fewer than
        `feed` then `flush`); the stream is done after it."""
        if self._state is None and not chunk:
            return ""
        reply = await self._client.feed(self._state, chunk, self._direction, self._context, inject_context())
        self._state, self._context = None, ""
        self.action, self.rule_ids = reply["action"], reply["rule_ids"]
        self.withheld_spans = reply["withheld"]  # everything fed is decided now
        return reply["text"]


class _FeedBatcher:
    """Groups the `stream_feed` steps of all streams of one event loop into `stream_feed_batch` calls.

    No timer: the first step goes out at once; steps that arrive while a call is in flight wait for
    it and go out together in the next one (group commit). With one stream nothing waits; with many
    streams the ingress makes about one SafetyFilter call per decode window instead of one per
    stream. A failed call fails every step in it (each stream's request fails closed).
    """

    def __init__(self, client: SafetyClient) -> None:
        self._client = client
        self._pending: list[tuple[tuple[Any, str, str, str, dict[str, str] | None], asyncio.Future]] = []
        self._sending = False

    async def feed(self, state: dict[str, Any] | None, chunk: str, direction: str, context: str,
                   final: dict[str, str] | None) -> dict[str, Any]:
        future = asyncio.get_running_loop().create_future()
        self._pending.append(((state, chunk, direction, context, final), future))
        if not self._sending:
            self._sending = True
            asyncio.get_running_loop().create_task(self._send())
        return await future

    async def _send(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    replies = await self._client._call("stream_feed_batch", [step for step, _ in batch])
                except Exception as error:  # SafetyUnavailable (or a cancelled call): every step fails closed
                    failure = error if isinstance(error, SafetyUnavailable) else SafetyUnavailable(
                        f"safety filter failed on stream_feed_batch: {type(error).__name__}")
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(failure)
                    continue
                for (_, future), reply in zip(batch, replies):
                    if future.done():  # a request whose client went away no longer waits
                        continue
                    if "error" in reply:
                        future.set_exception(SafetyUnavailable(f"safety filter failed on stream_feed: {reply['error']}"))
                    else:
                        future.set_result(reply)
        finally:
            self._sending = False
