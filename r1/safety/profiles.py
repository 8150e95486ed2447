"""The built-in rule sets: `strict` (the guide's filter, made to work) and `default`.

strict — reproduces the guide's `filter_content`: any of 信用卡/密码/验证码, or any run of 16 or
  more digits, turns the whole text into "内容包含敏感信息" (block, both directions). The guide's
  `\\b(信用卡|密码|验证码)\\b` never fires inside Chinese text (CJK characters are word characters,
  so there is no boundary between 的 and 信) and `\\d{16,19}` misses numbers written with spaces,
  dashes, full-width digits or zero-width characters; here the keywords match anywhere and digit
  runs are counted after folding, across up to three spaces/dashes between groups. No Luhn check,
  as in the guide: every 16+-digit run blocks.

default — lets harmless mentions through ("忘记密码怎么办" passes unchanged) and redacts:
  - card_number: Luhn-valid 16–19-digit numbers (redact, both directions);
  - card_number_unverified: Luhn-invalid 16–19-digit runs are flagged only. They cannot be a valid
    card number, and 16–19-digit order, waybill and transaction numbers are everyday content in
    customer service; redacting them would break the conversation. Flags are counted in metrics;
    set `rule_actions: {card_number_unverified: {input: redact, output: redact}}` to redact them;
  - secret: the value after 密码/验证码/口令/PIN/password/OTP/CVV/… and a digit code written before
    a code keyword ("384920是您的验证码") (redact, both directions).
"""

from __future__ import annotations

from r1.config import SafetyRuleConfig

GUIDE_KEYWORDS = ("信用卡", "密码", "验证码")

SECRET_KEYWORDS = (
    "密码", "口令", "验证码", "校验码", "动态码", "动态密码", "确认码", "安全码", "交易密码", "支付密码",
    "取款密码", "登录密码", "pin码", "pin", "pin code", "pin number", "password", "passwords", "passwd", "passcode",
    "pwd", "otp", "otp code", "one-time code", "one-time password", "verification code", "security code", "auth code",
    "access code", "cvv", "cvv2", "cvc", "cvc2", "cvn",
)
CODE_KEYWORDS = ("验证码", "校验码", "动态码", "动态密码", "确认码", "otp", "verification code")

PROFILES: dict[str, tuple[SafetyRuleConfig, ...]] = {
    "strict": (
        SafetyRuleConfig(id="sensitive_keyword", kind="keyword", keywords=list(GUIDE_KEYWORDS), input="block", output="block"),
        SafetyRuleConfig(id="digit_run", kind="card_number", min_digits=16, max_digits=None, luhn="any", input="block", output="block"),
    ),
    "default": (
        SafetyRuleConfig(id="card_number", kind="card_number", min_digits=16, max_digits=19, luhn="valid"),
        SafetyRuleConfig(
            id="card_number_unverified", kind="card_number", min_digits=16, max_digits=19, luhn="invalid", input="flag", output="flag"
        ),
        SafetyRuleConfig(id="secret", kind="secret", keywords=list(SECRET_KEYWORDS), code_keywords=list(CODE_KEYWORDS)),
    ),
}


def profile_rules(name: str) -> tuple[SafetyRuleConfig, ...]:
    if name not in PROFILES:
        raise ValueError(f"unknown safety profile {name!r}; use one of {sorted(PROFILES)}")
    return PROFILES[name]
