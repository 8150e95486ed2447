"""Plain data that flows through the engine: requests in, deltas and completions out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from r1.config import SamplingConfig

FinishReason = Literal["stop", "length", "abort"]


class RequestError(ValueError):
    """A request the engine refuses: `field` names the sampling field at fault (None: the prompt),
    `code` says what is wrong as an OpenAI-style error code; the message says how to fix it."""

    def __init__(self, message: str, field: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.field = field
        self.code = code


class TokenLogprob(NamedTuple):
    """A generated token's log-probability and the most likely tokens at its position (best first).

    `chars`: how many characters of the stream's text came out with this token (0 for a token that
    ends inside a character or inside a possible stop string: its text comes out with a later one).
    """

    token_id: int
    logprob: float | None  # None only for a prompt's first token (nothing before it to predict it)
    top: tuple[tuple[int, float], ...] = ()
    chars: int = 0


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Delta:
    """What one decode step produced for one request.

    `text` is safe to show: it never ends inside a multi-byte character or inside a possible stop
    string. The last delta of a request has `finish_reason` set and carries `usage`.
    """

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    # Set when the request failed inside the engine (the stream then ends with finish_reason="abort").
    error: str | None = None
    # One per token of `token_ids` when the request asked for log-probabilities (`sampling.logprobs`).
    logprobs: list[TokenLogprob] | None = None
    # The first delta only, when the request asked for `sampling.prompt_logprobs`: one per prompt
    # token (the first one's logprob None); `chars` of the prompt's decoded text.
    prompt_logprobs: list[TokenLogprob] | None = None
    # The last delta's, when a stop string (that string) or one of sampling.stop_token_ids (that id)
    # ended the reply; None for end-of-sequence and every other reason (vLLM's stop_reason).
    stop_reason: str | int | None = None

    def followed_by(self, later: Delta) -> Delta:
        """One delta holding this one and the `later` one of the same request."""
        logprobs = None
        if self.logprobs is not None or later.logprobs is not None:
            logprobs = (self.logprobs or []) + (later.logprobs or [])
        return Delta(self.request_id, self.token_ids + later.token_ids, self.text + later.text,
                     later.finish_reason, later.usage or self.usage, self.error or later.error, logprobs,
                     self.prompt_logprobs if self.prompt_logprobs is not None else later.prompt_logprobs,
                     later.stop_reason)


@dataclass
class Completion:
    """A finished request, as returned by the non-streaming APIs."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked for them
    prompt_logprobs: list[TokenLogprob] | None = None  # as Delta's, when the request asked for them
    stop_reason: str | int | None = None  # as Delta's

    @property
    def usage(self) -> Usage:
        return Usage(len(self.prompt_token_ids), len(self.token_ids))


@dataclass
class Request:
    """A tokenized request, validated against the model's context."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingConfig
    max_new_tokens: int
    # The model's end-of-sequence ids (ignored with sampling.ignore_eos; sampling.stop_token_ids
    # end the reply too).
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    # sampling.bad_words as the token sequences they are banned as (`bad_words_token_ids`).
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    # Structured output: the compiled grammar of sampling.json_schema (`r1.engine.structured`), and
    # the token after which it applies (None: from the first token).
    grammar: Any = None
    grammar_gate: int | None = None
    # The LoRA adapter the request runs with (`r1.engine.lora`; 0: the base model).
    adapter: int = 0
    # sampling.thinking_token_budget's: the <think> and </think> token ids, and whether the reply
    # starts inside the reasoning (a chat template that opens it, or a continued reasoning).
    think_ids: tuple[int, int] | None = None
    reasoning_first: bool = False
    # Prompt tokens prefilled from the engine's prefix cache (set when the request is prefilled;
    # the usage's prompt_tokens_details.cached_tokens). None: an engine that does not say.
    cached_tokens: int | None = 0

    def stop_reason(self, token: int, detok: Any) -> str | int | None:
        """What ended a reply that finished with "stop" at `token`: the stop string its detokenizer
        matched, the stop token id, or None (end-of-sequence, or the end of a constrained reply)."""
        return token if self.stop_kind(token) == "stop_token" else detok.matched

    def stop_kind(self, token: int) -> Literal["eos", "stop_token"] | None:
        """How `token` ends the reply: as end-of-sequence (no text of its own), as one of the
        request's stop_token_ids (its text kept, as vLLM keeps it), or not at all (None)."""
        if token in self.stop_token_ids and not self.sampling.ignore_eos:
            return "eos"
        return "stop_token" if token in self.sampling.stop_token_ids else None

    def ending_token_ids(self) -> frozenset[int]:
        """Every id that would end the reply (what min_tokens holds back)."""
        eos = frozenset() if self.sampling.ignore_eos else self.stop_token_ids
        return eos | frozenset(self.sampling.stop_token_ids)
