"""`SafetyStream`: screen text that arrives in chunks (model output) with a hold-back buffer.

`feed(chunk)` returns the text that is safe to emit now; `flush()` returns the rest at the end.
Every emitted piece has been screened; concatenated, the pieces equal what `SafetyFilter.check`
returns for the whole text (for `allow` and `redact`). A sensitive span split across chunks is
never emitted: text is held back from the earliest position where a finding could still start
or grow — a keyword's first characters ("密" before "码"), the last 19 digits of a number, a
secret's value while it may still be growing, a code that a code keyword may still follow, and
for custom regexes the last `max_match_chars` characters. Nothing else is held, so ordinary text
streams through at once; the hold never exceeds what the longest possible match needs.

Already-emitted text is kept (folded, bounded) as left context, so a keyword emitted earlier still
qualifies the value that arrives later ("密码是" … "abc123"). A stream can start with such context
(`SafetyFilter.stream(context=prompt)`): text shown before it, such as the prompt a completion
continues, which is screened as context only — never emitted, redacted or reported.

Block rules (the `strict` profile): once a block finding appears, the stream emits
`block_message` once and nothing after it; text emitted before was screened and clean, and held
text is dropped. `action` says what happened.

`withheld` lists the spans of the original text that were replaced or dropped, whole (a
finding's own span is known only up to where it was emitted), so a consumer can tell which of the
text it fed came out unchanged: the serving path releases token log-probabilities by it.

State is plain data (`to_state` / `SafetyFilter.resume_stream`), so a stateless server can run
each step for a client that keeps the state (actors/safety.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from r1.safety.filter import Finding
from r1.safety.normalize import Folded, fold
from r1.safety.rules import Direction
from r1.safety.scanner import Hit

if TYPE_CHECKING:
    from r1.safety.filter import SafetyFilter

_STATE_VERSION = 2


class SafetyStream:
    """One output (or input) stream. Not thread-safe; one per request."""

    def __init__(self, safety_filter: SafetyFilter, direction: Direction = "output", context: str = ""):
        self._filter = safety_filter
        self._scanner = safety_filter.scanner(direction)
        self.direction = direction
        self._buffer = ""  # received, not yet emitted (original text)
        # Folded tail of emitted text. Of a given context only the end can matter; a prompt can be long.
        self._context = self._tail(fold(context[-4 * self._scanner.context_chars :]).norm) if context else ""
        self._emitted_chars = 0  # original characters consumed (emitted or replaced)
        self._withheld: list[tuple[int, int]] = []  # original text replaced or dropped so far, merged spans
        self._continuing = False  # the last piece ended inside a redacted span
        self._blocked = False
        self._finished = False
        self._findings: list[Finding] = []

    # --- public API ------------------------------------------------------------------------------

    def feed(self, chunk: str) -> str:
        """Add a chunk; return the text that is safe to emit now (possibly "")."""
        if self._finished:
            raise ValueError("stream already flushed; open a new stream for new text")
        if self._blocked or not chunk:
            return ""
        self._buffer += chunk
        return self._emit(final=False)

    def flush(self) -> str:
        """End of text: return everything still held, screened."""
        if self._finished:
            raise ValueError("stream already flushed; open a new stream for new text")
        out = "" if self._blocked else self._emit(final=True)
        self._finished = True
        self._buffer = ""
        self._context = ""
        return out

    @property
    def findings(self) -> tuple[Finding, ...]:
        """Findings so far; spans are offsets in the whole streamed text, as known when emitted."""
        return tuple(self._findings)

    @property
    def withheld(self) -> tuple[tuple[int, int], ...]:
        """(start, end) offsets in the whole streamed text of everything replaced or dropped so far,
        whole: a finding's span is known only up to where it was emitted, while a redaction that
        reaches a later piece continues into it. Blocked text is not listed (nothing after a block
        is emitted)."""
        return tuple(self._withheld)

    def _withhold(self, start: int, end: int) -> None:
        if end <= start:
            return
        if self._withheld and start <= self._withheld[-1][1]:
            self._withheld[-1] = (self._withheld[-1][0], max(self._withheld[-1][1], end))
        else:
            self._withheld.append((start, end))

    @property
    def rule_ids(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f.rule_id for f in self._findings))

    @property
    def action(self) -> str:
        if self._blocked:
            return "block"
        return "redact" if any(f.action == "redact" for f in self._findings) else "allow"

    @property
    def held_chars(self) -> int:
        """How many received characters are held back right now."""
        return len(self._buffer)

    # --- the step ------------------------------------------------------------------------------

    def _emit(self, final: bool) -> str:
        if not self._buffer:
            return ""
        scanner = self._scanner
        folded = fold(self._buffer)
        if self._continuing:
            # Zero-width characters right after a redacted span belong to it (as in `check`).
            lead = folded.to_raw(0)
            if lead:
                self._buffer = self._buffer[lead:]
                self._withhold(self._emitted_chars, self._emitted_chars + lead)
                self._emitted_chars += lead
                if not self._buffer:
                    return ""
                folded = fold(self._buffer)
        base = len(self._context)
        norm = self._context + folded.norm
        hits = [h for h in dedupe(scanner.scan(norm, min_end=base)) if h.end > base]
        cut = len(norm) if final else max(scanner.hold_start(norm), base)
        # Snap the cut back to the start of an original character.
        raw_cut = folded.to_raw(cut - base)
        cut = base + folded.to_norm(raw_cut)
        # Only a match that starts before the cut is final (the held-back text can still change the
        # rest: "Skyline" may become "Skylines", 16 digits may gain a 17th); `check` of the whole
        # text would block on exactly these.
        blocking = [h for h in hits if scanner.actions[h.rule] == "block" and h.start < cut]
        if blocking:
            self._record(blocking, folded, base, len(norm))
            self._blocked = True
            self._buffer = ""
            self._context = ""
            return self._filter.block_message
        if raw_cut == 0:
            return ""
        spans = redaction_spans(hits, scanner.actions, base, cut)
        out, self._continuing, replaced = apply_redactions(folded, spans, base, raw_cut, self._filter.redaction_text,
                                                           self._continuing)
        for start, end in replaced:
            self._withhold(self._emitted_chars + start, self._emitted_chars + end)
        # Before the first emission the context is the one given (a prompt): a finding that starts in
        # it (a card number the prompt began) is this stream's too, for its part here. Later, the
        # context is emitted text, whose findings were recorded when they were emitted.
        first = self._emitted_chars == 0
        self._record([h for h in hits if (base <= h.start or first) and h.start < cut], folded, base, cut)
        # Keep left context: a bounded tail, extended back to the trigger of any finding that
        # reaches the cut (a long secret value keeps its keyword in view). A card finding's trigger
        # is its own first digit, and the scan above enumerates only windows that can reach this
        # step's text, so a long chain of numbers ("1 2 3 4 …") is not kept, and rescanned on
        # every chunk, from its first digit.
        self._context = self._tail(norm[:cut], hits)
        self._buffer = self._buffer[raw_cut:]
        self._emitted_chars += raw_cut
        return out

    def _tail(self, context: str, hits: list[Hit] | None = None) -> str:
        """The left context to keep of `context` (folded text that ends at the cut): a bounded tail,
        extended back to the trigger of any finding that reaches its end."""
        if hits is None:
            hits = self._scanner.scan(context)
        keep_from = len(context) - self._scanner.context_chars
        for hit in hits:
            if hit.end >= len(context):
                keep_from = min(keep_from, hit.trigger)
        return context[max(keep_from, 0) :]

    def _record(self, hits, folded, base: int, cut: int) -> None:
        for hit in hits:
            start = max(hit.start, base) - base
            end = min(hit.end, cut) - base
            if end <= start:
                continue
            raw_start, raw_end = folded.span_to_raw(start, end)
            self._findings.append(
                Finding(
                    self._scanner.rules[hit.rule].rule_id,
                    self._emitted_chars + raw_start,
                    self._emitted_chars + raw_end,
                    self._scanner.actions[hit.rule],  # type: ignore[arg-type]
                )
            )

    # --- state for stateless serving -------------------------------------------------------------

    def to_state(self) -> dict:
        """Plain-data state. It holds unscreened text: keep it in memory, never log or store it."""
        return {
            "version": _STATE_VERSION,
            "filter": self._filter.fingerprint,
            "direction": self.direction,
            "buffer": self._buffer,
            "context": self._context,
            "emitted_chars": self._emitted_chars,
            "withheld": [list(span) for span in self._withheld],
            "continuing": self._continuing,
            "blocked": self._blocked,
            "finished": self._finished,
            "findings": [f.to_dict() for f in self._findings],
        }

    @classmethod
    def from_state(cls, safety_filter: SafetyFilter, state: dict) -> SafetyStream:
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError("stream state is missing or from another version; open a new stream")
        if state.get("filter") != safety_filter.fingerprint:
            raise ValueError("stream state was made under different safety rules; open a new stream")
        stream = cls(safety_filter, state["direction"])
        stream._buffer = state["buffer"]
        stream._context = state["context"]
        stream._emitted_chars = state["emitted_chars"]
        stream._withheld = [tuple(span) for span in state["withheld"]]
        stream._continuing = state["continuing"]
        stream._blocked = state["blocked"]
        stream._finished = state["finished"]
        stream._findings = [Finding(**f) for f in state["findings"]]
        return stream


def dedupe(hits: list[Hit]) -> list[Hit]:
    """Hits sorted by position, without repeats of the same rule and span."""
    seen: set[tuple[int, int, int]] = set()
    unique = []
    for hit in sorted(hits, key=lambda h: (h.start, h.end, h.rule)):
        key = (hit.rule, hit.start, hit.end)
        if key not in seen:
            seen.add(key)
            unique.append(hit)
    return unique


def redaction_spans(hits: list[Hit], actions: list[str], low: int, high: int) -> list[tuple[int, int, bool, bool, bool]]:
    """Merged folded spans to redact, clipped to [low, high): (start, end, starts_at_low,
    reaches_high, starts_before_low). Overlapping and touching spans merge, so adjacent findings get
    one placeholder."""
    spans = sorted((h.start, h.end) for h in hits if actions[h.rule] == "redact" and h.end > low and h.start < high)
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(max(s, low), min(e, high), s <= low, e >= high, s < low) for s, e in merged]


def apply_redactions(
    folded: Folded, spans: list[tuple[int, int, bool, bool, bool]], norm_offset: int, raw_end: int, placeholder: str,
    continuing: bool,
) -> tuple[str, bool, list[tuple[int, int]]]:
    """folded.text[:raw_end] with the folded spans (shifted by norm_offset) replaced.

    `continuing`: the previous stream piece ended inside (or right at the end of) a redacted
    span, so a span starting this piece continues it and gets no second placeholder. Returns
    (text, whether this piece ends inside or right at the end of a redacted span, the replaced
    spans in the original text)."""
    text = folded.text
    pieces: list[str] = []
    position = 0
    ends_inside = False
    replaced: list[tuple[int, int]] = []
    for start, end, starts_at_low, reaches_high, starts_before in spans:
        raw_start, raw_stop = folded.span_to_raw(start - norm_offset, end - norm_offset)
        if starts_before:  # a span that began in the context covers this piece's leading zero-width characters
            raw_start = 0
        replaced.append((raw_start, raw_stop))
        pieces.append(text[position:raw_start])
        if not (continuing and starts_at_low):
            pieces.append(placeholder)
        position = raw_stop
        ends_inside = reaches_high
    pieces.append(text[position:raw_end])
    return "".join(pieces), ends_inside, replaced
