"""Tests for r1.reasoning: whole-text split, streaming split, and their agreement on any chunking."""

from __future__ import annotations

import random

import pytest

from r1.reasoning import THINK_CLOSE, THINK_OPEN, ReasoningParser, split_reasoning

# (text, (reasoning, content) with think_prefilled=True, (reasoning, content) with think_prefilled=False)
CASES = [
    # Typical R1 output after the template pre-filled "<think>\n": reasoning, close, blank line, answer.
    ("23 + 45 = 68\n</think>\n\nThe answer is 68.", ("23 + 45 = 68\n", "The answer is 68."),
     ("", "23 + 45 = 68\n</think>\n\nThe answer is 68.")),
    # Model repeats the opening tag although it was pre-filled: the opener is dropped, not reasoning.
    ("<think>\nstep one\n</think>\nanswer", ("step one\n", "answer"), ("step one\n", "answer")),
    # Closing tag never produced (truncated generation): everything is reasoning.
    ("still thinking about it", ("still thinking about it", ""), ("", "still thinking about it")),
    # Opening tag present but never closed: the rest is reasoning in both modes.
    ("<think>\nhmm, let me see", ("hmm, let me see", ""), ("hmm, let me see", "")),
    # Empty generation.
    ("", ("", ""), ("", "")),
    # Only whitespace: dropped as leading whitespace of reasoning / content.
    ("\n \n", ("", ""), ("", "")),
    # Empty reasoning: the model closes immediately.
    ("</think>\n\nJust the answer.", ("", "Just the answer."), ("", "</think>\n\nJust the answer.")),
    # Leading newlines of reasoning are dropped; inner newlines are kept.
    ("\n\nfirst\n\nsecond\n</think>ok", ("first\n\nsecond\n", "ok"), ("", "first\n\nsecond\n</think>ok")),
    # Whitespace before </think> stays in the reasoning (only leading whitespace is dropped).
    ("abc  \n</think>  x  ", ("abc  \n", "x  "), ("", "abc  \n</think>  x  ")),
    # Content before <think> in non-prefilled mode; whitespace right after </think> is dropped.
    ("Hi <think>plan</think> there", ("Hi <think>plan", "there"), ("plan", "Hi there")),
    # A second </think> belongs to the content verbatim: one reasoning block per turn.
    ("a</think>b</think>c", ("a", "b</think>c"), ("", "a</think>b</think>c")),
    # Tags after </think> are content, not a new reasoning block.
    ("r</think>c <think>x</think>", ("r", "c <think>x</think>"), ("x", "r</think>c ")),
    # A <think> after reasoning text started is plain reasoning text (non-prefilled: it opens).
    ("a <think> b</think>c", ("a <think> b", "c"), ("b", "a c")),
    # Incomplete tag at the end is plain text once the stream finishes.
    ("answer soon </thi", ("answer soon </thi", ""), ("", "answer soon </thi")),
    # A lone "<" at the start could have become either tag; at the end it is just text.
    ("<", ("<", ""), ("", "<")),
    # Lookalike tags are not tags (case and spacing matter).
    ("x</Think>y< /think>z", ("x</Think>y< /think>z", ""), ("", "x</Think>y< /think>z")),
    # Comparison operators near tags must not be swallowed.
    ("a<b</think>c<d", ("a<b", "c<d"), ("", "a<b</think>c<d")),
    # Chinese text, where characters are multi-byte: nothing is split inside them.
    ("用户忘记密码。\n</think>\n请点击“忘记密码”。",
     ("用户忘记密码。\n", "请点击“忘记密码”。"),
     ("", "用户忘记密码。\n</think>\n请点击“忘记密码”。")),
    # Explicit opener after whitespace in prefilled mode is still the redundant opener.
    ("  \n<think>\n\nx\n</think>\ny", ("x\n", "y"), ("x\n", "y")),
    # Double opener at the start: both dropped.
    ("<think><think>x</think>y", ("x", "y"), ("x", "y")),
    # Leading whitespace is dropped from reasoning (prefilled) and from content (not prefilled).
    ("\n\nplain answer", ("plain answer", ""), ("", "plain answer")),
    # Whitespace-only content before <think> is dropped, so no content at all.
    ("  <think>r</think>", ("r", ""), ("r", "")),
]
TEXTS = [case[0] for case in CASES]


def _expected(text: str, think_prefilled: bool) -> tuple[str, str]:
    for case_text, prefilled, not_prefilled in CASES:
        if case_text == text:
            return prefilled if think_prefilled else not_prefilled
    raise AssertionError(text)


def _stream(chunks: list[str], think_prefilled: bool) -> tuple[str, str]:
    parser = ReasoningParser(think_prefilled=think_prefilled)
    reasoning, content = "", ""
    for chunk in chunks:
        reasoning_delta, content_delta = parser.feed(chunk)
        reasoning += reasoning_delta
        content += content_delta
    reasoning_delta, content_delta = parser.finish()
    return reasoning + reasoning_delta, content + content_delta


def _random_chunking(text: str, rng: random.Random) -> list[str]:
    chunks, start = [], 0
    while start < len(text):
        size = rng.randint(0, 4)  # 0 makes empty chunks, which streams do produce
        chunks.append(text[start : start + size])
        start += size
    return chunks


@pytest.mark.parametrize("think_prefilled", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_split_reasoning_table(text: str, think_prefilled: bool) -> None:
    assert split_reasoning(text, think_prefilled=think_prefilled) == _expected(text, think_prefilled)


@pytest.mark.parametrize("think_prefilled", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_every_two_way_split_gives_the_same_totals(text: str, think_prefilled: bool) -> None:
    expected = _expected(text, think_prefilled)
    for cut in range(len(text) + 1):
        assert _stream([text[:cut], text[cut:]], think_prefilled) == expected, cut


@pytest.mark.parametrize("think_prefilled", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_random_chunkings_give_the_same_totals(text: str, think_prefilled: bool) -> None:
    expected = _expected(text, think_prefilled)
    rng = random.Random(f"chunkings:{text}:{think_prefilled}")
    for _ in range(25):
        chunks = _random_chunking(text, rng)
        assert "".join(chunks) == text
        assert _stream(chunks, think_prefilled) == expected, chunks
    # One character at a time: the finest chunking a tokenizer could produce.
    assert _stream(list(text), think_prefilled) == expected


@pytest.mark.parametrize("think_prefilled", [True, False])
@pytest.mark.parametrize("text", TEXTS)
def test_only_a_partial_tag_is_ever_held_back(text: str, think_prefilled: bool) -> None:
    # After any prefix, whatever finish() still releases was held back; it must be a proper
    # prefix of a tag that the prefix ends with (never ordinary text).
    partial_tags = {tag[:length] for tag in (THINK_OPEN, THINK_CLOSE) for length in range(1, len(tag))}
    for cut in range(len(text) + 1):
        parser = ReasoningParser(think_prefilled=think_prefilled)
        parser.feed(text[:cut])
        held = "".join(parser.finish())
        assert held == "" or (held in partial_tags and text[:cut].endswith(held)), (cut, held)


# (chunks fed in order, expected deltas of each feed) with think_prefilled=True
HOLD_BACK_CASES = [
    # "<" may start </think>: held; the rest of the chunk is released at once.
    (["abc<"], [("abc", "")]),
    # The longest partial tag is held, then released as text once it cannot be a tag.
    (["abc</thi", "x"], [("abc", ""), ("</thix", "")]),
    # The tag split in three chunks closes the reasoning without leaking any of it.
    (["abc</", "thi", "nk>\nok"], [("abc", ""), ("", ""), ("", "ok")]),
    # "<x" cannot start a tag: nothing is held.
    (["a<x"], [("a<x", "")]),
    # Mid-reasoning "<think" is not a tag there, and "<t" cannot start </think>: released.
    (["a<think"], [("a<think", "")]),
    # At the very start "<think" might be the repeated opener: held, then dropped.
    (["<think", ">\nr"], [("", ""), ("r", "")]),
    # After </think> nothing is held, even a tag prefix.
    (["</think>ans <", "/think"], [("", "ans <"), ("", "/think")]),
    # Whitespace after </think> is dropped across chunks until content text arrives.
    (["r</think>", "\n", " \n", "ans"], [("r", ""), ("", ""), ("", ""), ("", "ans")]),
]


@pytest.mark.parametrize(("chunks", "expected_deltas"), HOLD_BACK_CASES)
def test_feed_deltas_release_everything_but_a_partial_tag(chunks, expected_deltas) -> None:
    parser = ReasoningParser()
    assert [parser.feed(chunk) for chunk in chunks] == expected_deltas


def test_non_prefilled_holds_back_a_partial_opener() -> None:
    # Before <think> only the opener matters: "<thi" is held, "</" is not a partial opener.
    parser = ReasoningParser(think_prefilled=False)
    assert parser.feed("Hello <thi") == ("", "Hello ")
    assert parser.feed("nk>why</think>\nhi") == ("why", "hi")
    assert parser.reasoning_closed


@pytest.mark.parametrize(("think_prefilled", "chunks", "expected"), [
    # Continuing the answer ("The answer is" + " 5."): its leading space stays; a stray </think> is text.
    (False, [" 5", ".\n</think> x"], ("", " 5.\n</think> x")),
    # Continuing the reasoning ("First, 2" + " + 3 = 5"): no whitespace or repeated opener dropped at
    # the start; after </think> the answer's leading whitespace still is.
    (True, [" + 3", " = 5\n</think>\n\n", "5"], (" + 3 = 5\n", "5")),
    (True, ["<think>x</think>y"], ("<think>x", "y")),
])
def test_a_continued_stream_keeps_its_start(think_prefilled, chunks, expected) -> None:
    parser = ReasoningParser(think_prefilled, continuing=True)
    deltas = [parser.feed(chunk) for chunk in chunks] + [parser.finish()]
    assert ("".join(r for r, _ in deltas), "".join(c for _, c in deltas)) == expected


def test_reasoning_closed_flag() -> None:
    # The flag tells a caller whether the model ever closed its reasoning.
    parser = ReasoningParser()
    parser.feed("thinking </thin")
    assert not parser.reasoning_closed
    parser.feed("k>")
    assert parser.reasoning_closed


def test_parser_is_single_use() -> None:
    # Reusing a finished parser would silently mix two streams; it is an error instead.
    parser = ReasoningParser()
    parser.feed("a")
    parser.finish()
    with pytest.raises(ValueError, match="new ReasoningParser"):
        parser.feed("b")
    with pytest.raises(ValueError, match="new ReasoningParser"):
        parser.finish()
