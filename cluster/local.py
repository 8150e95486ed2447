"""`r1 generate` and `r1 chat`: local generation in this process, no Ray.

Tokens stream to the terminal as they are produced; the model's reasoning (`<think>` part) is shown
apart from the answer. `r1 chat` keeps the dialog like the guide's dialog manager: each user
message and reply is appended and the last `--window` messages are sent as context.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TextIO

from cluster.cli import path_argument
from r1.config import GenerateConfig, apply_overrides, load_yaml, set_values
from r1.reasoning import ReasoningParser


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and sampling")
    group.add_argument("--config", help="YAML file with model, sampling and engine sections (keys as in --set)")
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config field, e.g. --set sampling.top_k=20 (repeatable)")
    group.add_argument("--model", type=path_argument, help="'r1-tiny' (embedded default), a local model directory, or a Hugging Face hub id")
    group.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], help="weights dtype (auto: bf16 on GPU, fp32 on CPU)")
    group.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to run the model (auto: GPU if present)")
    group.add_argument("--temperature", type=float,
                       help="sampling temperature; 0 = greedy. Lower it (e.g. 0.3) if output repeats itself (default 0.6)")
    group.add_argument("--top-p", type=float, help="nucleus sampling: keep the smallest token set with this probability mass (default 1.0)")
    group.add_argument("--top-k", type=int, help="keep only the k most likely tokens; 0 disables (default 0)")
    group.add_argument("--max-new-tokens", type=int,
                       help="most tokens to generate (default: what the context allows, at most 4096)")
    group.add_argument("--repetition-penalty", type=float,
                       help=">1 discourages repeating earlier tokens, the guide's fix for repetitive output (default 1.0)")
    group.add_argument("--seed", type=int, help="random seed for reproducible sampling")
    group.add_argument("--stop", action="append", help="stop when this string is generated (repeatable)")
    parser.add_argument("--hide-reasoning", action="store_true", help="print only the answer, not the <think> reasoning")


def config_from_args(args: argparse.Namespace) -> GenerateConfig:
    config = load_yaml(args.config, GenerateConfig) if args.config else GenerateConfig()
    config = apply_overrides(config, args.set)
    flags = {}
    for flag, key in [
        ("model", "model.model"), ("dtype", "model.dtype"), ("device", "model.device"),
        ("temperature", "sampling.temperature"), ("top_p", "sampling.top_p"), ("top_k", "sampling.top_k"),
        ("max_new_tokens", "sampling.max_new_tokens"), ("repetition_penalty", "sampling.repetition_penalty"),
        ("seed", "sampling.seed"), ("stop", "sampling.stop"),
    ]:
        value = getattr(args, flag, None)
        if value is not None:
            flags[key] = check_text(value, f"--{flag.replace('_', '-')}")
    # Flag values are set as they are (not re-read as YAML: a '#' or '[' in a path stays in it).
    return set_values(config, flags, "command-line flags") if flags else config


def check_text(value: object, what: str) -> object:
    """Text from the command line or stdin must be valid Unicode: bytes that are not UTF-8 arrive as
    lone surrogates (Python's surrogateescape), which the tokenizer cannot take."""
    texts = value if isinstance(value, list) else [value]
    for text in texts:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{what} is not valid UTF-8 text") from None
    return value


class ReasoningPrinter:
    """Prints reasoning and answer deltas under separate headings."""

    def __init__(self, out: TextIO, hide_reasoning: bool = False):
        self.out = out
        self.hide_reasoning = hide_reasoning
        self.section: str | None = None
        self.color = out.isatty()

    def write(self, reasoning: str, content: str) -> None:
        if reasoning and not self.hide_reasoning:
            self._enter("reasoning")
            self.out.write(f"\x1b[2m{reasoning}\x1b[0m" if self.color else reasoning)
        if content:
            self._enter("answer")
            self.out.write(content)
        self.out.flush()

    def _enter(self, section: str) -> None:
        if self.section == section:
            return
        if self.section is not None:
            self.out.write("\n")
        if not (section == "answer" and self.hide_reasoning):
            self.out.write("[thinking]\n" if section == "reasoning" else "[answer]\n")
        self.section = section


async def stream_reply(engine, messages_or_prompt, sampling, printer: ReasoningPrinter, think_prefilled: bool) -> tuple[str, str]:
    parser = ReasoningParser(think_prefilled=think_prefilled)
    reasoning, content = [], []
    finish = None
    async for delta in engine.stream(messages_or_prompt, sampling):
        r, c = parser.feed(delta.text)
        reasoning.append(r), content.append(c)
        printer.write(r, c)
        finish = delta
    r, c = parser.finish()
    reasoning.append(r), content.append(c)
    printer.write(r, c)
    printer.out.write("\n")
    if finish is not None and finish.error:
        raise RuntimeError(f"generation failed: {finish.error}")
    if finish is not None and finish.finish_reason == "length":
        printer.out.write("[stopped at max_new_tokens; raise --max-new-tokens for longer answers]\n")
    return "".join(reasoning), "".join(content)


def _load_engine(config: GenerateConfig):
    from r1.engine import create_engine

    print(f"loading {config.model.model} ...", file=sys.stderr)
    return create_engine(config.model, config.engine)


def run_generate(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    check_text(args.prompt, "the prompt")
    engine = _load_engine(config)
    printer = ReasoningPrinter(sys.stdout, args.hide_reasoning)
    prompt = args.prompt if args.raw else [{"role": "user", "content": args.prompt}]
    try:
        asyncio.run(stream_reply(engine, prompt, config.sampling, printer, think_prefilled=not args.raw))
    finally:
        engine.shutdown()
    return 0


def run_chat(args: argparse.Namespace) -> int:
    if args.window < 0:
        raise ValueError(f"--window {args.window}: use 0 (no context) or more past messages")
    config = config_from_args(args)
    engine = _load_engine(config)
    printer = ReasoningPrinter(sys.stdout, args.hide_reasoning)
    history: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    print("r1 chat: type a message; /reset clears the dialog, /exit or Ctrl-D quits.", file=sys.stderr)
    try:
        while True:
            if interactive:
                sys.stdout.write("you> ")
                sys.stdout.flush()
            line = sys.stdin.readline()
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            if text in {"/exit", "/quit"}:
                break
            if text == "/reset":
                history.clear()
                print("(dialog cleared)")
                continue
            printer.section = None
            try:
                check_text(text, "this message")
                messages = _window(history, args.window) + [{"role": "user", "content": text}]
                _, answer = asyncio.run(stream_reply(engine, messages, config.sampling, printer, think_prefilled=True))
            except ValueError as error:  # e.g. the dialog outgrew the context; the chat goes on
                print(f"error: {error}", file=sys.stderr)
                continue
            history.extend([{"role": "user", "content": text}, {"role": "assistant", "content": answer}])
            history = _window(history, args.window)
    finally:
        engine.shutdown()
    return 0


def _window(history: list[dict[str, str]], size: int) -> list[dict[str, str]]:
    """The last `size` messages (none for 0: `history[-0:]` would be all of them)."""
    return history[-size:] if size > 0 else []


def register(subparsers) -> None:
    gen = subparsers.add_parser(
        "generate", help="generate a reply to one prompt locally (no Ray)",
        description="Generate a reply to one prompt in this process, streaming reasoning and answer separately.",
    )
    gen.add_argument("prompt", help="the user message (or raw text with --raw)")
    gen.add_argument("--raw", action="store_true", help="feed the prompt as raw text, without the chat template")
    add_generation_flags(gen)
    gen.set_defaults(func=run_generate)

    chat = subparsers.add_parser(
        "chat", help="interactive chat with a local model (no Ray)",
        description="Interactive chat in the terminal. Reads one message per line from stdin.",
    )
    chat.add_argument("--window", type=int, default=10,
                      help="how many past messages (user and assistant) are sent as context; 0 sends none (default 10)")
    add_generation_flags(chat)
    chat.set_defaults(func=run_chat)
