"""`SafetyFilter`: screen a text in one call and get a `Verdict`; open a `SafetyStream`.

A verdict is a result, never an exception: any string is a valid input and gets one of
`allow` (text unchanged, byte for byte — possibly with `flag` findings), `redact` (each sensitive
span replaced by `redaction_text`) or `block` (the whole text replaced by `block_message`).
Findings carry a rule id and a span of the original text, never the matched content, so they may
go to metrics and logs.

What it does not do: understand meaning. It finds card numbers, secrets after a keyword and
configured words/patterns; a secret described in prose ("my password is my cat's name") passes.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Literal, NamedTuple

from r1.config import SafetyConfig, load_yaml, parse_config
from r1.safety.profiles import profile_rules
from r1.safety.rules import DIRECTIONS, Direction, Rule, compile_rule
from r1.safety.scanner import Scanner

VerdictAction = Literal["allow", "redact", "block"]
# Builds a Finding or Verdict from a complete tuple of fields, skipping the generated __new__
# (check() runs once per message; the fields are always all given).
_new_tuple = tuple.__new__


class Finding(NamedTuple):
    """A rule that fired on [start, end) of the screened text (no content)."""

    rule_id: str
    start: int
    end: int
    action: Literal["block", "redact", "flag"]

    def to_dict(self) -> dict:
        return {"rule_id": self.rule_id, "start": self.start, "end": self.end, "action": self.action}


class Verdict(NamedTuple):
    """What may be shown (`text`) and why (`findings`)."""

    action: VerdictAction
    text: str
    findings: tuple[Finding, ...] = ()

    @property
    def flagged(self) -> bool:
        return any(f.action == "flag" for f in self.findings)

    def to_dict(self) -> dict:
        return {"action": self.action, "text": self.text, "findings": [f.to_dict() for f in self.findings]}


class SafetyFilter:
    """Screens text in both directions with one set of rules; thread-safe and reusable."""

    def __init__(self, config: SafetyConfig):
        self.config = config
        self.rules: list[Rule] = _build_rules(config)
        self._scanners: dict[str, Scanner] = {d: _scanner(tuple(self.rules), d) for d in DIRECTIONS}
        self.block_message = config.block_message
        self.redaction_text = config.redaction_text
        # Identifies the rule set, so a stream state is never resumed under different rules.
        rules_part = config.model_dump_json(include={"profile", "rules", "rule_actions", "block_message", "redaction_text"})
        self.fingerprint = hashlib.sha256(rules_part.encode()).hexdigest()[:16]

    @classmethod
    def from_profile(cls, name: str = "default") -> SafetyFilter:
        return cls(SafetyConfig(profile=name))  # type: ignore[arg-type]

    @classmethod
    def from_config(cls, config: SafetyConfig | dict | None) -> SafetyFilter:
        if not isinstance(config, SafetyConfig):
            config = parse_config(SafetyConfig, config, source="safety config")
        return cls(config)

    @classmethod
    def from_yaml(cls, path: str | Path) -> SafetyFilter:
        """Load a YAML file whose keys are SafetyConfig's (profile, rules, rule_actions, …)."""
        return cls(load_yaml(path, SafetyConfig))

    def scanner(self, direction: str) -> Scanner:
        if direction not in self._scanners:
            raise ValueError(f"direction={direction!r} is not valid; use 'input' or 'output'")
        return self._scanners[direction]

    def check(self, text: str, direction: Direction = "input") -> Verdict:
        """Screen a whole text."""
        if not isinstance(text, str):
            raise TypeError(f"check() screens str, got {type(text).__name__}")
        scanner = self._scanners.get(direction) or self.scanner(direction)
        found = scanner.find(text)
        if not found:
            return _new_tuple(Verdict, ("allow", text, ()))
        return self._verdict(scanner, text, found)

    def _verdict(self, scanner: Scanner, text: str, found: list[tuple[int, int, int]]) -> Verdict:
        """The verdict for `text` given `scanner.find(text)` (rule index, start, end) findings."""
        rule_ids, actions = scanner.rule_ids, scanner.actions
        findings = tuple([_new_tuple(Finding, (rule_ids[r], s, e, actions[r])) for r, s, e in found])
        kinds = {actions[r] for r, _, _ in found}
        if "block" in kinds:
            return _new_tuple(Verdict, ("block", self.block_message, findings))
        if "redact" in kinds:
            spans = [(s, e) for r, s, e in found if actions[r] == "redact"]
            return _new_tuple(Verdict, ("redact", redact(text, spans, self.redaction_text), findings))
        return _new_tuple(Verdict, ("allow", text, findings))

    def stream(self, direction: Direction = "output", context: str = ""):
        """A hold-back stream screening text that arrives in chunks (see r1/safety/stream.py).

        `context` is text that comes right before the stream and has already been shown (the prompt
        a completion continues): it is never emitted or redacted, but a keyword at its end qualifies
        a value at the stream's start ("password: " … "hunter2"), and a card number that began in
        it is still a card number."""
        from r1.safety.stream import SafetyStream

        return SafetyStream(self, direction, context)

    def resume_stream(self, state: dict):
        """Rebuild a stream from `SafetyStream.to_state()` (stateless serving, see actors/safety.py)."""
        from r1.safety.stream import SafetyStream

        return SafetyStream.from_state(self, state)


@functools.lru_cache(maxsize=32)
def _scanner(rules: tuple[Rule, ...], direction: Direction) -> Scanner:
    # Compiling the patterns takes a while; filters with the same rules share scanners.
    return Scanner(list(rules), direction)


def _build_rules(config: SafetyConfig) -> list[Rule]:
    profile = profile_rules(config.profile)
    profile_ids = {rule.id for rule in profile}
    unknown = sorted(set(config.rule_actions) - profile_ids)
    if unknown:
        raise ValueError(
            f"rule_actions names unknown rule(s) {unknown}; profile {config.profile!r} has {sorted(profile_ids)} "
            "(set actions of your own rules in `rules` directly)"
        )
    clashes = sorted(profile_ids & {rule.id for rule in config.rules})
    if clashes:
        raise ValueError(f"rules {clashes} reuse ids of profile {config.profile!r}; give your rules other ids")
    rules = []
    for rule in profile:
        override = config.rule_actions.get(rule.id)
        rules.append(compile_rule(rule, override.input if override else None, override.output if override else None))
    rules.extend(compile_rule(rule) for rule in config.rules)
    return rules


def redact(text: str, spans: list[tuple[int, int]], placeholder: str) -> str:
    """`text` with each group of overlapping or touching spans replaced by one placeholder."""
    pieces: list[str] = []
    position = 0
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    for start, end in merged:
        pieces.append(text[position:start])
        pieces.append(placeholder)
        position = end
    pieces.append(text[position:])
    return "".join(pieces)
