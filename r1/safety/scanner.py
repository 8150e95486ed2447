"""All rules of one direction compiled into a few regex passes, and the hold-back for streams.

`find(text)` scans the original text directly with full-width-tolerant patterns
(r1/safety/patterns.py): no folded copy and no offset map for text that needs no folding (ASCII,
CJK, full-width punctuation, ideographic spaces: `needs_folding`). Only a text that holds other
look-alikes (zero-width characters, full-width letters or digits, circled or mathematical digits,
accented letters, ligatures, …) is folded first and its findings mapped back. Custom regex rules
always see the folded copy. `find(text, fast=False)` folds every text: the reference path the
fast path is tested against.

Passes over the text, whatever the number of keywords:
- one *main pass*: every card candidate (a chain of `min_digits`+ digits), every short code
  followed by a code keyword ("384920是您的验证码") and the keywords of the first secret or
  keyword rule — for a secret rule keyword and value are matched together, so a harmless mention
  ("忘记密码怎么办") costs no Python work. Every alternative starts with a literal character of
  its own (one per digit, one per keyword initial), so `re` skips ahead in C to where a match can
  begin and at most one alternative can start at any position;
- one pass per further secret or keyword rule, and one per custom regex rule.
A number inside a secret's value is reported as part of the secret.

`hold_start(norm)` is for streams: the earliest position of a folded text from which text must be
held back because a finding could still start there or grow through the end.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from r1.safety.normalize import fold, fold_string, fold_table, rare_char_pattern
from r1.safety.patterns import (
    CARD_MAX_SEPARATORS,
    RAW_SAFE,
    SECRET_BRIDGE_MAX_CHARS,
    TRAILING_TOKEN,
    VALUE_GRAMMAR,
    card_rest,
    card_tail_re,
    code_rest,
    code_tail_re,
    digit_alternative,
    keyword_alternation,
    keyword_branches,
    value_grammar,
)
from r1.safety.rules import Direction, Rule, card_hits, secret_value, value_from_match

_ASCII_UPPER = {c: c + 32 for c in range(65, 91)}
_TRAILING_TOKEN_WINDOW = 100
_DIGITS = "0123456789"


def _finding_order(finding: tuple[int, int, int]) -> tuple[int, int, int]:
    return finding[1], finding[2], finding[0]


def ascii_lower(text: str) -> str:
    return text.translate(_ASCII_UPPER)


@functools.cache
def _lookalike_re() -> re.Pattern[str]:
    return re.compile(rare_char_pattern(set(fold_table().fold) - RAW_SAFE))


def _is_ascii_letter(char: str) -> bool:
    return char.isascii() and char.isalpha()


@dataclass(slots=True)
class Hit:
    """A finding in scanned-text coordinates. `trigger` is where the evidence for it starts (a
    secret's keyword, a code's first digit; for a card number its own first digit: its windows are
    all its evidence, however long the chain of digits before it); streams keep the trigger in
    context."""

    rule: int
    start: int
    end: int
    trigger: int


class Scanner:
    """The rules that are active in one direction, compiled."""

    def __init__(self, rules: list[Rule], direction: Direction):
        self.rules = [rule for rule in rules if rule.action(direction) != "off"]
        self.actions = [rule.action(direction) for rule in self.rules]
        self.rule_ids = [rule.rule_id for rule in self.rules]
        self._regex_rules = [i for i, r in enumerate(self.rules) if r.kind == "regex"]
        self._card_rules = [(i, r) for i, r in enumerate(self.rules) if r.kind == "card_number"]
        # code keyword (folded, ASCII-lowered) -> rules that own it
        self._code_owners: dict[str, list[int]] = {}
        secret_index: dict[str, list[int]] = {}
        all_words: set[str] = set()
        for i, rule in enumerate(self.rules):
            all_words.update(ascii_lower(w) for w in rule.keywords)
            if rule.kind == "secret":
                for word in rule.keywords:
                    secret_index.setdefault(ascii_lower(word), []).append(i)
                for word in rule.code_keywords:
                    self._code_owners.setdefault(ascii_lower(word), []).append(i)
                    all_words.add(ascii_lower(word))
        self._build_passes()

        # Streams: secret keyword occurrences, keyword prefixes, trailing numbers and codes.
        self._secret_keyword_re = re.compile(keyword_alternation(sorted(secret_index))) if secret_index else None
        self._secret_words = secret_index
        self._max_keyword_chars = max((len(w) for w in all_words), default=0)
        self._open_suffixes = {w[:n] for w in all_words for n in range(1, len(w))}
        self._open_suffixes |= {w for w in all_words if w[-1].isascii() and w[-1].isalpha()}
        self._code_tail_re = code_tail_re(sorted(self._code_owners)) if self._code_owners else None
        self._card_tail_re = None
        self._card_tail_window = 0
        if self._card_rules:
            # A number may still become (part of) a finding while it is within its last
            # `held_digits` digits.
            held_digits = max(r.max_digits if r.max_digits is not None else r.min_digits - 1 for _, r in self._card_rules)
            self._card_tail_re = card_tail_re(held_digits)
            self._card_tail_window = held_digits * (CARD_MAX_SEPARATORS + 1) + CARD_MAX_SEPARATORS
        self._regex_hold = max((self.rules[i].hold_chars for i in self._regex_rules), default=0)
        # How much already-emitted folded text a stream keeps as left context.
        self.context_chars = 2 * max(
            128,
            self._card_tail_window + 8,
            self._max_keyword_chars + SECRET_BRIDGE_MAX_CHARS + _TRAILING_TOKEN_WINDOW,
            self._regex_hold + 8,
        )
        # Texts holding a look-alike the patterns do not accept directly are folded first.
        self._lookalike_re = _lookalike_re()
        self._lookalike_search = self._lookalike_re.search

    def _build_passes(self) -> None:
        """The main pass holds every card candidate and code, plus the first secret or keyword
        rule (its keywords start with non-digits, so no two alternatives compete for a
        position); other keyword and secret rules get a pass each."""
        alternatives: list[str] = []
        # named group -> (kind, rule index); the group that closes last names the alternative
        self._groups: dict[str, tuple[str, int]] = {}
        self._secret_passes: list[tuple[int, re.Pattern[str]]] = []
        self._keyword_passes: list[tuple[int, re.Pattern[str]]] = []
        main_rule = None
        for i, rule in enumerate(self.rules):
            if rule.kind in ("keyword", "secret") and rule.keywords:
                if main_rule is None and not any(fold_string(w[0]).isdigit() for w in rule.keywords):
                    main_rule = i
                    continue
                words = [ascii_lower(w) for w in rule.keywords]
                if rule.kind == "secret":
                    self._secret_passes.append((i, re.compile(f"(?:{keyword_alternation(words)}){VALUE_GRAMMAR}")))
                else:
                    self._keyword_passes.append((i, re.compile(keyword_alternation(words))))
        if main_rule is not None:
            rule = self.rules[main_rule]
            for n, (first, rest) in enumerate(keyword_branches([ascii_lower(w) for w in rule.keywords])):
                if rule.kind == "secret":
                    alternatives.append(f"{re.escape(first)}{rest}{value_grammar(str(n))}")
                    for name in ("strong", "weak", "bare"):
                        self._groups[f"{name}{n}"] = ("value", main_rule)
                else:
                    alternatives.append(f"{re.escape(first)}{rest}(?P<m{n}>)")
                    self._groups[f"m{n}"] = ("keyword", main_rule)
        code_words = sorted(self._code_owners)
        min_digits = min((r.min_digits for _, r in self._card_rules), default=0)
        digit_alternatives: list[str] = []
        for index, digit in enumerate(_DIGITS):  # full-width digits are folded before scanning
            code = card = None
            if code_words:
                code = code_rest(f"c{index}", f"q{index}", code_words)
                self._groups[f"c{index}"] = self._groups[f"q{index}"] = ("code", -1)
            if min_digits:
                card = card_rest(f"k{index}", min_digits)
                self._groups[f"k{index}"] = ("card", -1)
            if code or card:
                digit_alternatives.append(digit_alternative(digit, code, card))
        # Every alternative starts with a literal character of its own, so their order does not
        # change what matches; digits first: digit runs are the most frequent candidates.
        alternatives = digit_alternatives + alternatives
        self._main_pass = re.compile("|".join(alternatives)) if alternatives else None
        self._more_passes = bool(self._secret_passes or self._keyword_passes or self._regex_rules)

    @property
    def main_pattern(self) -> re.Pattern[str] | None:
        """The compiled main pass (see the module docstring); benchmarks time it alone."""
        return self._main_pass

    # --- scanning ----------------------------------------------------------------------------

    def needs_folding(self, text: str) -> bool:
        """Whether `find` folds `text` before scanning it: the text holds a look-alike the patterns
        do not accept as it is (zero-width characters, full-width letters or digits, circled
        digits, ligatures, accents, …), or custom regex rules, written against the folded copy,
        are active. Most text needs none: ASCII, CJK, full-width punctuation, ideographic spaces."""
        return bool(self._regex_rules) or not (text.isascii() or self._lookalike_search(text) is None)

    def find(self, text: str, *, fast: bool = True) -> list[tuple[int, int, int]]:
        """(rule index, start, end) of every finding in the original `text`, sorted, unique.

        Fast path: text that needs no folding is scanned as it is, with no folded copy and no
        offset map; other text has only its look-alikes folded. `fast=False` takes the reference
        path for every text instead: fold all of it, scan the folded copy, map the spans back.
        Both give the same findings (tests/test_safety_fastpath.py compares them)."""
        if fast and not self._regex_rules:
            if text.isascii() or self._lookalike_search(text) is None:
                # Needs no folding (`needs_folding`, inlined: this runs once per message).
                hits = self._scan(text)
                if not hits:
                    return hits  # type: ignore[return-value]
                if len(hits) == 1:
                    return [hits[0][:3]]
                return sorted({hit[:3] for hit in hits}, key=_finding_order)
            # Fold only the look-alikes; the patterns accept full-width punctuation as it is.
            folded = fold(text, self._lookalike_re)
        else:
            folded = fold(text)
        span_to_raw = folded.span_to_raw
        found = {(rule, *span_to_raw(start, end)) for rule, start, end, _ in self._scan(folded.norm)}
        return sorted(found, key=_finding_order)

    def scan(self, text: str, min_end: int = 0) -> list[Hit]:
        """Every finding in `text` (original without look-alikes, or folded), possibly repeated.
        `min_end`: findings that end at or before it may be left out (a stream's emitted context)."""
        return [Hit(*hit) for hit in self._scan(text, min_end)]

    def _scan(self, text: str, min_end: int = 0) -> list[tuple[int, int, int, int]]:
        """`scan` as (rule, start, end, trigger) tuples: `find` needs no Hit objects."""
        hits: list[tuple[int, int, int, int]] = []
        if self._main_pass is not None:
            search = self._main_pass.search
            groups = self._groups
            match = search(text)
            while match is not None:
                kind, rule = groups[match.lastgroup]  # type: ignore[index]
                start, position = match.span()
                if kind == "value":
                    value = value_from_match(text, match)
                    if value is not None:
                        hits.append((rule, value.start, value.end, start))
                elif kind == "card":
                    for card_rule, first, last in card_hits(text, start, position, self._card_rules, min_end):
                        hits.append((card_rule, first, last, first))
                elif kind == "code":
                    marker = "q" + match.lastgroup[1:]  # type: ignore[index]
                    keyword = ascii_lower(fold_string(match.group(marker)))
                    code_end = match.start("c" + marker[1:])
                    for owner in self._code_owners.get(keyword, ()):
                        hits.append((owner, start, code_end, start))
                    # The code keyword may itself be followed by a value ("…验证码：5678").
                    position = match.start(marker)
                else:
                    hits.append((rule, start, position, start))
                match = search(text, position)
        if not self._more_passes:
            return hits
        for rule, regex in self._secret_passes:
            for match in regex.finditer(text):
                value = value_from_match(text, match)
                if value is not None:
                    hits.append((rule, value.start, value.end, match.start()))
        for rule, regex in self._keyword_passes:
            for match in regex.finditer(text):
                hits.append((rule, match.start(), match.end(), match.start()))
        for rule in self._regex_rules:
            pattern = self.rules[rule].pattern
            assert pattern is not None
            for match in pattern.finditer(text):
                if match.end() > match.start():
                    hits.append((rule, match.start(), match.end(), match.start()))
        return hits

    # --- streams -----------------------------------------------------------------------------

    def hold_start(self, norm: str) -> int:
        """Earliest index of the folded text `norm` a stream must hold back: a finding could
        still start at or before it and reach past the end, or change with text to come."""
        length = len(norm)
        hold = length
        for size in range(min(self._max_keyword_chars, length), 0, -1):
            if ascii_lower(norm[length - size :]) in self._open_suffixes:
                hold = length - size
                break
        if self._card_tail_re is not None:
            match = self._card_tail_re.search(norm, max(0, length - self._card_tail_window))
            if match is not None:
                hold = min(hold, match.start())
        if self._code_tail_re is not None:
            match = self._code_tail_re.search(norm, max(0, length - 40))
            if match is not None:
                hold = min(hold, match.start())
        if self._secret_words:
            hold = min(hold, self._secret_hold(norm))
        if self._regex_hold:
            hold = min(hold, length - self._regex_hold)
        return max(hold, 0)

    def _secret_hold(self, norm: str) -> int:
        length = len(norm)
        token = TRAILING_TOKEN.search(norm, max(0, length - _TRAILING_TOKEN_WINDOW))
        assert token is not None  # the pattern matches the empty string at the end
        token_start = token.start()
        assert self._secret_keyword_re is not None
        search = self._secret_keyword_re.search
        hold = length
        match = search(norm, max(0, token_start - SECRET_BRIDGE_MAX_CHARS - self._max_keyword_chars))
        while match is not None:
            start = match.start()
            matched = ascii_lower(match.group())
            # The matched keyword and every shorter secret keyword it starts with.
            for size in range(len(matched), 0, -1):
                if matched[:size] not in self._secret_words:
                    continue
                if size < len(matched) and _is_ascii_letter(matched[size - 1]) and _is_ascii_letter(matched[size]):
                    continue  # a shorter ASCII keyword inside a longer word
                keyword_end = start + size
                value = secret_value(norm, keyword_end)
                if value is not None:
                    if not value.settled:
                        # A value the next text may still change ("8-20" before "位", "384 "
                        # before "920") is held whole.
                        hold = min(hold, value.start)
                    elif value.token_end == length:
                        # A settled value is redacted as far as it goes; hold only what may
                        # still be trailing punctuation.
                        hold = min(hold, value.end)
                elif token_start < length and token_start - keyword_end <= SECRET_BRIDGE_MAX_CHARS:
                    # A value may be arriving: the trailing token, or right after the keyword
                    # when the keyword is part of that token ("OTP-12", "pwd:ab").
                    hold = min(hold, max(token_start, keyword_end))
            match = search(norm, start + 1)
        return hold
