"""Rendering chat messages with a tokenizer's chat template, with template refusals as ValueError.

A chat template refuses messages it cannot render (a role it does not know, say) by raising a Jinja
error. `render_chat` turns that into a ValueError naming the template's reason, so the engine and
the session window, which map ValueError to a client error (HTTP 400), need no Jinja knowledge.
(A module of its own, without torch: the session store counts tokens with it.)
"""

from __future__ import annotations

from typing import Any


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The prompt text of chat `messages` under the tokenizer's chat template."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except TemplateError as error:
        raise ValueError(f"the model's chat template cannot render these messages: {error}") from None
