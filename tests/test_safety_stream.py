"""r1.safety streams: hold-back never emits a sensitive span, holds no more than needed, and the
pieces add up to what `check` returns for the whole text."""

from __future__ import annotations

import random

import pytest

from r1.config import SafetyConfig, SafetyRuleConfig
from r1.safety import SafetyFilter

VISA = "4111111111111111"
UNIONPAY_19 = "6212345678901234569"
ZW = "\u200b"


@pytest.fixture(scope="module")
def default() -> SafetyFilter:
    return SafetyFilter.from_profile("default")


@pytest.fixture(scope="module")
def strict() -> SafetyFilter:
    return SafetyFilter.from_profile("strict")


@pytest.fixture(scope="module")
def custom() -> SafetyFilter:
    return SafetyFilter(
        SafetyConfig(
            rules=[
                SafetyRuleConfig(id="codename", kind="keyword", keywords=["天穹计划", "skyline"]),
                SafetyRuleConfig(id="employee_id", kind="regex", pattern=r"EMP-\d{6}"),
            ]
        )
    )


def run(safety: SafetyFilter, chunks: list[str], direction: str = "output", context: str = "") -> tuple[list[str], object]:
    stream = safety.stream(direction, context=context)  # type: ignore[arg-type]
    pieces = [stream.feed(chunk) for chunk in chunks]
    pieces.append(stream.flush())
    return pieces, stream


SPLIT_CASES = [
    # a 19-digit UnionPay-style number touching Chinese text
    f"我的卡号是{UNIONPAY_19}谢谢",
    # a grouped card number
    "卡号 4111 1111 1111 1111 好的",
    # zero-width characters between the groups
    f"卡号4111{ZW}1111{ZW}1111{ZW}1111号",
    # full-width digits and a full-width dash
    "卡号４１１１－１１１１－１１１１－１１１１。",
    # a password value after the keyword
    "我的密码是abc123，请帮我看看",
    # a code before its keyword
    "384920是您的验证码，请勿泄露",
    # a spaced-out code
    "验证码：3 8 4 9 2 0。",
    # an ASCII keyword whose boundary depends on the next character
    "OTP 123456 then OTPs",
    # a long secret value (longer than the stream's context window)
    "token password=" + "x1" * 300 + " end",
    # harmless text mentioning keywords
    "忘记密码怎么办？验证码一直收不到。",
]


@pytest.mark.parametrize("text", SPLIT_CASES)
def test_every_two_chunk_split_equals_check(default, text):
    # Wherever the text is cut, the pieces add up to the whole-text verdict.
    expected = default.check(text, "output").text
    step = max(1, len(text) // 60)
    for cut in range(0, len(text) + 1, step):
        pieces, _ = run(default, [text[:cut], text[cut:]])
        assert "".join(pieces) == expected, cut


@pytest.mark.parametrize("text", SPLIT_CASES)
def test_char_by_char_equals_check_and_never_leaks(default, text):
    # One character per chunk: the hardest case for hold-back.
    pieces, _ = run(default, list(text))
    assert "".join(pieces) == default.check(text, "output").text
    emitted = "".join(pieces)
    for secret in (UNIONPAY_19, "abc123", "384920", "3 8 4 9 2 0", "123456", "x1x1x1"):
        if secret in text:
            assert secret not in emitted


def test_split_card_number_is_held_then_redacted(default):
    # The first chunk ends inside a card number: only the text before it goes out.
    stream = default.stream("output")
    assert stream.feed("卡号6222 0212") == "卡号"
    assert stream.feed(" 3456 7894，谢谢") == "[已隐藏]，谢谢"
    assert stream.flush() == ""
    assert stream.rule_ids == ("card_number",)
    assert stream.action == "redact"


def test_a_value_that_may_gain_a_group_or_a_unit_is_held(default):
    # "384 " may become "384 920" (one value, one placeholder); "8-20 " may become "8-20 位" (a quantity).
    stream = default.stream("output")
    assert stream.feed("验证码为 384 ") == "验证码为 "
    assert stream.feed("920，5分钟内有效") == "[已隐藏]，5分钟内有效"
    assert stream.flush() == ""
    stream = default.stream("output")
    assert stream.feed("密码为 8-20 ") == "密码为 "
    assert stream.feed("位") == "8-20 位"
    assert stream.flush() == ""
    assert stream.findings == ()


def test_harmless_text_is_not_held(default):
    # Text that cannot start a finding streams through at once.
    stream = default.stream("output")
    for chunk in ["您好，", "请问有什么", "可以帮您？", "Thanks for ", "reaching out."]:
        assert stream.feed(chunk) == chunk
        assert stream.held_chars == 0


HOLD_CASES = [
    # the first character of 密码 may become a keyword
    ("我的密", 1),
    # a keyword whose value may follow: nothing of it needs holding
    ("我的密码是", 0),
    # a value that may still grow is emitted redacted, only its possible trailing punctuation held
    ("我的密码是abc123.", 1),
    # a number: its last 19 digits (with separators) may still become a card number
    ("订单 1234 5678", 9),
    # a long digit run: only the last 19 digits are held
    ("编号" + "1" * 30, 19),
    # a short number may still be followed by 是您的验证码
    ("共有384920", 6),
]


@pytest.mark.parametrize("text,held", HOLD_CASES)
def test_hold_back_is_no_more_than_a_match_needs(default, text, held):
    stream = default.stream("output")
    stream.feed(text)
    assert stream.held_chars == held


def test_strict_stream_blocks_once_and_emits_nothing_after(strict):
    # Strict semantics in a stream: clean text goes out; once a keyword is seen, the block
    # message replaces everything after it.
    stream = strict.stream("output")
    assert stream.feed("您好，我来帮您查询。") == "您好，我来帮您查询。"
    assert stream.feed("您的信用") == "您的"  # "信用" may start 信用卡: held
    assert stream.feed("卡已经") == "内容包含敏感信息"
    assert stream.feed("更多文字") == ""
    assert stream.flush() == ""
    assert stream.action == "block"
    assert stream.rule_ids == ("sensitive_keyword",)


def test_strict_stream_blocks_a_digit_run_split_across_chunks(strict):
    stream = strict.stream("output")
    out = stream.feed("号码12345678") + stream.feed("90123456") + stream.flush()
    assert out == "号码内容包含敏感信息"


def test_custom_regex_and_keyword_rules_in_streams(custom):
    text = "员工EMP-123456负责skyline项目，即天穹计划。"
    for size in (1, 2, 3, 7):
        pieces, _ = run(custom, [text[i : i + size] for i in range(0, len(text), size)])
        assert "".join(pieces) == custom.check(text, "output").text == "员工[已隐藏]负责[已隐藏]项目，即[已隐藏]。"


def test_state_round_trip_continues_the_stream(default):
    # A stateless server resumes each step from plain data.
    text = f"卡号{VISA}，密码是abc123。"
    state = None
    out = []
    for chunk in [text[i : i + 3] for i in range(0, len(text), 3)]:
        stream = default.stream("output") if state is None else default.resume_stream(state)
        out.append(stream.feed(chunk))
        state = stream.to_state()
    out.append(default.resume_stream(state).flush())
    assert "".join(out) == default.check(text, "output").text


def test_withheld_spans_cover_a_redaction_emitted_over_several_pieces():
    # A finding is recorded up to where it was first emitted ("=" of "= 2" here, the rest still held
    # for a longer match); the redaction continues into the next piece, and `withheld` covers all of it.
    safety = SafetyFilter(SafetyConfig(profile="strict", rules=[
        SafetyRuleConfig(id="equals_digit", kind="regex", pattern=r"= \d", input="off", output="redact")]))
    stream = safety.stream("output")
    pieces = [stream.feed("5 + 17 = "), stream.feed("22\n"), stream.feed("ok"), stream.flush()]
    assert "".join(pieces) == safety.check("5 + 17 = 22\nok", "output").text == f"5 + 17 {safety.redaction_text}2\nok"
    assert [(f.start, f.end) for f in stream.findings] == [(7, 8)]  # the case this test is about
    assert stream.withheld == ((7, 10),)
    half = safety.stream("output")
    half.feed("5 + 17 = ")
    half.feed("22\n")
    assert half.withheld and safety.resume_stream(half.to_state()).withheld == half.withheld  # kept in the state


def test_state_from_other_rules_is_refused(default, strict):
    state = default.stream("output").to_state()
    with pytest.raises(ValueError, match="different safety rules"):
        strict.resume_stream(state)


def test_feed_after_flush_is_a_value_error(default):
    stream = default.stream("output")
    stream.flush()
    with pytest.raises(ValueError, match="flushed"):
        stream.feed("more")


FRAGMENTS = [
    "密码", "密", "码", "是", "为", "：", ":", " ", "验证码", "您的", "abc", "123", "4111", "1111", "6222", "0212",
    "-", "－", ZW, "１", "，", "。", "password", "is", "OTP", "pin", "skyline", "天穹计划", "EMP-", "123456", "x",
    "信用卡", "8-20", "位", "\u3000", "'", "㍱", "ﬁ", "❤\ufe0f", "é", "\n",
    # value grammar: digit groups, asides, openers, qualifiers, topics, units
    "384 ", "92", "如下", "（新）", "【", "】", "(", "登录", "学", "个字符", "code", "CVV码", "口",
    # keys and values of JSON (a tool call's arguments)
    '"', '": "', "{", "}",
]


@pytest.mark.parametrize("name", ["default", "strict", "custom"])
def test_random_texts_and_chunkings_match_check(name, request):
    # Seeded property test: random texts built from tricky fragments, random chunk sizes.
    safety = request.getfixturevalue(name)
    rng = random.Random(20240501)
    for _ in range(300):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 25)))
        chunks, i = [], 0
        while i < len(text):
            size = rng.randint(1, 6)
            chunks.append(text[i : i + size])
            i += size
        pieces, stream = run(safety, chunks)
        verdict = safety.check(text, "output")
        emitted = "".join(pieces)
        if verdict.action == "block":
            # Everything before the block message was screened clean.
            assert emitted.endswith(safety.block_message) and stream.action == "block"
            prefix = emitted[: -len(safety.block_message)]
            assert text.startswith(prefix) and safety.check(prefix, "output").action != "block"
        else:
            assert emitted == verdict.text, text
            # `withheld` lists exactly the original text that was replaced (what logprobs leave
            # out): the rest comes out as it was, and every redacted finding lies inside it, though
            # a finding's own span ends where it was first emitted.
            kept = "".join(text[start:end] for start, end in _gaps(stream.withheld, len(text)))
            assert kept == emitted.replace(safety.redaction_text, ""), (text, chunks, stream.withheld)
            for finding in verdict.findings:
                if finding.action == "redact":
                    assert any(a <= finding.start and finding.end <= b for a, b in stream.withheld), (text, chunks)


def _gaps(spans, length: int) -> list[tuple[int, int]]:
    """The stretches of [0, length) outside `spans` (sorted, disjoint)."""
    gaps, position = [], 0
    for start, end in spans:
        gaps.append((position, start))
        position = end
    return gaps + [(position, length)]


def test_long_digit_chains_stream_like_check_with_a_bounded_context(default):
    # "1 2 3 4 …", tables of numbers: one card candidate chain thousands of characters long, with
    # Luhn-valid windows inside (redacted) and a real card number in the middle. The stream must
    # give check()'s text, and keep a bounded left context (keeping the chain from its first digit
    # made every chunk rescan the whole chain: quadratic time).
    rng = random.Random(7)
    scanner = default.scanner("output")
    for _ in range(4):
        groups = ["".join(rng.choice("0123456789") for _ in range(rng.randint(1, 3))) for _ in range(600)]
        groups[300] = "4111 1111 1111 1111"
        text = "编号 " + "".join(g + rng.choice([" ", "-", "  ", " - "]) for g in groups) + "完"
        stream = default.stream("output")
        pieces, i = [], 0
        while i < len(text):
            size = rng.randint(1, 9)
            pieces.append(stream.feed(text[i : i + size]))
            assert len(stream._context) <= scanner.context_chars
            i += size
        pieces.append(stream.flush())
        verdict = default.check(text, "output")
        assert verdict.action == "redact"
        assert "".join(pieces) == verdict.text


def _streamed(safety: SafetyFilter, text: str, size: int = 1) -> str:
    stream = safety.stream("output")
    return "".join(stream.feed(text[i:i + size]) for i in range(0, len(text), size)) + stream.flush()


@pytest.mark.parametrize("rules, actions, text", [
    # A block rule blocks only on a match that can no longer change: "Skyline" is not a word of "Skylines".
    ([{"id": "proj", "kind": "keyword", "keywords": ["Skyline"], "output": "block"}], {}, "Skylines are nice"),
    # "$" matched at the end of a chunk, not of the text.
    ([{"id": "e", "kind": "regex", "pattern": r"EMP-\d{6}$", "output": "block"}], {}, "EMP-123456 more"),
    # 16 Luhn-valid digits that a 17th turns into no card number.
    ([], {"card_number": {"output": "block"}}, "41111111111111112"),
    # A harmless mention of a secret keyword (the value is not final until it ends).
    ([], {"secret": {"output": "block"}}, "密码 8-20位"),
    # A lookbehind wider than the usual kept context.
    ([{"id": "lb", "kind": "regex", "pattern": r"(?<=K" + "-" * 400 + r")\d{3}"}], {}, "K" + "-" * 400 + "123"),
])
def test_user_rules_stream_like_check(rules, actions, text):
    safety = SafetyFilter(SafetyConfig(rules=rules, rule_actions=actions))
    expected = safety.check(text, "output").text
    for size in (1, 3, 8):
        assert _streamed(safety, text, size) == expected, size


@pytest.mark.parametrize("rule, message", [
    # a keyword that normalizes to nothing (zero-width space, soft hyphen) would match everywhere
    ({"id": "k", "kind": "keyword", "keywords": ["\u200b"]}, "empty once normalized"),
    ({"id": "k", "kind": "secret", "keywords": ["pin"], "code_keywords": ["\u00ad"]}, "empty once normalized"),
    # a max_match_chars below the pattern's own longest match: a stream would emit part of a match
    ({"id": "e", "kind": "regex", "pattern": r"EMP-\d{6}", "max_match_chars": 3}, "shorter than the longest match"),
    # a Luhn check on unbounded runs: never final in a stream, quadratic to check
    ({"id": "acct", "kind": "card_number", "min_digits": 12, "max_digits": None, "luhn": "valid"}, "needs luhn=any"),
])
def test_user_rules_a_stream_cannot_honour_are_refused(rule, message):
    with pytest.raises(ValueError, match=message):
        SafetyFilter(SafetyConfig(rules=[rule]))


# --- context: text shown before the stream (the prompt a completion continues) ------------------


def _streamed_after(safety: SafetyFilter, context: str, text: str, sizes: list[int]) -> tuple[str, object]:
    """`text` streamed after `context` in chunks of `sizes` (the rest as one last chunk)."""
    chunks, i = [], 0
    for size in sizes:
        if i >= len(text):
            break
        chunks.append(text[i : i + size])
        i += size
    pieces, stream = run(safety, [*chunks, text[i:]], context=context)
    return "".join(pieces), stream


@pytest.mark.parametrize("context, text, expected", [
    # a keyword at the prompt's end qualifies the value the output starts with
    ("my password: ", "hunter2 is it", "[已隐藏] is it"),
    ("验证码是", "384920，请勿泄露", "[已隐藏]，请勿泄露"),
    # a value the prompt began and the output finishes: only the output's part is replaced
    ("password: hunt", "er2 then", "[已隐藏] then"),
    # a card number the prompt began (8 digits) and the output finishes (8 more)
    ("card 4111 1111 ", "1111 1111 ok", "[已隐藏] ok"),
    # what is wholly in the prompt is not the stream's: it is neither repeated nor reported
    (f"卡号 {VISA}。", "好的", "好的"),
    # no context: the same value alone is not a secret
    ("", "hunter2 is it", "hunter2 is it"),
])
def test_context_qualifies_the_start_of_the_stream(default, context, text, expected):
    for sizes in ([1] * len(text), [3] * len(text), [len(text)]):
        emitted, stream = _streamed_after(default, context, text, sizes)
        assert emitted == expected, sizes
        # Findings are this stream's, in its own offsets, for its own part of a span.
        assert (stream.action == "redact") == ("[已隐藏]" in expected)
        for finding in stream.findings:
            assert 0 <= finding.start < finding.end <= len(text)


def test_a_card_finished_in_the_stream_is_reported_from_its_start(default):
    emitted, stream = _streamed_after(default, "card 4111 1111 ", "1111 1111 ok", [4, 5, 3])
    assert emitted == "[已隐藏] ok"
    assert [(f.rule_id, f.start) for f in stream.findings] == [("card_number", 0)]


def test_context_survives_the_state_round_trip(default):
    # The first step emits nothing (a value may still grow); the resumed stream still knows the context.
    stream = default.stream("output", context="card 4111 1111 ")
    assert stream.feed("1111 ") == ""
    resumed = default.resume_stream(stream.to_state())
    assert resumed.feed("1111 ok") + resumed.flush() == "[已隐藏] ok"
    assert [f.rule_id for f in resumed.findings] == ["card_number"]


def test_strict_blocks_a_keyword_split_between_context_and_stream(strict):
    assert _streamed_after(strict, "我的密", "码很长", [1])[0] == strict.block_message
    # A keyword wholly in the context was the input's to screen: the output alone is clean.
    emitted, stream = _streamed_after(strict, "我的密码", "很长", [1])
    assert emitted == "很长" and stream.action == "allow"


def test_only_the_end_of_a_long_context_is_read(default):
    # A megabyte of prompt: the stream folds and keeps only what can still combine with its text.
    stream = default.stream("output", context="x " * 500_000 + "password: ")
    assert stream.feed("abc123 ok") + stream.flush() == "[已隐藏] ok"
    assert len(stream.to_state()["context"]) <= default.scanner("output").context_chars


def _expected_after(safety: SafetyFilter, context: str, text: str) -> str | None:
    """What a stream after `context` should emit: `check(context + text)`'s redactions, clipped to
    `text`; None when the whole text blocks (the caller compares those separately)."""
    verdict = safety.check(context + text, "output")
    if verdict.action == "block":
        return None
    spans = []
    for finding in verdict.findings:
        start, end = max(finding.start, len(context)) - len(context), finding.end - len(context)
        # A span's zero-width tail after a value the context showed is no text of the stream's.
        if finding.action == "redact" and end > start and text[start:end].strip(ZW):
            spans.append((start, end))
    out, at = "", None
    for start, end in sorted(spans):
        if at is not None and start <= at:  # overlapping or touching spans are one replacement
            at = max(at, end)
            continue
        out += text[at or 0 : start] + safety.redaction_text
        at = end
    return out + text[at or 0 :]


@pytest.mark.parametrize("name", ["default", "strict"])
def test_random_contexts_and_texts_match_check_of_both(name, request):
    # Seeded property test: the stream after a context emits check(context + text)'s redactions of
    # its own part; a block in check means a block finding reaching into the text, or one in the context.
    safety = request.getfixturevalue(name)
    rng = random.Random(20261130)
    for _ in range(1500):
        context = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 12)))
        # Zero-width characters right at the seam may land on either side of a span that crosses it
        # (invisible either way; test_a_seam_of_zero_width_characters_shows_nothing covers them).
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 12))).lstrip(ZW) or "x"
        emitted, stream = _streamed_after(safety, context, text, [rng.randint(1, 6) for _ in range(len(text))])
        expected = _expected_after(safety, context, text)
        if expected is not None:
            assert emitted == expected, (context, text)
            continue
        reaches = [f for f in safety.check(context + text, "output").findings if f.action == "block"
                   and text[max(f.start - len(context), 0) : max(f.end - len(context), 0)].strip(ZW)]
        if reaches:
            assert emitted.endswith(safety.block_message) and stream.action == "block", (context, text)
        else:  # the block was the context's alone: the text is screened as if it stood alone
            assert stream.action != "block", (context, text)


@pytest.mark.parametrize("context, text", [
    ("验证码123", f"{ZW}6222 ok"),  # a code the context began, a zero-width character, more digits
    ("password: abc", f"{ZW}123 ok"),
    ("card 4111 1111 ", f"{ZW}1111 1111 ok"),
])
def test_a_seam_of_zero_width_characters_shows_nothing(default, context, text):
    for sizes in ([1] * len(text), [len(text)]):
        emitted, _ = _streamed_after(default, context, text, sizes)
        # Whatever happens to the invisible character, no character of the value is shown.
        assert emitted.replace(ZW, "") == "[已隐藏] ok", emitted
