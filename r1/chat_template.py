"""Rendering chat messages with a tokenizer's chat template, with template refusals as ValueError.

A chat template refuses messages it cannot render (a role it does not know, say) by raising a Jinja
error. `render_chat` turns that into a ValueError naming the template's reason, so the engine and
the session window, which map ValueError to a client error (HTTP 400), need no Jinja knowledge.
(A module of its own, without torch: the session store counts tokens with it.)

A final assistant message marked `"prefix": True` (DeepSeek's prefix completion; vLLM's
`continue_final_message`) is continued rather than answered: the template renders it as it renders
any assistant message, cut right after its text (no end-of-turn, no generation prompt), as
transformers' `continue_final_message` does.
"""

from __future__ import annotations

from typing import Any

from r1.reasoning import THINK_CLOSE, THINK_OPEN


def continued_message(messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The final assistant message the reply continues (marked `prefix`), if any."""
    last = messages[-1] if messages else None
    return last if last is not None and last.get("role") == "assistant" and last.get("prefix") else None


def continues_reasoning(message: dict[str, Any]) -> bool:
    """Whether a continued message stops inside a reasoning block (`<think>` not closed after it):
    the reply then goes on reasoning before it answers."""
    content = message.get("content") or ""
    return THINK_OPEN in content and THINK_CLOSE not in content.rsplit(THINK_OPEN, 1)[1]


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The prompt text of chat `messages` under the tokenizer's chat template (a final `prefix`
    message continued, without the generation prompt)."""
    from jinja2 import TemplateError

    continued = continued_message(messages) is not None
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt and not continued,
                                             continue_final_message=continued, tokenize=False)
    except TemplateError as error:
        raise ValueError(f"the model's chat template cannot render these messages: {error}") from None
    except ValueError:  # transformers: the final message is not in the template's rendering
        if not continued:
            raise
        raise ValueError("the model's chat template does not show the final assistant message as it was sent (it "
                         "drops part of it), so it cannot be continued") from None
