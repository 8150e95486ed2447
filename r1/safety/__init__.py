"""Safety filter: find card numbers, secrets and configured words in text, then allow, redact or block.

    from r1.safety import SafetyFilter
    safety = SafetyFilter.from_profile("default")          # or "strict", or .from_yaml(path)
    verdict = safety.check("我的卡号是 4111 1111 1111 1111", direction="input")
    verdict.action, verdict.text, verdict.findings          # "redact", "我的卡号是 [已隐藏]", (...)
    stream = safety.stream("output")
    safe = stream.feed(chunk) ... + stream.flush()

Modules: normalize (the folded detection copy and its offset map), rules (rule kinds), scanner
(combined regexes, fast path, hold-back), profiles (strict, default), filter (SafetyFilter,
Verdict), stream (SafetyStream). Pure Python; no Ray (the Serve deployment is actors/safety.py).
"""

from r1.safety.filter import Finding, SafetyFilter, Verdict
from r1.safety.rules import luhn_valid
from r1.safety.stream import SafetyStream

__all__ = ["Finding", "SafetyFilter", "SafetyStream", "Verdict", "luhn_valid"]
