"""Log-probabilities on the OpenAI wire format, released in step with output screening.

The engine gives each generated token's log-probability and its most likely alternatives
(`r1.engine.types.TokenLogprob`, carried to the ingress as plain tuples). A token's entry names its
text, so an entry sent before the safety filter has passed that text would show what the filter
may yet redact. `LogprobLedger` holds each choice's entries until the filter has passed the text
they came with, and drops the entries of text the filter redacted or blocked: the reply's
logprobs then cover the tokens whose text the client sees unchanged, and nothing else.

Each entry says how many characters of the stream's text came out with its token, so the ledger
knows where every token's text lies in what it fed the filter. A token that ends inside a
character, or inside a possible stop string, has no text of its own: it is decided with the text
that completes it, and dropped if that text is withheld.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

# JSON has no -Infinity: a token the model rules out entirely is reported at this value (as vLLM does).
LOGPROB_FLOOR = -9999.0

# (token id, logprob, ((id, logprob), ...), chars): one token, its alternatives best first, and how
# many characters of the text came out with it (`r1.engine.types.TokenLogprob` as plain data; the
# logprob is None for an echoed prompt's first token).
Entry = tuple[int, float | None, Sequence[Sequence[Any]], int]


class LogprobLedger:
    """One choice's entries, waiting for the output screening of their text."""

    def __init__(self) -> None:
        self._pending: deque[tuple[int, int, Entry]] = deque()  # (start, end) of their token's text, entry
        self._fed = 0  # characters of generated text fed to the screening so far

    def add(self, entries: Iterable[Entry] | None, chars: int, split: bool = True) -> None:
        """The entries of a stream item whose text (`chars` characters: their tokens' text, and any
        text flushed at the end without a token) goes to the screening next. split=False: where
        each token's text lies is not known (an echoed prompt whose text is not its tokens' decoded
        text), so every entry counts as the whole text: released only if none of it is withheld."""
        start = self._fed
        for entry in entries or ():
            end = start + entry[3] if split else self._fed + chars
            self._pending.append((start, end, entry))
            start = end if split else start
        self._fed += chars

    def release(self, screened: int | None, withheld: Sequence[tuple[int, int]], blocked: bool,
                final: bool) -> list[Entry]:
        """The entries whose text the screening has passed unchanged, in order.

        screened: characters of the fed text the screening has decided on (emitted or replaced);
        None when nothing is screened. withheld: (start, end) of all it replaced or dropped so far
        (`SafetyStream.withheld`).
        blocked: the screening stopped the output, so nothing held is released. final: the text has
        ended and every character is decided (an entry of a token with no text of its own, such as
        end-of-sequence, is released then)."""
        if blocked:
            self._pending.clear()
            return []
        if screened is None:  # unscreened text is decided as it comes
            final = True
        released: list[Entry] = []
        while self._pending:
            start, end, entry = self._pending[0]
            # A token without text of its own is decided with the text after it.
            if not (final or end < screened or start < end <= screened):
                break
            self._pending.popleft()
            # It counts as that text's first character: the text that completes it.
            if not any(a < max(end, start + 1) and start < b for a, b in withheld):
                released.append(entry)
        return released


class TokenTexts:
    """Token id → its text as a logprob entry names it (special tokens included), cached."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            if len(self._cache) > 1 << 17:
                self._cache.clear()
            text = self._cache[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text


def _value(logprob: float | None) -> float | None:
    return None if logprob is None else max(logprob, LOGPROB_FLOOR)


def token_id_name(token_id: int) -> str:
    """A token as vLLM's return_tokens_as_token_ids names it in logprobs: "token_id:123"."""
    return f"token_id:{token_id}"


def chat_logprobs(entries: Sequence[Entry], text_of: Callable[[int], str],
                  name_of: Callable[[int], str] | None = None) -> dict[str, Any]:
    """A chat choice's (or chunk's) `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]};
    `name_of` names the tokens (`token_id_name`) instead of their text (bytes stay the text's)."""
    def token(token_id: int, logprob: float) -> dict[str, Any]:
        text = text_of(token_id)
        return {"token": name_of(token_id) if name_of else text, "logprob": _value(logprob),
                "bytes": list(text.encode("utf-8"))}

    return {"content": [{**token(token_id, logprob), "top_logprobs": [token(i, v) for i, v in top]}
                        for token_id, logprob, top, _ in entries]}


def completion_logprobs(entries: Sequence[Entry], text_of: Callable[[int], str], offset: int = 0,
                        name_of: Callable[[int], str] | None = None) -> tuple[dict[str, Any], int]:
    """A completion choice's (or chunk's) `logprobs`, OpenAI's legacy format: tokens, token_logprobs,
    top_logprobs (the alternatives and the chosen token, name → logprob) and text_offset (where each
    token's text starts, counting from `offset`), and the offset after the last token. An echoed
    prompt's first token has null for both. `name_of` names the tokens (`token_id_name`) instead of
    their text; the offsets still count text."""
    name = name_of or text_of
    tokens, values, tops, offsets = [], [], [], []
    for token_id, logprob, top, _ in entries:
        tokens.append(name(token_id))
        values.append(_value(logprob))
        tops.append(None if logprob is None else {**{name(i): _value(v) for i, v in top}, name(token_id): _value(logprob)})
        offsets.append(offset)
        offset += len(text_of(token_id))
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}, offset
