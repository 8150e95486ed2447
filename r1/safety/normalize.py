"""The detection copy of a text: compatibility folding with a map back to the original.

Safety rules never match the text a user or a model wrote; they match a *folded* copy, so that
full-width digits (６２２２), circled or mathematical digits (①, 𝟔), other scripts' digits (٦),
full-width Latin (ｐａｓｓｗｏｒｄ) and zero-width characters inside a word cannot hide a card
number or a keyword. Folding one character means:

1. NFKD compatibility decomposition (the compatibility mapping of NFKC: full-width → ASCII,
   ideographic space → space, ① → 1, ligatures split),
2. drop combining marks (Mn, Me) and format characters (Cf: zero-width space and joiners, word
   joiner, BOM, soft hyphen, bidi controls, tag characters),
3. recompose (NFC), and map every decimal digit of any script to its ASCII digit.

Case is kept; rules that ignore case say so themselves. Folding is per character, so the folded
copy of a concatenation is the concatenation of the folded copies (streams rely on this).

`Folded` maps every folded offset back to the original, so a span found in the folded copy is
redacted in the original text. Pure-ASCII text folds to itself without a copy, and the scanner
builds no copy at all for text whose only look-alikes its patterns accept as they are
(full-width punctuation, ideographic spaces; r1/safety/scanner.py).

Not covered: cross-script homoglyphs (Cyrillic "а" for Latin "a"), numbers spelled as words
(六二二二), letters standing in for digits (O for 0).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

_DROPPED_CATEGORIES = frozenset({"Mn", "Me", "Cf"})
_SKIPPED_CATEGORIES = frozenset({"Cn", "Co", "Cs"})
# Blocks whose characters all fold to themselves (no compatibility decomposition; Hangul syllables
# decompose canonically and recompose), skipped to keep the one-time table build short.
_IDENTITY_BLOCKS = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x20000, 0x2F7FF), (0x30000, 0x323AF))


def _fold_char_uncached(char: str) -> str:
    category = unicodedata.category(char)
    if category in _DROPPED_CATEGORIES:
        return ""
    if category == "Nd":
        return str(unicodedata.decimal(char))
    if not unicodedata.decomposition(char):
        return char
    decomposed = unicodedata.normalize("NFKD", char)
    kept = "".join(c for c in decomposed if unicodedata.category(c) not in _DROPPED_CATEGORIES)
    composed = unicodedata.normalize("NFC", kept)
    return "".join(str(unicodedata.decimal(c)) if unicodedata.category(c) == "Nd" else c for c in composed)


@dataclass(frozen=True)
class FoldTable:
    """Every non-ASCII character whose folded form differs from itself."""

    fold: dict[str, str]
    # Characters folding to zero or several characters (they shift offsets).
    length_changing: frozenset[str]
    special_re: re.Pattern[str]


@functools.cache
def fold_table() -> FoldTable:
    """Build the table once per process (about 0.3 s)."""
    fold: dict[str, str] = {}
    code_point = 0x80
    blocks = iter(_IDENTITY_BLOCKS)
    next_block = next(blocks)
    while code_point < 0x110000:
        if next_block and code_point == next_block[0]:
            code_point = next_block[1] + 1
            next_block = next(blocks, None)
            continue
        char = chr(code_point)
        code_point += 1
        if unicodedata.category(char) in _SKIPPED_CATEGORIES:
            continue
        folded = _fold_char_uncached(char)
        if folded != char:
            fold[char] = folded
    length_changing = frozenset(c for c, f in fold.items() if len(f) != 1)
    return FoldTable(
        fold=fold,
        length_changing=length_changing,
        special_re=re.compile(rare_char_pattern(fold)),
    )


def fold_char(char: str) -> str:
    """The folded form of one character."""
    if char < "\x80":
        return char
    return fold_table().fold.get(char, char)


def fold_string(text: str) -> str:
    """The folded copy of `text`, without offsets (for keywords and configuration)."""
    if text.isascii():
        return text
    table = fold_table()
    return table.special_re.sub(lambda m: table.fold[m.group()], text)



class Folded:
    """A text and its folded copy, with offset maps in both directions.

    Offsets are tracked only at characters whose folded form is not exactly one character long
    (zero-width characters, ligatures, ㍱ → hPa); everything between them maps one to one.
    """

    __slots__ = ("text", "norm", "_norm_starts", "_raw_positions", "_fold_lengths", "_shift_after")

    def __init__(self, text: str, norm: str, changes: list[tuple[int, int]]):
        self.text = text
        self.norm = norm
        # changes: (raw index, folded length) of every length-changing character, in order.
        self._norm_starts: list[int] = []
        self._raw_positions: list[int] = []
        self._fold_lengths: list[int] = []
        self._shift_after: list[int] = []
        shift = 0
        for raw_index, length in changes:
            self._norm_starts.append(raw_index + shift)
            self._raw_positions.append(raw_index)
            self._fold_lengths.append(length)
            shift += length - 1
            self._shift_after.append(shift)

    def to_raw(self, norm_index: int) -> int:
        """Index of the original character that produced norm[norm_index] (len(norm) → len(text))."""
        k = bisect_right(self._norm_starts, norm_index) - 1
        if k < 0:
            return norm_index
        start = self._norm_starts[k]
        if norm_index < start + self._fold_lengths[k]:
            return self._raw_positions[k]
        return norm_index - self._shift_after[k]

    def to_norm(self, raw_index: int) -> int:
        """Folded index where the original character at raw_index starts (len(text) → len(norm))."""
        k = bisect_left(self._raw_positions, raw_index)
        return raw_index + (self._shift_after[k - 1] if k else 0)

    def span_to_raw(self, start: int, end: int) -> tuple[int, int]:
        """Original span covering the folded span [start, end) (end > start), including any
        dropped (zero-width) characters up to the next folded character."""
        return self.to_raw(start), max(self.to_raw(end - 1) + 1, self.to_raw(end))


def fold(text: str, special_re: re.Pattern[str] | None = None) -> Folded:
    """Fold `text` for detection, keeping the offsets back to it. `special_re` (a pattern matching
    one character of the fold table) restricts folding to the characters it matches."""
    if text.isascii():
        return Folded(text, text, [])
    table = fold_table()
    fold_map = table.fold
    changes: list[tuple[int, int]] = []
    length_changing = table.length_changing

    def replace(match: re.Match[str]) -> str:
        folded = fold_map[match.group()]
        if match.group() in length_changing:
            changes.append((match.start(), len(folded)))
        return folded

    norm = (special_re or table.special_re).sub(replace, text)
    return Folded(text, norm, changes)


# Ranges holding most characters of real text (ASCII, Latin-1, CJK, Hangul, CJK punctuation,
# half/full-width forms). Matching one of a large set of rare characters is slow in `re` when the
# set reaches beyond the BMP (a linear range list); excluding the common ranges first with a BMP
# class (a bitmap) is fast, and the exact set is checked only at the rare characters.
_COMMON_RANGES = ((0x00, 0x24F), (0x2010, 0x2027), (0x3000, 0x303F), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xFF00, 0xFFEF))


@functools.cache
def _common_code_points() -> frozenset[int]:
    return frozenset(cp for first, last in _COMMON_RANGES for cp in range(first, last + 1))


def uncommon_class(chars) -> str:
    """A fast (BMP-bitmap) character class matching every character of `chars` and all
    characters outside the common ranges; check the exact set with a lookbehind after it."""
    common = _common_code_points() - {ord(c) for c in chars}
    return char_class(map(chr, common), negate=True)


def rare_char_pattern(chars) -> str:
    """A regex matching exactly one character of `chars`, fast to search for."""
    return f"{uncommon_class(chars)}(?<={char_class(chars)})"


def char_class(chars, negate: bool = False) -> str:
    """A regex character class matching exactly `chars` (ranges collapsed)."""
    points = sorted({ord(c) for c in chars})
    parts: list[str] = []
    i = 0
    while i < len(points):
        j = i
        while j + 1 < len(points) and points[j + 1] == points[j] + 1:
            j += 1
        first, last = _class_char(points[i]), _class_char(points[j])
        if j == i:
            parts.append(first)
        elif j == i + 1:
            parts.append(first + last)
        else:
            parts.append(f"{first}-{last}")
        i = j + 1
    if not parts:
        return "[^\\s\\S]" if not negate else "[\\s\\S]"
    return ("[^" if negate else "[") + "".join(parts) + "]"


def _class_char(code_point: int) -> str:
    char = chr(code_point)
    if char in "\\]^-[":
        return "\\" + char
    if code_point < 0x20 or code_point == 0x7F:
        return f"\\x{code_point:02x}"
    return char
