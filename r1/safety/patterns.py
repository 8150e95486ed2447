"""Regex building blocks of the built-in rules, tolerant of full-width forms.

Every pattern here matches a text and its folded copy alike: wherever it expects ASCII
punctuation it also accepts the full-width form (：, ＝, （, ＂), wherever it expects a space the
ideographic space, and ASCII case is ignored. Those are the look-alikes of everyday Chinese text;
a text holding any other (full-width letters or digits, zero-width characters, circled digits,
ligatures, accents, …) is folded first (see `Scanner.find`). So most text is scanned as it is,
with positions that are positions in the original.

Patterns avoid backtracking that grows with the input (possessive quantifiers, lookbehinds that
skip positions inside a digit run), and every alternation starts with a literal character so
that `re` skips ahead in C to where a match can begin.
"""

from __future__ import annotations

import re

from r1.safety.normalize import char_class

# Characters (besides ASCII) the patterns accept directly: full-width punctuation (ubiquitous in
# Chinese text) and the ideographic space. Full-width letters and digits are rarer and are folded.
RAW_SAFE = frozenset(chr(cp) for cp in range(0xFF01, 0xFF5F) if not chr(cp - 0xFEE0).isalnum()) | {"\u3000"}


def full_width(char: str) -> str | None:
    if "!" <= char <= "~":
        return chr(ord(char) + 0xFEE0)
    if char == " ":
        return "\u3000"
    return None


def unfold_variants(char: str, ignore_case: bool = True) -> set[str]:
    """The characters the patterns accept for `char` in the original text: the other ASCII
    case of a letter (when ignore_case), the full-width form of punctuation, the ideographic
    space for a space. (Full-width letters and digits are folded before scanning.)"""
    if char.isascii() and char.isalpha():
        return {char.lower(), char.upper()} if ignore_case else {char}
    if char.isascii() and char.isdigit():
        return {char}
    fw = full_width(char)
    return {char, fw} if fw else {char}


def tolerant_class(chars: str | set[str], ignore_case: bool = False) -> str:
    """A pattern for one of `chars` or its accepted variants. Written as an ASCII class or a
    non-ASCII class, so that `re` compiles it as two small sets rather than a 64K bitmap."""
    out: set[str] = set()
    for char in chars:
        out |= unfold_variants(char, ignore_case)
    ascii_part = {c for c in out if c.isascii()}
    other = out - ascii_part
    if not other:
        return char_class(ascii_part)
    other_pattern = char_class(other) if len(other) > 1 else re.escape(next(iter(other)))
    return f"(?:{char_class(ascii_part)}|{other_pattern})" if ascii_part else other_pattern


def tolerant_word(word: str) -> str:
    """A pattern for `word`, ASCII case ignored, full-width punctuation accepted."""
    parts = []
    for char in word:
        variants = unfold_variants(char)
        parts.append(re.escape(char) if len(variants) == 1 else char_class(variants))
    return "".join(parts)


DIGIT = tolerant_class("0123456789")
LETTER = tolerant_class("abcdefghijklmnopqrstuvwxyz", ignore_case=True)
SPACE = tolerant_class(" \t")

# --- card numbers -----------------------------------------------------------------------------

# Separators between digit groups (NBSP and other spaces fold to " ", the full-width hyphen to "-").
CARD_SEPARATORS = " \t-\u2010\u2011\u2012\u2013\u2014\u2015\u2212\u3000\uff0d"
CARD_SEPARATOR = char_class(set(CARD_SEPARATORS))
CARD_MAX_SEPARATORS = 3
DIGIT_GROUP_RE = re.compile(f"{DIGIT}+")

# --- secrets ----------------------------------------------------------------------------------

_PRINTABLE = set(map(chr, range(0x21, 0x7F)))
# Filler between a keyword and its connector ("密码已经重置为…"): anything but ASCII, spaces and
# punctuation (a small negated class compiles and matches fast; a CJK range would not compile fast).
_BRIDGE = "[^\\x00-\\x7f\u3000-\u303f\uff00-\uffef]"
# Characters of a secret value: printable ASCII except "," (in Chinese text the full-width comma
# ends the value: "验证码：384920，5分钟内有效"). A value does not start with a connector or quote
# character, so where a value starts never depends on text that has not arrived yet.
VALUE_CHAR = tolerant_class(_PRINTABLE - {","})
_VALUE_START = tolerant_class(_PRINTABLE - set(",:=\"'([{<"))
_CONNECTOR_SIGN = tolerant_class(":=")
# What may open a value: a quote or a bracket ("验证码【384920】", "PIN (1234)"). Not a value's own
# first character, so where a value starts never depends on text that has not arrived yet.
_OPENER = char_class(set("\"'“‘「『【〔〖（［(<[{") | {"\uff02", "\uff07"})
# A short aside between a keyword and its connector: "密码（新）：…", "新密码(8位)：…".
_ASIDE = "[(（][^()（）\n]{0,10}[)）]"
# Spaces, then at most one line break and more spaces: "密码：\nabc123".
_GAP = f"{SPACE}{{0,3}}(?:\r?\n{SPACE}{{0,3}})?"
# A quote closing a keyword that is a key ("password": "hunter2", {'otp': '384920'}: a tool call's
# arguments, JSON, a Python dict).
_KEY_CLOSE = tolerant_class("\"'")
# Words that make a keyword a topic, not a secret's label: 密码学 (cryptography), 密码算法, ….
_NOT_A_LABEL = "(?!学|算法|分析|体制|协议|技术|破译)"
_DIGIT_SEPARATOR = tolerant_class(" -")
# A value of digit groups separated by single spaces/dashes ("384 920", "3 8 4 9 2 0"): one value,
# not a first group followed by text.
_SPACED_DIGITS = f"{DIGIT}{{1,4}}+(?:{_DIGIT_SEPARATOR}{DIGIT}{{1,4}}+)++(?!{DIGIT})"
# A value that contains a digit within its first 64 characters.
_WITH_DIGIT = f"(?={VALUE_CHAR}{{0,63}}{DIGIT}){_VALUE_START}{VALUE_CHAR}{{2,}}+"
_WEAK = "|".join(tolerant_word(w) for w in ("is", "was", "are"))
# What may follow a secret keyword before its value:
# - strong: a connector (是/为/成, ":" or "="), optionally after up to six CJK characters
#   ("密码已经重置为abc123", "密码如下：abc123", "CVV码：123") or a short aside in brackets
#   ("密码（新）：abc123"), then spaces and at most one line break; then any printable ASCII value
#   (4+ characters, or 3 digits),
# - weak: English "is/was/are"; the value must contain a digit ("password is hunter2"),
# - bare: nothing; the value must contain a digit ("验证码384920", "OTP 123456").
# A quote may close a keyword that is a key, and a quote or bracket may open the value in each
# case. Not after words that make the keyword a topic (密码学, 密码算法).
def value_grammar(tag: str = "") -> str:
    """VALUE_GRAMMAR with its value groups named strong{tag}, weak{tag}, bare{tag}."""
    return (
        f"{_NOT_A_LABEL}{_KEY_CLOSE}?{SPACE}{{0,3}}(?:"
        f"(?:{_BRIDGE}{{0,6}}?(?:是|为|成)了?{SPACE}{{0,2}}{_CONNECTOR_SIGN}?"
        f"|{_BRIDGE}{{0,6}}?(?:{_ASIDE})?{SPACE}{{0,2}}{_CONNECTOR_SIGN})"
        f"{_GAP}{_OPENER}?{SPACE}{{0,2}}"
        f"(?P<strong{tag}>{_SPACED_DIGITS}|{_VALUE_START}{VALUE_CHAR}{{2,}}+)"
        f"|(?:{_WEAK}){SPACE}{{1,3}}{_OPENER}?(?P<weak{tag}>{_SPACED_DIGITS}|{_WITH_DIGIT})"
        f"|{_OPENER}?(?P<bare{tag}>{_SPACED_DIGITS}|{_WITH_DIGIT})"
        ")"
    )


VALUE_GRAMMAR = value_grammar()
VALUE_AFTER_KEYWORD = re.compile(VALUE_GRAMMAR)
# Longest distance from a keyword's end to its value's start allowed by the grammar above: key
# quote (1), spaces (3), bridge (6), aside (12), spaces (2), connector (1), gap (3 + 2 + 3), opener
# (1), spaces (2).
SECRET_BRIDGE_MAX_CHARS = 34
# A value token (optionally after groups of spaced digits) at the end of a folded text: a secret
# value that may still be growing (streams).
TRAILING_TOKEN = re.compile(f"(?:[0-9]{{1,4}}[ \\-])*{VALUE_CHAR}*\\Z")
# The separators after which a value of digit groups may still go on ("384 " before "920").
DIGIT_SEPARATORS = frozenset(" -\u3000\uff0d")

# The code before a code keyword: "384920是您的验证码", "384920（动态验证码）", "1234 is your OTP".
_YOUR = tolerant_word("your")
# What a code keyword may be qualified with: "384920是您的登录验证码", "…为您的注册验证码".
CODE_QUALIFIERS = ("登录", "登陆", "注册", "支付", "交易", "身份", "安全", "绑定", "转账", "提现", "实名", "找回密码", "重置密码", "修改密码")
_QUALIFIER = "|".join(CODE_QUALIFIERS)
# Every proper prefix of a qualifier, and the qualifiers themselves (a stream's partial filler).
_QUALIFIER_PARTIAL = "|".join(sorted({q[:n] for q in CODE_QUALIFIERS for n in range(1, len(q) + 1)}, key=len, reverse=True))
CODE_FILLER = (
    f"{SPACE}{{0,2}}[(\\[【（［，,]?{SPACE}{{0,2}}(?:是|为|{tolerant_word('is')})?{SPACE}?"
    f"(?:您的|你的|您|你|{_YOUR})?{SPACE}?(?:本次)?(?:的)?(?:{_QUALIFIER})?(?:的)?(?:短信)?(?:动态)?"
)
_CODE_FILLER_PARTIAL = (
    f"{SPACE}{{0,2}}[(\\[【（［，,]?{SPACE}{{0,2}}(?:是|为|{tolerant_word('is')}|{tolerant_word('i')})?{SPACE}?"
    f"(?:您的?|你的?|{_YOUR}|{tolerant_word('you')}|{tolerant_word('yo')}|{tolerant_word('y')})?{SPACE}?(?:本次?)?(?:的)?"
    f"(?:{_QUALIFIER_PARTIAL})?(?:的)?(?:短信?)?(?:动态?)?"
)


def code_rest(marker: str, keyword_group: str, code_keywords: list[str]) -> str:
    """After a code's first digit: the rest of the code (4–8 digits in all), filler, then a code
    keyword. `marker` (an empty group) marks the code's end; `keyword_group` captures the keyword."""
    return (
        f"{DIGIT}{{3,7}}+(?!{DIGIT})(?P<{marker}>)"
        f"{CODE_FILLER}(?P<{keyword_group}>{keyword_alternation(code_keywords)})"
    )


def code_tail_re(code_keywords: list[str]) -> re.Pattern[str]:
    """Matches, at the end of a folded text, a code that a code keyword may still follow."""
    # Proper prefixes, and whole keywords ending in an ASCII letter ("OTP" may yet be "OTPs").
    prefixes = {kw[:n] for kw in code_keywords for n in range(1, len(kw))}
    prefixes |= {kw for kw in code_keywords if kw[-1].isascii() and kw[-1].isalpha()}
    keyword_prefix = "|".join(tolerant_word(p) for p in sorted(prefixes, key=len, reverse=True))
    keyword_part = f"(?:{keyword_prefix})?" if keyword_prefix else ""
    return re.compile(f"(?<![0-9A-Za-z])[0-9]{{1,8}}(?:{_CODE_FILLER_PARTIAL}{keyword_part})?\\Z")


def card_rest(marker: str, min_digits: int) -> str:
    """After a card candidate's first digit: the rest of a digit chain of at least `min_digits`
    digits; `marker` (an empty group) marks its end. Separators and digits are disjoint, so each
    step of the chain matches in one way only and the quantifiers can be possessive: a chain too
    short fails without `re` retrying shorter separator runs."""
    chain = f"(?:{CARD_SEPARATOR}{{0,{CARD_MAX_SEPARATORS}}}+{DIGIT}){{{min_digits - 1},}}+"
    return f"{chain}(?P<{marker}>)"


def digit_alternative(digit: str, code: str | None, card: str | None) -> str:
    """The main pass's alternative for the literal `digit`: a code (`code`, from `code_rest`;
    tried first) or else a card candidate (`card`, from `card_rest`). Neither starts inside a
    digit run (a start there could only give a shorter run), nor a code right after a letter.
    One alternative per digit, not one per kind: `re` walks the list of alternatives at every
    candidate position, so a shorter list is a faster scan."""
    parts = []
    if code:
        parts.append(f"(?<!{LETTER}{re.escape(digit)}){code}")
    if card:
        parts.append(card)
    return f"{re.escape(digit)}(?<!{DIGIT}{re.escape(digit)})(?:{'|'.join(parts)})"


def card_tail_re(held_digits: int) -> re.Pattern[str]:
    """Matches the last `held_digits` digits (with separators) at the end of a folded text."""
    return re.compile(
        f"[0-9](?:{CARD_SEPARATOR}{{0,{CARD_MAX_SEPARATORS}}}[0-9]){{0,{held_digits - 1}}}{CARD_SEPARATOR}{{0,{CARD_MAX_SEPARATORS}}}\\Z"
    )


# --- keywords ---------------------------------------------------------------------------------


def keyword_branches(words: list[str], boundaries: bool = True) -> list[tuple[str, str]]:
    """(first character, alternation of the rests) for `words` (folded): ASCII case ignored,
    full-width forms accepted, longest first. With `boundaries`, a word that starts (ends) with
    an ASCII letter must not follow (precede) another ASCII letter."""
    by_first: dict[str, list[str]] = {}
    for word in words:
        # Full-width first letters and digits are folded before scanning (they are not RAW_SAFE).
        for variant in sorted({word[0].lower(), word[0].upper()} if word[0].isascii() else {word[0]}):
            by_first.setdefault(variant, []).append(word)
    branches = []
    for first, group in by_first.items():
        bodies = []
        for word in sorted(set(group), key=len, reverse=True):
            body = tolerant_word(word[1:])
            if boundaries and word[-1].isascii() and word[-1].isalpha():
                body += f"(?!{LETTER})"
            bodies.append(body)
        # The words of a group share their first character, so the check that it does not follow
        # a letter is made once, before the alternatives: each of them then starts with a literal
        # or a class that `re` tests without entering the branch.
        lead = f"(?<!{LETTER}.)" if boundaries and first.isascii() and first.isalpha() else ""
        branches.append((first, lead + "(?:" + "|".join(bodies) + ")"))
    return branches


def keyword_alternation(words: list[str], boundaries: bool = True) -> str:
    """An alternation matching any of `words` whose alternatives each start with a literal
    character, so `re` skips ahead in C to candidate positions."""
    return "|".join(re.escape(first) + rest for first, rest in keyword_branches(words, boundaries))
