"""Split DeepSeek-R1-style output into reasoning and content, whole or streamed.

An R1-style model writes its chain of thought between `<think>` and `</think>` and the answer after
`</think>`. The DeepSeek-R1 chat template pre-fills the assistant turn with `<think>\\n`, so the
generated text usually starts inside the reasoning and only the closing tag appears in it.

Rules (the same for `split_reasoning` and `ReasoningParser`):

- `think_prefilled=True` (default): the stream starts inside the reasoning. Text before `</think>`
  is reasoning; a stream that never closes (or has no tags at all) is all reasoning.
- A `<think>` at the very start of the reasoning (before any reasoning text, after optional
  whitespace) is dropped: models often repeat the pre-filled opener.
- `think_prefilled=False`: text before the first `<think>` is content; text between `<think>` and
  `</think>` is reasoning; a `<think>` that never closes makes the rest reasoning.
- Everything after the first `</think>` is content, including any further tags (R1 has one
  reasoning block per turn), so a tag after `</think>` is kept verbatim in the content.
- A `</think>` before any `<think>` in `think_prefilled=False` mode is ordinary content text, and a
  `<think>` inside reasoning that has already started is ordinary reasoning text.
- Tags match exactly (case-sensitive, no inner spaces).
- `continuing=True`: the stream continues text already written (a prefix message the reply goes
  on from), so its start is taken as it is: no whitespace dropped there (rules 1 and 3 below) and
  no repeated opener dropped; whitespace after `</think>` still is.

Whitespace: exactly these runs are dropped, nothing else:

1. whitespace at the start of the reasoning (e.g. the newline after `<think>`);
2. whitespace right after `</think>` (e.g. `"</think>\\n\\n"`);
3. whitespace at the start of the content (with `think_prefilled=False`, leading whitespace of the
   stream before any text).

Whitespace before a tag is kept (the reasoning usually ends with "\\n"); callers who want tidy
reasoning can `.strip()` it. Dropping trailing whitespace would force a streaming parser to hold
back every newline, and this one holds back only what could still become a tag: the longest
suffix of the text seen so far that is a proper prefix of a tag that matters in the current state.

This module does not detect other reasoning formats (e.g. `<reasoning>` tags or channels), and it
does not validate the answer; see `r1.tasks` for task-specific checks.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# Parser states.
_CONTENT_BEFORE = "content_before"  # think_prefilled=False, no <think> seen yet
_REASONING_START = "reasoning_start"  # inside reasoning, no reasoning text yet
_REASONING = "reasoning"  # inside reasoning, past its start (a leading <think> is now plain text)
_CONTENT_AFTER = "content_after"  # after </think>; no more tags
_FINISHED = "finished"


def _partial_tag_length(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags`."""
    longest = 0
    for tag in tags:
        for length in range(min(len(tag) - 1, len(text)), longest, -1):
            if text.endswith(tag[:length]):
                longest = length
                break
    return longest


class ReasoningParser:
    """Incremental reasoning/content splitter for one generated stream.

    `feed(chunk)` returns the `(reasoning_delta, content_delta)` that are certain so far;
    `finish()` flushes a held-back partial tag as text. Any chunking of a text gives the same
    totals as `split_reasoning(text)`. One parser per stream: feeding after `finish()` is an error.
    """

    def __init__(self, think_prefilled: bool = True, continuing: bool = False) -> None:
        self.think_prefilled = think_prefilled
        start = _REASONING if continuing else _REASONING_START
        self._state = start if think_prefilled else _CONTENT_BEFORE
        self._pending = ""  # held-back text that may be the start of a tag
        # Drop whitespace until the next content text: true at the start of the content and right
        # after </think>.
        self._strip_content_whitespace = not continuing
        self._closed = False

    @property
    def reasoning_closed(self) -> bool:
        """Whether `</think>` has been seen."""
        return self._closed

    def feed(self, chunk: str) -> tuple[str, str]:
        if self._state == _FINISHED:
            raise ValueError("ReasoningParser.feed() after finish(); create a new ReasoningParser per stream")
        text = self._pending + chunk
        self._pending = ""
        reasoning: list[str] = []
        content: list[str] = []
        while text:
            state = self._state
            if state == _CONTENT_AFTER:
                self._emit_content(text, content)
                break
            if state == _REASONING_START:
                text = text.lstrip()
                if not text:
                    break
                if text.startswith(THINK_OPEN):  # the model repeated the pre-filled opener
                    text = text[len(THINK_OPEN) :]
                    continue
                if THINK_OPEN.startswith(text):  # "<", "<th", ... could still become <think>
                    self._pending = text
                    break
                self._state = _REASONING
                continue
            tag = THINK_CLOSE if state == _REASONING else THINK_OPEN
            index = text.find(tag)
            if index >= 0:
                before, text = text[:index], text[index + len(tag) :]
                if state == _REASONING:
                    reasoning.append(before)
                    self._state = _CONTENT_AFTER
                    self._strip_content_whitespace = True
                    self._closed = True
                else:
                    self._emit_content(before, content)
                    self._state = _REASONING_START
                continue
            held = _partial_tag_length(text, (tag,))
            certain = text[: len(text) - held]
            self._pending = text[len(text) - held :]
            if state == _REASONING:
                reasoning.append(certain)
            else:
                self._emit_content(certain, content)
            break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """End the stream: a held-back partial tag is plain text after all."""
        if self._state == _FINISHED:
            raise ValueError("ReasoningParser.finish() called twice; create a new ReasoningParser per stream")
        pending, self._pending = self._pending, ""
        state, self._state = self._state, _FINISHED
        if state in (_REASONING_START, _REASONING):
            return pending, ""
        content: list[str] = []
        self._emit_content(pending, content)
        return "", "".join(content)

    def _emit_content(self, text: str, out: list[str]) -> None:
        if self._strip_content_whitespace:
            text = text.lstrip()
        if text:
            self._strip_content_whitespace = False
            out.append(text)


def split_reasoning(text: str, think_prefilled: bool = True) -> tuple[str, str]:
    """Split a whole generated text into `(reasoning, content)`; see the module docstring."""
    parser = ReasoningParser(think_prefilled=think_prefilled)
    reasoning, content = parser.feed(text)
    reasoning_tail, content_tail = parser.finish()
    return reasoning + reasoning_tail, content + content_tail
