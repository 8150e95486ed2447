"""What the model sees of a session: the last stored messages that fit, then the new ones.

The guide's dialog manager keeps the last 10 entries (user and assistant) as context; here every
message stays stored and only the prompt is windowed:

    prompt = request's system messages + last `max_messages` stored messages + request's other messages

When a token budget is given, the oldest stored messages are dropped first until the prompt fits.
The request's own messages are never dropped: if they alone exceed the budget, the prompt is
returned as is and the engine refuses it with a 400 that names the context length. A window may
start with an assistant message (e.g. with an odd `max_messages`), as the guide's does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from r1.chat_template import render_chat

Message = dict[str, str]
TokenCounter = Callable[[list[Message]], int]


@dataclass(frozen=True)
class Window:
    messages: list[Message]
    # Stored messages the prompt carries, and how many more the token budget left out.
    num_history_messages: int
    num_dropped_for_tokens: int


def build_window(
    history: Sequence[Message],
    new_messages: Sequence[Message] = (),
    *,
    max_messages: int = 10,
    token_budget: int | None = None,
    count_tokens: TokenCounter | None = None,
) -> Window:
    """The prompt for a turn; `history` is the stored messages, oldest first (a tail is enough)."""
    if not isinstance(max_messages, int) or max_messages < 0:
        raise ValueError(f"max_messages={max_messages!r} must be an integer >= 0")
    if token_budget is not None and count_tokens is None:
        raise ValueError("token_budget needs count_tokens (e.g. chat_token_counter(tokenizer))")
    system = [dict(m) for m in new_messages if m["role"] == "system"]
    rest = [dict(m) for m in new_messages if m["role"] != "system"]
    tail = [dict(m) for m in history[-max_messages:]] if max_messages else []

    def prompt(num_dropped: int) -> list[Message]:
        return system + tail[num_dropped:] + rest

    def fits(num_dropped: int) -> bool:
        return token_budget is None or count_tokens(prompt(num_dropped)) <= token_budget

    if fits(0) or not tail:
        return Window(prompt(0), len(tail), 0)
    # Dropping messages only shrinks the prompt, so binary-search the fewest drops that fit
    # (log2(len(tail)) token counts instead of one per message).
    low, high = 1, len(tail)
    while low < high:
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle + 1
    return Window(prompt(low), len(tail) - low, low)


def prompt_token_budget(
    context_tokens: int,
    max_new_tokens: int | None,
    *,
    reply_reserve_tokens: int,
    window_tokens: int | None = None,
) -> int:
    """Tokens the prompt may use: the model's context minus room for the reply, capped by `window_tokens`.

    The room is the request's max tokens when it sets one, else `reply_reserve_tokens` (at most half
    the context, so a small model still gets a prompt)."""
    if context_tokens < 2:
        raise ValueError(f"context_tokens={context_tokens} must be >= 2")
    reserve = max_new_tokens if max_new_tokens is not None else min(reply_reserve_tokens, context_tokens // 2)
    budget = context_tokens - reserve
    if window_tokens is not None:
        budget = min(budget, window_tokens)
    return max(budget, 1)


def chat_token_counter(tokenizer: Any) -> TokenCounter:
    """Count a prompt's tokens exactly as the engine will: the chat template, then the tokenizer.

    A tokenizer without a chat template cannot serve chat requests; for it the count is the content
    tokens plus 4 per message (the engine refuses such chat requests anyway)."""
    if getattr(tokenizer, "chat_template", None):
        def count(messages: list[Message]) -> int:
            text = render_chat(tokenizer, messages)
            return len(tokenizer.encode(text, add_special_tokens=False))
    else:
        def count(messages: list[Message]) -> int:
            return sum(len(tokenizer.encode(m["content"], add_special_tokens=False)) + 4 for m in messages)
    return count
