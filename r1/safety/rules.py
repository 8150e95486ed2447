"""Rule kinds of the safety filter and the matching logic that is specific to each kind.

Every rule decides on the folded copy of a text (r1/safety/normalize.py): full-width digits,
zero-width characters and other look-alikes count as what they look like. (The scanner runs the
built-in kinds on the original text when that gives the same answer; see scanner.py.) Four kinds:

- keyword: literal words found anywhere. No word-boundary assumption: CJK text has no spaces, so
  "我的信用卡号" contains 信用卡. A keyword that starts or ends with an ASCII letter must not
  touch another ASCII letter on that side ("otp" does not fire inside "hotpot"); ASCII case is
  ignored.
- regex: a user pattern, matched as written against the folded copy.
- card_number: runs of `min_digits`..`max_digits` digits, contiguous or in groups separated by up
  to three spaces/dashes (zero-width characters and full-width digits count after folding), so
  "6222 0212-3456 7890", "６２２２…" and "卡号6222021234567890号" all count. A window is a run of
  whole groups; `luhn` decides which windows fire: `valid` (Luhn checksum passes: a real card
  number), `invalid` (fails: order and tracking numbers are usually 16–19 digits too), `any`.
  The default profile redacts valid windows and only flags invalid ones; see profiles.py.
  A contiguous run longer than `max_digits` is not a card number (it holds no window).
- secret: the value after a keyword ("密码是abc123", "验证码：384920", "password: hunter2",
  "OTP 123456") and a short digit code written before a code keyword ("384920是您的验证码").
  Only the value is a finding; "忘记密码怎么办" has no value and passes.

Rule actions are chosen per direction; `off` removes the rule from that direction's scanner.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, NamedTuple

from r1.config import SafetyRuleConfig
from r1.safety.normalize import fold_char, fold_string
from r1.safety.patterns import CARD_MAX_SEPARATORS, DIGIT_GROUP_RE, DIGIT_SEPARATORS, VALUE_AFTER_KEYWORD

Direction = Literal["input", "output"]
RuleAction = Literal["block", "redact", "flag", "off"]
DIRECTIONS: tuple[Direction, ...] = ("input", "output")

_TRAILING_PUNCTUATION = ".,;:!?)]}>'\""
# "8-20位", "8-20 个字符": a quantity, not a value.
_QUANTITY_CHARS = "0123456789-~"
_QUANTITY_UNITS = "位个次天秒分小字"
_UNIT_GAP = " \t\u3000"
SECRET_MIN_VALUE_CHARS = 4


@dataclass(frozen=True)
class Rule:
    """A validated rule with folded keywords and a compiled pattern."""

    rule_id: str
    kind: Literal["keyword", "regex", "card_number", "secret"]
    input_action: RuleAction
    output_action: RuleAction
    keywords: tuple[str, ...] = ()
    code_keywords: tuple[str, ...] = ()
    pattern: re.Pattern[str] | None = None
    # regex: how many trailing characters a stream holds back for this rule.
    hold_chars: int = 0
    min_digits: int = 16
    max_digits: int | None = 19
    luhn: Literal["valid", "invalid", "any"] = "valid"

    def action(self, direction: Direction) -> RuleAction:
        return self.input_action if direction == "input" else self.output_action


def compile_rule(config: SafetyRuleConfig, input_action: RuleAction | None = None, output_action: RuleAction | None = None) -> Rule:
    """Turn a rule config into a `Rule`; raise ValueError for patterns a stream cannot bound."""
    keywords = tuple(dict.fromkeys(fold_string(word.strip()) for word in config.keywords))
    code_keywords = tuple(dict.fromkeys(fold_string(word.strip()) for word in config.code_keywords))
    if "" in keywords or "" in code_keywords:  # e.g. only zero-width characters or a lone combining mark
        raise ValueError(f"rule {config.id!r}: a keyword is empty once normalized (NFKC, zero-width characters "
                         "removed); give it visible characters")
    pattern = None
    hold_chars = 0
    if config.kind == "regex":
        assert config.pattern is not None
        pattern = re.compile(config.pattern)
        hold_chars = _regex_hold_chars(config.id, config.pattern, config.max_match_chars)
    return Rule(
        rule_id=config.id,
        kind=config.kind,
        input_action=input_action or config.input,
        output_action=output_action or config.output,
        keywords=keywords,
        code_keywords=code_keywords,
        pattern=pattern,
        hold_chars=hold_chars,
        min_digits=config.min_digits,
        max_digits=config.max_digits,
        luhn=config.luhn,
    )


def _lookbehind_chars(parsed) -> int:
    """The widest lookbehind in a parsed pattern: text before a match that decides it, which a
    stream's kept left context must reach back over."""
    from re import _constants, _parser

    widest = 0
    stack = [parsed]
    while stack:
        item = stack.pop()
        if isinstance(item, _parser.SubPattern):
            for op, av in item.data:
                if op in (_constants.ASSERT, _constants.ASSERT_NOT) and av[0] < 0:
                    widest = max(widest, av[1].getwidth()[1])
                stack.append(av)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return widest


def _regex_hold_chars(rule_id: str, pattern: str, max_match_chars: int | None) -> int:
    # A stream must hold back the longest match plus one character of right context (\b, $); the
    # hold also sizes the left context it keeps, which must cover any lookbehind.
    from re import _parser  # the stdlib's own pattern parser (Python >= 3.11)

    parsed = _parser.parse(pattern)
    _, max_width = parsed.getwidth()
    lookbehind = _lookbehind_chars(parsed)
    if lookbehind > 4096:
        raise ValueError(f"rule {rule_id!r}: pattern {pattern!r} looks behind {lookbehind} characters; at most 4096")
    if max_match_chars is not None:
        if max_width < _parser.MAXREPEAT and max_width > max_match_chars:
            raise ValueError(f"rule {rule_id!r}: max_match_chars={max_match_chars} is shorter than the longest "
                             f"match of {pattern!r} ({max_width} characters); a stream would emit part of it")
        return lookbehind + max_match_chars + 1
    if "(?=" in pattern or "(?!" in pattern:
        raise ValueError(
            f"rule {rule_id!r}: pattern uses lookahead; set max_match_chars to the longest span the "
            "match and its lookahead can cover"
        )
    if max_width >= _parser.MAXREPEAT or max_width > 4096:
        raise ValueError(
            f"rule {rule_id!r}: pattern {pattern!r} can match unboundedly long text; set max_match_chars "
            "(the longest match you want streams to catch) or bound the repetition, e.g. {1,64}"
        )
    return lookbehind + max(int(max_width), 1) + 1


# --- card numbers -----------------------------------------------------------------------------

# Every second digit from the right is doubled and its digits summed: 0→0, 1→2, …, 5→1 (10), ….
_DOUBLED_DIGIT = bytes.maketrans(b"0123456789", b"0246813579")


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) checksum used by payment card numbers (ASCII digits).

    Summed as bytes (each ASCII digit is its value + 48), so that no Python code runs per digit:
    every 16–19-digit run is checked, most of them order numbers."""
    raw = digits.encode("ascii")
    total = sum(raw[-1::-2]) + sum(raw[-2::-2].translate(_DOUBLED_DIGIT)) - 48 * len(raw)
    return total % 10 == 0


def card_hits(norm: str, start: int, end: int, rules: list[tuple[int, Rule]], min_end: int = 0) -> list[tuple[int, int, int]]:
    """(rule index, start, end) of every card rule's windows in the candidate norm[start:end].

    A window is a run of whole digit groups; each rule's windows are merged into spans. The Luhn
    checksum of a window is computed once for all rules. `min_end`: the caller needs only windows
    that end after it (a stream's new text); windows that start too early to reach it are skipped,
    so a long chain ("1 2 3 4 …") costs work for its tail only (the spans may then start later)."""
    candidate = norm[start:end]
    if candidate.isdigit():  # one contiguous group: the only window is the whole run
        digits = candidate if candidate.isascii() else fold_string(candidate)
        count = len(digits)
        out = []
        valid = None
        for index, rule in rules:
            if count < rule.min_digits or (rule.max_digits is not None and count > rule.max_digits):
                continue
            if rule.luhn != "any":
                if valid is None:
                    valid = luhn_valid(digits)
                if valid != (rule.luhn == "valid"):
                    continue
            out.append((index, start, end))
        return out
    groups = [(m.start(), m.end()) for m in DIGIT_GROUP_RE.finditer(norm, start, end)]
    total = sum(e - s for s, e in groups)
    out = []
    bounded: list[tuple[int, Rule]] = []
    for index, rule in rules:
        if total < rule.min_digits:
            continue
        if rule.max_digits is None and rule.luhn == "any":
            out.append((index, groups[0][0], groups[-1][1]))
        else:
            bounded.append((index, rule))
    if not bounded:
        return out
    min_digits = min(rule.min_digits for _, rule in bounded)
    # A rule without max_digits is luhn=any (SafetyRuleConfig refuses a checksum on unbounded runs)
    # and took the branch above, so every rule here has its max_digits.
    max_digits = max(rule.max_digits for _, rule in bounded)
    spans: dict[int, list[tuple[int, int]]] = {index: [] for index, _ in bounded}
    group_digits = [fold_string(norm[s:e]) for s, e in groups]
    # The widest window: max_digits digits, each pair of groups apart by at most the separators.
    first_useful = min_end - (max_digits + (max_digits - 1) * CARD_MAX_SEPARATORS)
    for i, (first_start, _) in enumerate(groups):
        if first_start < first_useful:
            continue
        count = 0
        digits = ""
        for j in range(i, len(groups)):
            group_start, group_end = groups[j]
            count += group_end - group_start
            if count > max_digits:
                break
            digits += group_digits[j]
            if count < min_digits:
                continue
            valid = None
            for index, rule in bounded:
                if count < rule.min_digits or count > rule.max_digits:
                    continue
                if rule.luhn != "any":
                    if valid is None:
                        valid = luhn_valid(digits)
                    if valid != (rule.luhn == "valid"):
                        continue
                _add_span(spans[index], first_start, group_end)
    for index, rule_spans in spans.items():
        out.extend((index, s, e) for s, e in rule_spans)
    return out


def _add_span(spans: list[tuple[int, int]], start: int, end: int) -> None:
    # Windows arrive ordered by start; merge overlapping ones into one span.
    if spans and start <= spans[-1][1]:
        spans[-1] = (spans[-1][0], max(spans[-1][1], end))
    else:
        spans.append((start, end))


# --- secrets ----------------------------------------------------------------------------------


class SecretValue(NamedTuple):
    start: int
    end: int
    # End of the printable token the value was cut from; == len(text) means it may still grow.
    token_end: int
    # True when the value stays a finding whatever text follows (see `secret_value`).
    settled: bool


def secret_value(text: str, keyword_end: int) -> SecretValue | None:
    """The value following a secret keyword that ends at keyword_end, if any."""
    match = VALUE_AFTER_KEYWORD.match(text, keyword_end)
    return None if match is None else value_from_match(text, match)


_new_secret_value = tuple.__new__  # SecretValue without the keyword-argument constructor (hot path)


def value_from_match(text: str, match: re.Match[str]) -> SecretValue | None:
    """Finish a match of VALUE_GRAMMAR (on the original or the folded text): drop trailing
    punctuation, apply the length and quantity checks."""
    group = match.lastgroup
    assert group is not None and group.startswith(("strong", "weak", "bare"))
    start, token_end = match.span(group)
    end = token_end
    while end > start and (text[end - 1] if text[end - 1] < "\x80" else fold_char(text[end - 1])) in _TRAILING_PUNCTUATION:
        end -= 1
    value = text[start:end]
    if not value.isascii():
        value = fold_string(value)
    # Four characters at least; three when all digits (a CVV).
    if len(value) < SECRET_MIN_VALUE_CHARS and not (len(value) == 3 and value.isdigit()):
        return None
    # A quantity ("8-20"): only digits, "-" and "~" (value is not empty here), before a unit,
    # possibly after a space or two ("8-20 个字符").
    quantity = not value.strip(_QUANTITY_CHARS)
    length = len(text)
    unit = token_end
    while unit < length and unit - token_end < 2 and text[unit] in _UNIT_GAP:
        unit += 1
    if quantity and unit < length and text[unit] in _QUANTITY_UNITS:
        return None
    # Whether text still to come may change the value (streams hold back what is not settled): at
    # the very end, a quantity may become "8-20位" and spaced digits something else ("3 8 4 9x");
    # before only a separator, digit groups may gain a group ("384 " before "920"), and before
    # only spaces, a quantity its unit ("8-20 " before "位").
    if token_end == length:
        settled = not (quantity or " " in value)
    else:
        grows = (token_end + 1 == length and text[token_end] in DIGIT_SEPARATORS and value[-1].isdigit()
                 and not value.strip("0123456789 -"))
        settled = not (grows or (quantity and unit == length))
    return _new_secret_value(SecretValue, (start, end, token_end, settled))
