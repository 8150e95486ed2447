"""Safety screening on the request path: input before the model, output before the client.

Wraps `actors.safety.SafetyClient` with the HTTP meaning of its answers: an input `block` is a
400 with code `sensitive_content` and the configured message; a filter that errs or times out is a
503 (fail-closed: the request fails, and nothing unscreened is emitted, stored or logged). With
safety disabled (`safety: null`) every method passes text through unchanged.
"""

from __future__ import annotations

from typing import Any

from actors.safety import SafetyClient, SafetyUnavailable
from r1.config import SafetyConfig
from r1.serving.protocol import APIError


def _unavailable(error: SafetyUnavailable) -> APIError:
    return APIError(503, f"the safety filter is unavailable, so the request was refused ({error})",
                    code="safety_unavailable")


class OutputScreen:
    """One choice's output stream: feed generated text, get text that is safe to emit."""

    def __init__(self, stream: Any | None):
        self._stream = stream

    async def feed(self, text: str) -> str:
        if self._stream is None or not text:
            return text
        try:
            return await self._stream.feed(text)
        except SafetyUnavailable as error:
            raise _unavailable(error) from None

    async def finish(self, text: str) -> str:
        """The last generated text and whatever is still held, screened in one call."""
        if self._stream is None:
            return text
        try:
            return await self._stream.finish(text)
        except SafetyUnavailable as error:
            raise _unavailable(error) from None


class Screening:
    def __init__(self, handle: Any | None, config: SafetyConfig | None):
        self.config = config
        self.client = SafetyClient(handle, config.timeout_s) if handle is not None and config is not None else None

    async def _check(self, text: str, direction: str) -> dict[str, Any]:
        try:
            return await self.client.check(text, direction)
        except SafetyUnavailable as error:
            raise _unavailable(error) from None

    async def input_text(self, text: str, param: str) -> str:
        """The text the model may see; 400 when the filter blocks it."""
        if self.client is None or not text:
            return text
        verdict = await self._check(text, "input")
        if verdict["action"] == "block":
            raise APIError(400, self.config.block_message, param=param, code="sensitive_content")
        return verdict["text"]

    async def input_messages(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """Every message screened in one call; 400 naming the first blocked message."""
        if self.client is None:
            return messages
        indices = [i for i, m in enumerate(messages) if m["content"]]
        if not indices:
            return messages
        try:
            verdicts = await self.client.check_many([messages[i]["content"] for i in indices], "input")
        except SafetyUnavailable as error:
            raise _unavailable(error) from None
        screened = list(messages)
        for i, verdict in zip(indices, verdicts):
            if verdict["action"] == "block":
                raise APIError(400, self.config.block_message, param=f"messages.{i}.content", code="sensitive_content")
            screened[i] = {**messages[i], "content": verdict["text"]}
        return screened

    async def input_token_ids(self, token_ids: list[int], tokenizer: Any) -> list[int]:
        """Token-id prompts are screened as their decoded text; they cannot be redacted in place."""
        if self.client is None:
            return token_ids
        text = tokenizer.decode(token_ids)
        if await self.input_text(text, "prompt") != text:
            raise APIError(400, "the prompt contains sensitive content; send it as text to have it redacted",
                           param="prompt", code="sensitive_content")
        return token_ids

    async def output_text(self, text: str) -> str:
        if self.client is None or not text:
            return text
        return (await self._check(text, "output"))["text"]

    def output_stream(self, context: str = "") -> OutputScreen:
        """An output stream; `context` is text the output continues (a completion's prompt), screened
        as context only, so a value completing a keyword or a number that the prompt began is redacted."""
        return OutputScreen(self.client.stream("output", context) if self.client is not None else None)
