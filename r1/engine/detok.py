"""Incremental detokenization with stop strings.

Decoding token by token breaks multi-byte characters (a Chinese character can span several
byte-level tokens) and would emit the start of a stop string before knowing whether it completes.
`IncrementalDetokenizer` decodes a sliding window of tokens and returns only text that is final:
no trailing replacement character, and no suffix that could still grow into a stop string. While a
reply is shorter than its `min_tokens`, no stop string may end in its text (vLLM checks stop strings
only once the reply is long enough). The text ends before the stop string that matched, or after it
with `include_stop` (vLLM's include_stop_str_in_output).
"""

from __future__ import annotations

from typing import Any

class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: list[str] | None = None, min_tokens: int = 0, include_stop: bool = False):
        self.tokenizer = tokenizer
        self.include_stop = include_stop
        # A fast tokenizer's Rust backend decodes as its `decode` does (no clean-up of spaces asked
        # for here) at a third of the cost: two decodes per token of every stream, at every step.
        self._backend_decode = getattr(getattr(tokenizer, "backend_tokenizer", None), "decode", None)
        self.stop = list(stop or [])
        self.min_tokens = min_tokens
        self.token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""  # all decoded text so far (truncated at a stop string once one matched)
        self._emitted = 0  # characters of self.text already returned
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text
        # Text decoded while stop strings were not checked (min_tokens): a stop string ending in it
        # does not count, as in vLLM, which checks them only once the reply is long enough.
        self._unchecked = 0

    def _decode(self, ids: list[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Add one token; return the newly final text (possibly empty). While the reply is shorter
        than `min_tokens`, no stop string may end in the text decoded so far."""
        if self.stopped:
            return ""
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.token_ids[self._prefix_offset :])
        if not (full.endswith("\ufffd") or len(full) <= len(prefix)):
            self.text += full[len(prefix) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
        if len(self.token_ids) < self.min_tokens:
            self._unchecked = len(self.text)
        return self._release(final=False)

    def _release(self, final: bool) -> str:
        if self.stop and not self.stopped:
            search_from = max(self._emitted - max(len(s) for s in self.stop), 0)
            # A match must end after the text decoded unchecked.
            hits = [(self.text.find(s, max(search_from, self._unchecked - len(s) + 1)), s) for s in self.stop]
            hits = [(pos, s) for pos, s in hits if pos >= 0]
            if hits:
                # The earliest; of two there ("ab", "abc"), the shorter, which completed first.
                pos, stop = min(hits, key=lambda hit: (hit[0], len(hit[1])))
                self.matched = stop
                self.text = self.text[:pos + len(stop) if self.include_stop else pos]
                self.stopped = True
                final = True
        end = len(self.text)
        if not final and self.stop:
            end -= self._held_back_for_stop()
        out = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return out

    def _held_back_for_stop(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        longest = 0
        last = self.text[-1:]
        if not last:
            return 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(self.text)), longest, -1):
                # The prefix's last character must be the text's: a cheap test before the comparison
                # (this runs at every token, over every length of every stop string).
                if stop[length - 1] == last and self.text.endswith(stop[:length]):
                    longest = length
                    break
        return longest

    def finish(self) -> str:
        """Flush held-back text at the end of generation (an incomplete character included)."""
        if not self.stopped and self._read_offset < len(self.token_ids):
            prefix = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
            full = self._decode(self.token_ids[self._prefix_offset :])
            self.text += full[len(prefix) :]
            self._prefix_offset = self._read_offset = len(self.token_ids)
        return self._release(final=True)
