"""Structured output: replies that must be JSON valid against a schema (OpenAI's `response_format`).

xgrammar compiles the schema into a grammar over the model's vocabulary; at each decode step a
row's `GrammarMatcher` gives the tokens that keep the reply a valid prefix (a bitmask the sampler
applies to the row's logits after penalties and bias), and takes the chosen token. Once the JSON
is complete only end-of-sequence is allowed, so the reply ends there.

Whitespace between JSON tokens is not allowed (compact JSON): a grammar that allows any amount
lets a small model fill its whole budget with spaces. A chat request to a model whose template
opens the reasoning block (`<think>`, DeepSeek-R1 style) reasons freely first: its matcher starts
after the model closes the block with `</think>` (when that is one token), so only the answer is
constrained, as vLLM's reasoning-aware structured output does.

xgrammar is imported when a request first asks for structured output (the `structured` extra).
"""

from __future__ import annotations

import functools
import json
import re
import threading
from typing import Any

from r1.engine.types import RequestError

# xgrammar's errors open with "[time] source.cc:line: "; the reason follows.
_ERROR_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


def xgrammar_reason(error: Exception) -> str:
    """The reason in an xgrammar error, without its source location."""
    return _ERROR_PREFIX.sub("", str(error)).strip()


class Grammars:
    """Compiles (and caches) JSON-schema grammars for one tokenizer and vocabulary."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: frozenset[int]):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_ids = sorted(stop_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()
        self._cache: dict[str, Any] = {}

    @functools.cached_property
    def think_end_id(self) -> int | None:
        """The token that closes the reasoning block, if `</think>` is one token (looked up when a
        request first needs it: the vocabulary map costs tens of milliseconds on a large model)."""
        return self._tokenizer.get_vocab().get("</think>")

    def _xgrammar(self) -> Any:
        try:
            import xgrammar
        except ImportError:
            raise RequestError("structured output (response_format json_object / json_schema) needs the xgrammar "
                               "package: pip install 'r1-cluster[structured]'", "response_format", "unsupported") from None
        return xgrammar

    def compile(self, schema: dict[str, Any]) -> Any:
        """The compiled grammar of `schema`; a RequestError naming response_format if it is not a
        schema xgrammar can compile."""
        key = json.dumps(schema)  # not sorted: the order of "properties" is the order the reply writes them
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                return compiled
            xgr = self._xgrammar()
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size,
                                                          stop_token_ids=self._stop_ids or None)
                self._compiler = xgr.GrammarCompiler(info)
            try:
                compiled = self._compiler.compile_json_schema(key, any_whitespace=False)
            except Exception as error:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError with its reason
                reason = xgrammar_reason(error)
                raise RequestError(f"response_format: the JSON schema cannot be used: {reason}", "response_format") from None
            if len(self._cache) >= 256:
                self._cache.clear()
            self._cache[key] = compiled
            return compiled


class JsonConstraint:
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
        """Set the logits of tokens that would break the JSON to -inf (in place; [1, vocab])."""
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
        """The JSON is complete and its end accepted."""
        return self.gate is None and self.matcher.is_terminated()
