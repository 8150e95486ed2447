"""r1.safety: verdicts of the strict and default profiles, configuration, and the bench corpus."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from r1.config import SafetyConfig, SafetyRuleConfig, parse_config
from r1.safety import Finding, SafetyFilter, Verdict, luhn_valid

# Luhn-valid numbers: Visa test number, a 16-digit UnionPay-style and a 19-digit UnionPay-style.
VISA = "4111111111111111"
UNIONPAY_16 = "6222021234567894"
UNIONPAY_19 = "6212345678901234569"
# Luhn-invalid 19-digit run (an order number).
ORDER_19 = "2024031512345678901"
ZW = "\u200b"


def full_width(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


@pytest.fixture(scope="module")
def default() -> SafetyFilter:
    return SafetyFilter.from_profile("default")


@pytest.fixture(scope="module")
def strict() -> SafetyFilter:
    return SafetyFilter.from_profile("strict")


def test_test_numbers_are_what_they_claim():
    # The fixtures below rely on these checksums.
    assert luhn_valid(VISA) and luhn_valid(UNIONPAY_16) and luhn_valid(UNIONPAY_19)
    assert not luhn_valid(ORDER_19)


def test_guide_regex_misses_keywords_inside_chinese_sentences():
    # Why the guide's filter needed fixing: \b never fires between two CJK characters.
    assert re.search(r"\b(信用卡|密码|验证码)\b", "我的信用卡号是多少") is None


STRICT_CASES = [
    # keyword inside a Chinese sentence (the guide's \b misses it)
    ("请问我的信用卡额度是多少", "block"),
    # keyword directly followed by more CJK text
    ("我的密码忘了", "block"),
    # keyword at the start, CJK after
    ("验证码收不到怎么办", "block"),
    # keyword split by a zero-width space
    (f"密{ZW}码", "block"),
    # 16-digit run touching Chinese characters
    (f"卡号{VISA}谢谢", "block"),
    # 19-digit run that fails Luhn still blocks: strict does no checksum, like the guide
    (f"订单号{ORDER_19}", "block"),
    # a run longer than 19 digits: the guide's re.search(r'\d{16,19}') matches inside it too
    ("流水号" + "1" * 25, "block"),
    # card written in groups with spaces
    ("卡号 4111 1111 1111 1111", "block"),
    # full-width digits
    ("卡号" + full_width(VISA), "block"),
    # 15 digits is below the threshold
    ("号码123456789012345", "allow"),
    # harmless text with small numbers
    ("退款会在3到5个工作日内原路返回。", "allow"),
    # English text: the guide's keywords are Chinese only
    ("Please reset your password.", "allow"),
]


@pytest.mark.parametrize("text,action", STRICT_CASES)
def test_strict_profile(strict, text, action):
    verdict = strict.check(text)
    assert verdict.action == action
    if action == "block":
        assert verdict.text == "内容包含敏感信息"
        assert verdict.findings
    else:
        assert verdict.text is text and verdict.findings == ()


# (text, expected text after the default profile, rule ids that fire)
DEFAULT_CASES = [
    # 19-digit UnionPay-style number touching Chinese characters on both sides
    (f"我的卡号是{UNIONPAY_19}谢谢", "我的卡号是[已隐藏]谢谢", {"card_number"}),
    # groups separated by spaces
    ("卡号 4111 1111 1111 1111 好的", "卡号 [已隐藏] 好的", {"card_number"}),
    # groups separated by dashes
    ("card: 6222-0212-3456-7894.", "card: [已隐藏].", {"card_number"}),
    # mixed separators, including a spaced dash
    ("卡号6222 0212 - 3456-7894", "卡号[已隐藏]", {"card_number"}),
    # ideographic spaces between groups
    ("卡号4111\u30001111\u30001111\u30001111", "卡号[已隐藏]", {"card_number"}),
    # full-width digits: redaction replaces the original full-width span
    (f"卡号{full_width(UNIONPAY_16)}。", "卡号[已隐藏]。", {"card_number"}),
    # zero-width spaces between every group
    (f"卡号4111{ZW}1111{ZW}1111{ZW}1111号", "卡号[已隐藏]号", {"card_number"}),
    # a zero-width non-joiner between every digit
    ("卡号" + "\u200c".join(VISA), "卡号[已隐藏]", {"card_number"}),
    # Luhn-invalid 19-digit order number: flagged only, text unchanged
    (f"订单号{ORDER_19}已签收", f"订单号{ORDER_19}已签收", {"card_number_unverified"}),
    # 20 contiguous digits hold no card number window
    ("编号12345678901234567890", "编号12345678901234567890", set()),
    # password value after 是; the keyword stays, the value goes
    ("我的密码是abc123，请帮我看看", "我的密码是[已隐藏]，请帮我看看", {"secret"}),
    # value after a full-width colon
    ("登录密码：Abc123!", "登录密码：[已隐藏]!", {"secret"}),
    # code after 为：, ended by the full-width comma
    ("您的验证码为：384920，5分钟内有效", "您的验证码为：[已隐藏]，5分钟内有效", {"secret"}),
    # code written before the keyword (SMS style)
    ("384920是您的验证码，请勿泄露", "[已隐藏]是您的验证码，请勿泄露", {"secret"}),
    # spaced-out code
    ("验证码：3 8 4 9 2 0", "验证码：[已隐藏]", {"secret"}),
    # keyword split by a zero-width space still qualifies the value
    (f"密{ZW}码是abc123", f"密{ZW}码是[已隐藏]", {"secret"}),
    # bridge of CJK words before the connector
    ("密码已经重置为Xy7pQ2", "密码已经重置为[已隐藏]", {"secret"}),
    # English with 'is'; the value contains a digit
    ("my password is hunter2.", "my password is [已隐藏].", {"secret"}),
    # English with ':'; trailing punctuation is read as the sentence's and stays
    ("Password: s3cr3t!", "Password: [已隐藏]!", {"secret"}),
    # OTP without a connector
    ("OTP 123456", "OTP [已隐藏]", {"secret"}),
    # a 3-digit CVV
    ("CVV 123", "CVV [已隐藏]", {"secret"}),
    # full-width Latin keyword and value
    (full_width("password: abc123"), full_width("password: ") + "[已隐藏]", {"secret"}),
    # card number and secret in one text
    (f"卡号{VISA}，密码是654321", "卡号[已隐藏]，密码是[已隐藏]", {"card_number", "secret"}),
    # a code in digit groups is one value: no group is left showing
    ("验证码为 384 920", "验证码为 [已隐藏]", {"secret"}),
    ("密码：888 888，请牢记", "密码：[已隐藏]，请牢记", {"secret"}),
    # CJK words before a colon, and a keyword with 码 appended
    ("密码如下：abc123", "密码如下：[已隐藏]", {"secret"}),
    ("CVV码：123", "CVV码：[已隐藏]", {"secret"}),
    # a short aside in brackets before the colon
    ("新密码（8位）：abc12345", "新密码（8位）：[已隐藏]", {"secret"}),
    # the value on the next line
    ("您的密码：\nabc123", "您的密码：\n[已隐藏]", {"secret"}),
    # brackets around the value stay, the value goes
    ("验证码【384920】", "验证码【[已隐藏]】", {"secret"}),
    ("验证码（384920）", "验证码（[已隐藏]）", {"secret"}),
    # SMS wordings: a qualified code keyword, a comma before it
    ("384920是您的登录验证码，5分钟内有效", "[已隐藏]是您的登录验证码，5分钟内有效", {"secret"}),
    ("384920，您的验证码", "[已隐藏]，您的验证码", {"secret"}),
    # English labels of two words
    ("OTP code: 123456", "OTP code: [已隐藏]", {"secret"}),
    ("PIN number: 1234", "PIN number: [已隐藏]", {"secret"}),
    # keys of JSON (a tool call's arguments) and of a Python dict: the values go, the JSON stays valid
    ('{"user": "bob", "password": "hunter2", "otp": "384920"}',
     '{"user": "bob", "password": "[已隐藏]", "otp": "[已隐藏]"}', {"secret"}),
    ('{"密码": "abc12345"}', '{"密码": "[已隐藏]"}', {"secret"}),
    ("{'pin': '1234'}", "{'pin': '[已隐藏]'}", {"secret"}),
]


@pytest.mark.parametrize("text,expected,rule_ids", DEFAULT_CASES)
def test_default_profile_redacts(default, text, expected, rule_ids):
    verdict = default.check(text)
    assert verdict.text == expected
    assert {f.rule_id for f in verdict.findings} == rule_ids
    assert verdict.action == ("redact" if rule_ids - {"card_number_unverified"} else "allow")


HARMLESS = [
    # a mention of 密码 with no value
    "忘记密码怎么办？",
    # how-to question about passwords
    "如何修改登录密码？",
    # a quantity, not a value
    "密码长度为8-20位，需包含字母和数字。",
    # 验证码 followed by a complaint
    "验证码一直收不到，怎么回事？",
    # 信用卡 without any number
    "信用卡额度可以提高吗？",
    # English mention, no value
    "You can reset your password from the login page.",
    # English: 'is' + a word without digits
    "Your password is incorrect.",
    # ASCII keyword inside a longer word
    "We had hotpot and a cvvx drink.",
    # phone number, date, amount
    "联系电话：138-0013-8000，日期2024-03-15，金额1,234.56元。",
    # 15-digit number
    "参考号123456789012345",
    # code snippet
    "def add(a, b):\n    return a + b\n",
    # emoji with a variation selector and an ellipsis (folded path, still unchanged)
    "好的❤️，稍等……",
    # empty text
    "",
    # a quantity with a space before its unit
    "密码必须为 8-20 位，或 12-20 个字符",
    # 密码 as a topic (cryptography), not a label
    "密码学是computer science的分支，密码算法如AES-256",
    # a price before a comma, with no code keyword after it
    "价格是 100，谢谢",
    # a function's parameters schema naming a password (the text offering tools): keys, no value
    '{"password": {"type": "string", "description": "the new password"}, "otp": {"type": "string"}}',
]


@pytest.mark.parametrize("text", HARMLESS)
def test_harmless_text_passes_byte_for_byte(default, text):
    verdict = default.check(text)
    assert verdict == Verdict("allow", text, ())
    assert verdict.text.encode("utf-8") == text.encode("utf-8")


def test_findings_point_at_the_original_text(default):
    text = f"卡号４１１１{ZW}１１１１ 1111-1111，密码：ａｂｃ１２３"
    verdict = default.check(text)
    spans = {f.rule_id: text[f.start : f.end] for f in verdict.findings}
    assert spans == {"card_number": f"４１１１{ZW}１１１１ 1111-1111", "secret": "ａｂｃ１２３"}


def test_verdict_dict_carries_no_matched_content(default):
    verdict = default.check(f"卡号{VISA}")
    as_dict = verdict.to_dict()
    assert as_dict == {"action": "redact", "text": "卡号[已隐藏]", "findings": [{"rule_id": "card_number", "start": 2, "end": 18, "action": "redact"}]}
    assert VISA not in repr(verdict.findings)


def test_unknown_direction_is_a_value_error(default):
    with pytest.raises(ValueError, match="direction"):
        default.check("x", direction="sideways")  # type: ignore[arg-type]


def test_from_yaml_custom_rules_and_per_direction_actions(tmp_path: Path):
    path = tmp_path / "safety.yaml"
    path.write_text(
        """
profile: default
redaction_text: "***"
rules:
  - id: project_codename
    kind: keyword
    keywords: [天穹计划, Skyline]
    input: flag
    output: block
  - id: employee_id
    kind: regex
    pattern: 'EMP-\\d{6}'
rule_actions:
  card_number_unverified: {input: redact}
""",
        encoding="utf-8",
    )
    safety = SafetyFilter.from_yaml(path)
    # input: the codename is only flagged; output: it blocks
    assert safety.check("关于天穹计划的进展", "input") == Verdict(
        "allow", "关于天穹计划的进展", (Finding("project_codename", 2, 6, "flag"),)
    )
    assert safety.check("关于天穹计划的进展", "output").action == "block"
    # ASCII keyword: case ignored, not inside another word
    assert safety.check("the SKYLINE team", "input").findings[0].rule_id == "project_codename"
    assert safety.check("skylines", "input").findings == ()
    # custom regex, default redact in both directions, custom placeholder
    assert safety.check("工号EMP-123456", "output").text == "工号***"
    # override of a profile rule in one direction only
    assert safety.check(f"订单{ORDER_19}", "input").text == "订单***"
    assert safety.check(f"订单{ORDER_19}", "output").text == f"订单{ORDER_19}"


def test_off_removes_a_rule_from_one_direction():
    safety = SafetyFilter.from_config({"rule_actions": {"secret": {"output": "off"}}})
    assert safety.check("密码是abc123", "input").action == "redact"
    assert safety.check("密码是abc123", "output") == Verdict("allow", "密码是abc123", ())


CONFIG_ERRORS = [
    # an action override for a rule the profile does not have
    ({"rule_actions": {"cards": {"input": "block"}}}, "unknown rule"),
    # a custom rule reusing a profile rule id
    ({"rules": [{"id": "secret", "kind": "keyword", "keywords": ["x"]}]}, "reuse ids"),
    # two custom rules with one id
    ({"rules": [{"id": "a", "kind": "keyword", "keywords": ["x"]}, {"id": "a", "kind": "keyword", "keywords": ["y"]}]}, "twice"),
    # an unbounded regex cannot bound a stream's hold-back
    ({"rules": [{"id": "r", "kind": "regex", "pattern": "EMP-\\d+"}]}, "max_match_chars"),
    # a regex that does not compile
    ({"rules": [{"id": "r", "kind": "regex", "pattern": "([a-z"}]}, "not a valid regex"),
    # a keyword rule without keywords
    ({"rules": [{"id": "k", "kind": "keyword"}]}, "keywords"),
    # an unknown key (typo) is an error that lists the allowed keys
    ({"profil": "strict"}, "unknown key"),
    # an unknown profile
    ({"profile": "lenient"}, "profile"),
]


@pytest.mark.parametrize("config,message", CONFIG_ERRORS)
def test_config_mistakes_are_value_errors(config, message):
    with pytest.raises(ValueError, match=message):
        SafetyFilter.from_config(config)


def test_bounded_regex_with_explicit_hold_is_accepted():
    # max_match_chars makes an unbounded pattern usable in streams.
    config = parse_config(SafetyConfig, {"rules": [{"id": "r", "kind": "regex", "pattern": "EMP-\\d+", "max_match_chars": 20}]})
    assert SafetyFilter(config).check("EMP-1234567").text == "[已隐藏]"


def test_rule_config_defaults_are_the_card_rule():
    rule = SafetyRuleConfig(id="cards", kind="card_number")
    assert (rule.min_digits, rule.max_digits, rule.luhn, rule.input, rule.output) == (16, 19, "valid", "redact", "redact")


def test_r1_safety_does_not_import_ray():
    # The library layer stays importable without Ray.
    code = "import sys, r1.safety; r1.safety.SafetyFilter.from_profile(); print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "False"


def test_bench_corpus_file_matches_its_generator():
    # The labelled corpus is generated, not hand-edited: regenerating gives the same bytes.
    from bench.safety import CORPUS_PATH, corpus_jsonl, generate_corpus

    assert CORPUS_PATH.read_text(encoding="utf-8") == corpus_jsonl(generate_corpus())


def test_default_profile_catches_every_labelled_value_of_the_bench_corpus(default):
    # Recall 1.0 on the corpus and no redaction of unlabelled records.
    from bench.safety import load_corpus

    for record in load_corpus():
        verdict = default.check(record["text"])
        covered = {i for f in verdict.findings if f.action == "redact" for i in range(f.start, f.end)}
        for label in record["labels"]:
            assert all(i in covered for i in range(label["start"], label["end"]) if record["text"][i].isalnum()), record["id"]
        if not record["labels"]:
            assert verdict.action == "allow", record["id"]
