"""Structured output: replies that must be JSON valid against a schema (OpenAI's `response_format`),
match a regular expression, be one of given strings, or follow an EBNF grammar (vLLM's guided
decoding: `guided_regex`, `guided_choice`, `guided_grammar`).

xgrammar compiles the constraint into a grammar over the model's vocabulary; at each decode step a
row's `GrammarMatcher` gives the tokens that keep the reply a valid prefix (a bitmask the sampler
applies to the row's logits after penalties and bias), and takes the chosen token. Once the reply
is complete (and cannot grow: a closed JSON value, the last choice's end) only end-of-sequence is
allowed, so the reply ends there; where it could still grow (`[0-9]+`) end-of-sequence is one of
the allowed tokens.

Whitespace between JSON tokens is not allowed (compact JSON): a grammar that allows any amount
lets a small model fill its whole budget with spaces. A chat request to a model whose template
opens the reasoning block (`<think>`, DeepSeek-R1 style) reasons freely first: its matcher starts
after the model closes the block with `</think>` (when that is one token), so only the answer is
constrained, as vLLM's reasoning-aware structured output does.

A choice is compiled as the grammar `root ::= "first" | "second" | ...`; a grammar is xgrammar's
EBNF (GBNF, as llama.cpp writes it: `root ::= ...`); a regex is xgrammar's dialect (no
lookaround, no backreferences). `check_constraint` compiles one without a vocabulary, so the
server refuses a broken one (400 naming the field) before any model work.

xgrammar is imported when a request first asks for structured output (the `structured` extra).
"""

from __future__ import annotations

import functools
import json
import re
import threading
from typing import Any

from r1.config import STRUCTURED_FIELDS
from r1.engine.types import RequestError

# xgrammar's errors open with "[time] source.cc:line: "; the reason follows.
_ERROR_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


def xgrammar_reason(error: Exception) -> str:
    """The reason in an xgrammar error, without its source location."""
    return _ERROR_PREFIX.sub("", str(error)).strip()


def constraint_of(sampling: Any) -> tuple[str, Any] | None:
    """The constraint `sampling` puts on the reply: ("json_schema", schema), ("regex", pattern),
    ("choice", strings) or ("grammar", ebnf); None when the reply is free."""
    for kind in STRUCTURED_FIELDS:
        value = getattr(sampling, kind)
        if value is not None:
            return kind, value
    return None


def constraint_field(kind: str) -> str:
    """The field a constraint's errors name: response_format for a JSON schema (OpenAI's request
    field), else the sampling field (regex, choice, grammar)."""
    return "response_format" if kind == "json_schema" else kind


def _ebnf_of_choice(choices: list[str]) -> str:
    # JSON string escapes (\", \\, \n, \uXXXX) are EBNF's.
    return "root ::= " + " | ".join(json.dumps(choice) for choice in choices)


def _source(kind: str, value: Any) -> str:
    """The text xgrammar compiles for a constraint (a schema's JSON, the choices' grammar...)."""
    if kind == "json_schema":
        return json.dumps(value)  # not sorted: the order of "properties" is the order the reply writes them
    return _ebnf_of_choice(value) if kind == "choice" else value


def _xgrammar(field: str = "response_format") -> Any:
    try:
        import xgrammar
    except ImportError:
        raise RequestError("structured output (response_format json_object / json_schema, guided decoding) needs the "
                           "xgrammar package: pip install 'r1-cluster[structured]'", field, "unsupported") from None
    return xgrammar


_DESCRIBED = {"json_schema": "the JSON schema", "regex": "the regular expression", "choice": "the choices",
              "grammar": "the grammar"}


def _build(kind: str, source: str, field: str, json_schema: Any, regex: Any, ebnf: Any) -> Any:
    """`source` (`_source`) built by the one of the three xgrammar builders its kind takes; a
    RequestError naming `field` with xgrammar's reason when it cannot be built."""
    try:
        if kind == "json_schema":
            return json_schema(source, any_whitespace=False)
        return regex(source) if kind == "regex" else ebnf(source)
    except Exception as error:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError with its reason
        raise RequestError(f"{field}: {_DESCRIBED[kind]} cannot be used: {xgrammar_reason(error)}", field) from None


def check_constraint(kind: str, value: Any, field: str) -> None:
    """Compile a constraint without a vocabulary; a RequestError naming `field` (the request field
    that gave it) when xgrammar cannot use it, with xgrammar's reason."""
    grammar = _xgrammar(field).Grammar
    _build(kind, _source(kind, value), field, grammar.from_json_schema, grammar.from_regex, grammar.from_ebnf)


class Grammars:
    """Compiles (and caches) the grammars of constraints for one tokenizer and vocabulary."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: frozenset[int]):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_ids = sorted(stop_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], Any] = {}

    @functools.cached_property
    def think_end_id(self) -> int | None:
        """The token that closes the reasoning block, if `</think>` is one token (looked up when a
        request first needs it: the vocabulary map costs tens of milliseconds on a large model)."""
        return self._tokenizer.get_vocab().get("</think>")

    def compile(self, kind: str, value: Any) -> Any:
        """The compiled grammar of a constraint (`constraint_of`); a RequestError naming
        response_format (a JSON schema) or the sampling field if xgrammar cannot compile it."""
        key = (kind, _source(kind, value))
        field = constraint_field(kind)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                return compiled
            xgr = _xgrammar(field)
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size,
                                                          stop_token_ids=self._stop_ids or None)
                self._compiler = xgr.GrammarCompiler(info)
            compiler = self._compiler
            compiled = _build(kind, key[1], field, compiler.compile_json_schema, compiler.compile_regex,
                              compiler.compile_grammar)
            if len(self._cache) >= 256:
                self._cache.clear()
            self._cache[key] = compiled
            return compiled


class GrammarConstraint:
    """One row's constraint: a matcher over the compiled grammar, waiting for `gate` (the token
    that ends the reasoning) when given."""

    def __init__(self, compiled: Any, gate: int | None):
        import xgrammar as xgr

        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.gate = gate
        self.bitmask = xgr.allocate_token_bitmask(1, compiled.tokenizer_info.vocab_size)

    @property
    def active(self) -> bool:
        return self.gate is None and not self.matcher.is_terminated()

    def mask(self, logits_row: Any) -> None:
        """Set the logits of tokens that would break the constraint to -inf (in place; [1, vocab])."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        self._xgr.apply_token_bitmask_inplace(logits_row, self.bitmask.to(logits_row.device))

    def observe(self, token: int) -> None:
        if self.gate is not None:
            if token == self.gate:
                self.gate = None
            return
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token)

    @property
    def done(self) -> bool:
        """The constrained reply is complete and its end accepted."""
        return self.gate is None and self.matcher.is_terminated()
