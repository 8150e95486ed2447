"""r1.safety fast paths: text scanned as it is (no folded copy) must get exactly the verdict of the
reference path that folds everything; card detection must match a brute-force reading of the
rules; the Luhn check must match the textbook algorithm."""

from __future__ import annotations

import random

import pytest

from r1.config import SafetyConfig, SafetyRuleConfig
from r1.safety import SafetyFilter, Verdict, luhn_valid
from r1.safety.patterns import CARD_SEPARATORS

ZW = "\u200b"
VISA = "4111111111111111"

CONFIGS = {
    "default": SafetyConfig(profile="default"),
    "strict": SafetyConfig(profile="strict"),
    # A keyword rule first: it takes the main pass; the secret rule gets its own pass.
    "keyword_first": SafetyConfig(
        profile="default",
        rules=[
            SafetyRuleConfig(id="codename", kind="keyword", keywords=["天穹计划", "skyline", "one-time", "Ab-c d"], input="flag"),
            SafetyRuleConfig(id="token", kind="secret", keywords=["token", "口令"]),
        ],
    ),
    # A custom regex rule: every text is folded (the pattern is written against the folded copy).
    "custom_regex": SafetyConfig(rules=[SafetyRuleConfig(id="employee_id", kind="regex", pattern=r"EMP-\d{6}")]),
}


@pytest.fixture(scope="module")
def filters() -> dict[str, SafetyFilter]:
    return {name: SafetyFilter(config) for name, config in CONFIGS.items()}


def reference_verdict(safety: SafetyFilter, text: str, direction: str) -> Verdict:
    """The verdict from the reference path: fold the whole text, scan, map spans back."""
    scanner = safety.scanner(direction)
    found = scanner.find(text, fast=False)
    if not found:
        return Verdict("allow", text, ())
    return safety._verdict(scanner, text, found)


def assert_same_as_reference(safety: SafetyFilter, text: str, direction: str = "input") -> Verdict:
    verdict = safety.check(text, direction)  # type: ignore[arg-type]
    assert verdict == reference_verdict(safety, text, direction), repr(text)
    if verdict.action == "allow":
        # Passed through unchanged: the very same string, byte for byte.
        assert verdict.text is text
    return verdict


# (text, scanned as it is?) — what the fast path must and must not take as it is.
PATH_CASES = [
    # ASCII
    ("my password is hunter2, card 4111 1111 1111 1111", True),
    # CJK with full-width punctuation and an ideographic space
    ("您好，请问：密码是abc123吗？　谢谢！", True),
    # a Luhn-invalid order number, CJK around it
    ("订单号2024031512345678901已签收。", True),
    # emoji without a variation selector
    ("好的👍，已经收到。", True),
    # full-width digits: folded
    ("卡号４１１１１１１１１１１１１１１１。", False),
    # a zero-width space inside the keyword
    (f"密{ZW}码是abc123", False),
    # zero-width non-joiners between the digits of a card
    ("卡号" + "\u200c".join(VISA), False),
    # full-width Latin keyword and value
    ("ｐａｓｓｗｏｒｄ： ａｂｃ１２３", False),
    # circled and mathematical digits
    ("验证码①②③④⑤⑥", False),
    ("卡号𝟒𝟏𝟏𝟏𝟏𝟏𝟏𝟏𝟏𝟏𝟏𝟏𝟏𝟏𝟏𝟏", False),
    # Arabic-Indic digits
    ("OTP ٦٥٤٣٢١", False),
    # NFKC changes these: ligature, unit sign, ellipsis, a combining accent, a soft hyphen
    ("ﬁle password: s3cr3t…", False),
    ("温度30℃，密码是abc123", False),
    ("cafe\u0301 pin 4321", False),
    ("pass\u00adword: abc123", False),
    # an emoji with a variation selector (dropped when folding): passes unchanged
    ("谢谢❤️稍等……", False),
]


@pytest.mark.parametrize("text,as_is", PATH_CASES)
def test_fast_path_takes_only_text_that_needs_no_folding(filters, text, as_is):
    safety = filters["default"]
    assert safety.scanner("input").needs_folding(text) is not as_is
    assert_same_as_reference(safety, text)


def test_fast_path_and_reference_give_findings_on_both_kinds_of_text(filters):
    # The cases above are not all passthroughs: both paths find the card and the secrets.
    safety = filters["default"]
    for text, _ in PATH_CASES[:3] + PATH_CASES[4:9]:
        assert safety.check(text).findings, text


def test_custom_regex_rules_fold_every_text(filters):
    scanner = filters["custom_regex"].scanner("input")
    assert scanner.needs_folding("plain ASCII text")
    verdict = assert_same_as_reference(filters["custom_regex"], "工号ＥＭＰ-１２３４５６，卡号4111111111111111")
    assert {f.rule_id for f in verdict.findings} == {"employee_id", "card_number"}


# Fragments the patterns read as they are, and look-alikes that make a text need folding.
PLAIN_FRAGMENTS = [
    "密码", "密", "码", "是", "为", "：", ":", "=", " ", "\u3000", "\t", "\n", "验证码", "您的", "本次", "动态", "短信", "口令",
    "password", "PASSWORD", "is ", "was", "are ", "OTP", "otp", "pin", "Pin码", "cvv2", "CVC", "one-time code",
    "one－time　code", "verification code", "auth code", "token", "skyline", "天穹计划", "Ab-c d", "ab－c　d", "EMP-",
    "abc", "x1", "hotpot", "your ", "4111", "1111", "6222", "0212", "123456", "8-20", "位", "0", "3", "5", "7", "9",
    VISA, "6212345678901234569", "2024031512345678901", "-", "－", ",", "，", "。", "！", "(", "（", "【",
    "\"", "“", "「", "'", "😀", "信用卡",
]
LOOKALIKE_FRAGMENTS = [
    ZW, "\u200c", "\ufeff", "\u00ad", "\u0301", "\u00a0", "–", "１", "４", "ａ", "Ａ", "①", "𝟔", "٦", "㍱", "ﬁ", "…", "℃",
    "❤\ufe0f", "é", "İ", "K", "ß",
]


def random_text(rng: random.Random) -> str:
    """Half the texts from plain fragments only (the fast path), half with look-alikes mixed in."""
    fragments = PLAIN_FRAGMENTS + (LOOKALIKE_FRAGMENTS if rng.random() < 0.5 else [])
    pieces = []
    for _ in range(rng.randint(0, 30)):
        if rng.random() < 0.9:
            pieces.append(rng.choice(fragments))
        else:  # any ASCII or CJK character
            pieces.append(chr(rng.choice([rng.randint(0x20, 0x7E), rng.randint(0x4E00, 0x4E40)])))
    return "".join(pieces)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_random_texts_fast_path_equals_reference(filters, name):
    # Seeded differential test: every verdict of check() equals the fold-everything reference.
    safety = filters[name]
    rng = random.Random(20240502)
    folded = {True: 0, False: 0}
    for _ in range(600):
        text = random_text(rng)
        direction = rng.choice(["input", "output"])
        folded[safety.scanner(direction).needs_folding(text)] += 1
        assert_same_as_reference(safety, text, direction)
    if name != "custom_regex":
        # Both paths were exercised, not just one of them.
        assert min(folded.values()) > 150, folded


# --- card numbers against a brute-force reading of the rules ----------------------------------

SEPARATORS = CARD_SEPARATORS


def brute_force_cards(text: str, min_digits: int = 16, max_digits: int = 19) -> set[tuple[str, int, int]]:
    """Card findings of the default profile, read off the rules one position at a time.

    A chain starts at a digit not preceded by a digit and runs over digit groups separated by one
    to three separators; a chain of min_digits+ digits is a candidate and the scan goes on after
    it. A window is a run of whole groups with min..max digits; valid (Luhn) windows are
    card_number, invalid ones card_number_unverified; each rule's overlapping or touching windows
    are merged."""
    found: set[tuple[str, int, int]] = set()
    position = 0
    while position < len(text):
        if not text[position].isdigit() or (position > 0 and text[position - 1].isdigit()):
            position += 1
            continue
        groups = []
        start = position
        while True:
            end = start
            while end < len(text) and text[end].isdigit():
                end += 1
            groups.append((start, end))
            gap = end
            while gap < len(text) and gap - end < 3 and text[gap] in SEPARATORS:
                gap += 1
            if gap > end and gap < len(text) and text[gap].isdigit():
                start = gap
                continue
            break
        if sum(e - s for s, e in groups) < min_digits:
            position += 1
            continue
        spans: dict[str, list[list[int]]] = {"card_number": [], "card_number_unverified": []}
        for i in range(len(groups)):
            digits = ""
            for j in range(i, len(groups)):
                digits += text[groups[j][0] : groups[j][1]]
                if min_digits <= len(digits) <= max_digits:
                    rule = "card_number" if luhn_reference(digits) else "card_number_unverified"
                    window = [groups[i][0], groups[j][1]]
                    if spans[rule] and window[0] <= spans[rule][-1][1]:
                        spans[rule][-1][1] = max(spans[rule][-1][1], window[1])
                    else:
                        spans[rule].append(window)
        found |= {(rule, s, e) for rule, windows in spans.items() for s, e in windows}
        position = groups[-1][1]
    return found


def luhn_reference(digits: str) -> bool:
    """The textbook Luhn check: double every second digit from the right, subtract 9 above 9."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def test_separator_set_is_what_the_rules_say():
    # The brute force reads the same separators as the patterns: spaces, dashes, ideographic space.
    assert {" ", "\t", "-", "\u3000", "\uff0d", "\u2013"} <= set(SEPARATORS)
    assert not any(c.isdigit() for c in SEPARATORS)


def test_random_digit_chains_match_the_brute_force_reading(filters):
    safety = filters["default"]
    rng = random.Random(7)
    pieces = ["4111", "1111", "6222", "0212", "3456", "7894", "62123456789012345", "69", "0", "12", " ", "  ", "   ", "    ",
              "-", " - ", "\u3000", "－", "\t", "号", "x", "。"]
    cards = 0
    for _ in range(1500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 14)))
        if rng.random() < 0.3:
            text += rng.choice([VISA, "4111 1111 1111 1111", "6212345678901234569"])
        got = {(f.rule_id, f.start, f.end) for f in safety.check(text).findings}
        expected = brute_force_cards(text)
        assert got == expected, repr(text)
        cards += bool(expected)
    assert cards > 300  # the generator produced plenty of candidates


def test_luhn_matches_the_textbook_algorithm():
    rng = random.Random(11)
    for length in range(1, 26):
        for _ in range(300):
            digits = "".join(rng.choice("0123456789") for _ in range(length))
            assert luhn_valid(digits) == luhn_reference(digits), digits


# --- secret values: quantities ------------------------------------------------------------------

QUANTITY_CASES = [
    # a length range before a unit: a quantity, not a value
    ("密码长度为8~20位", "allow"),
    ("密码长度为8-20个字符", "allow"),
    ("验证码：1234~5678位", "allow"),
    # the same digits with a letter: a value
    ("密码是8~20x", "redact"),
    # no unit after it: a value
    ("password: 1234~5678 chars", "redact"),
]


@pytest.mark.parametrize("text,action", QUANTITY_CASES)
def test_quantity_before_a_unit_is_not_a_secret_value(filters, text, action):
    verdict = assert_same_as_reference(filters["default"], text)
    assert verdict.action == action
