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

    @property
    def screened_chars(self) -> int | None:
        """Characters of the fed text the filter has decided on (emitted or replaced); None: no filter."""
        return None if self._stream is None else self._stream.screened_chars

    @property
    def withheld_spans(self) -> list[list[int]]:
        """(start, end) in the fed text of what the filter replaced or dropped so far."""
        return [] if self._stream is None else self._stream.withheld_spans

    @property
    def blocked(self) -> bool:
        return self._stream is not None and self._stream.action == "block"

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

    async def _screen_inputs(self, texts: list[str], params: list[str]) -> list[str]:
        """Every non-empty text screened in one call: the texts as the model may see them; 400
        naming (`params`) the first blocked one."""
        indices = [i for i, text in enumerate(texts) if text]
        if not indices:
            return texts
        try:
            verdicts = await self.client.check_many([texts[i] for i in indices], "input")
        except SafetyUnavailable as error:
            raise _unavailable(error) from None
        screened = list(texts)
        for i, verdict in zip(indices, verdicts):
            if verdict["action"] == "block":
                raise APIError(400, self.config.block_message, param=params[i], code="sensitive_content")
            screened[i] = verdict["text"]
        return screened

    async def input_messages(self, messages: list[dict[str, str]], tools_text: str = "") -> tuple[list[dict[str, str]], str]:
        """Every message, and the text offering a request's tools, screened in one call; 400 naming
        the first blocked one (`messages.N.content`, or `tools`)."""
        if self.client is None:
            return messages, tools_text
        texts = await self._screen_inputs([m["content"] for m in messages] + [tools_text],
                                          [f"messages.{i}.content" for i in range(len(messages))] + ["tools"])
        return [{**message, "content": text} for message, text in zip(messages, texts)], texts[-1]

    async def input_prompts(self, prompts: list[str | list[int]], params: list[str], tokenizer: Any) -> list[str | list[int]]:
        """Completion prompts screened in one call; 400 naming the first blocked one (`params`).
        Token-id prompts are screened as their decoded text; they cannot be redacted in place, so
        one the filter would change is refused too."""
        if self.client is None:
            return prompts
        texts = [prompt if isinstance(prompt, str) else tokenizer.decode(prompt) for prompt in prompts]
        screened = await self._screen_inputs(texts, params)
        for index, (prompt, text, param) in enumerate(zip(prompts, texts, params)):
            if isinstance(prompt, list):  # token ids go to the model as they are, or not at all
                if screened[index] != text:
                    raise APIError(400, "the prompt contains sensitive content; send it as text to have it redacted",
                                   param=param, code="sensitive_content")
                screened[index] = prompt
        return screened

    async def output_text(self, text: str) -> str:
        if self.client is None or not text:
            return text
        return (await self._check(text, "output"))["text"]

    def output_stream(self, context: str = "") -> OutputScreen:
        """An output stream; `context` is text the output continues (a completion's prompt), screened
        as context only, so a value completing a keyword or a number that the prompt began is redacted."""
        return OutputScreen(self.client.stream("output", context) if self.client is not None else None)
