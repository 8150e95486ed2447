"""The code-validation loop of a chat request (`code_validation: true`), wired to Serve handles.

`r1.codecheck.solve_with_repair` owns the loop (generate → extract → syntax → tests in the
sandbox → repair with the errors fed back and a lower temperature). This module only adapts the
LLMServer and CodeValidator handles to the blocking callables the loop takes; the ingress runs it
in a worker thread so its event loop stays free.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from actors.code_validator import HandleValidator, run_on_loop
from r1.codecheck import RepairOutcome, solve_with_repair
from r1.config import CodeCheckConfig, SamplingConfig
from r1.reasoning import split_reasoning
from r1.serving.protocol import APIError, new_id
from r1.telemetry import inject_context


@dataclass
class Generation:
    reasoning: str
    content: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = 0  # of the prompt's tokens, those the prefix cache held (None: not said)


@dataclass
class HandleGenerator:
    """`generate(prompt, *, temperature) -> str` over the LLMServer handle, keeping every generation."""

    llm: Any
    sampling: SamplingConfig
    timeout_s: float
    loop: asyncio.AbstractEventLoop  # the ingress's: the handle is called there (see run_on_loop)
    adapter: str | None = None  # the LoRA adapter the request named (None: the base model)
    generations: list[Generation] = field(default_factory=list)

    def __call__(self, prompt: str, *, temperature: float) -> str:
        body = {"prompt": [{"role": "user", "content": prompt}], "chat": True, "request_id": new_id("code"),
                "sampling": self.sampling.model_copy(update={"temperature": temperature}).model_dump(),
                "adapter": self.adapter, "trace": inject_context()}

        async def collect() -> list[dict[str, Any]]:
            return [item async for item in self.llm.options(stream=True).stream.remote(body)]

        try:
            items = run_on_loop(self.loop, collect, self.timeout_s)
        except TimeoutError:
            raise APIError(503, f"the model did not finish within {self.timeout_s:.0f}s; retry later",
                           code="timeout") from None
        text, prompt_tokens, completion_tokens, finish, think_prefilled, cached = [], 0, 0, None, True, 0
        for item in items:
            if item["type"] == "error":
                raise APIError(item["status"], item["message"], param=item.get("param"), code=item.get("code"))
            if item["type"] == "start":  # it also carries the first delta
                prompt_tokens, think_prefilled, cached = item["prompt_tokens"], item["think_prefilled"], item.get("cached_tokens")
            if item.get("error"):
                raise APIError(503, "the model server failed while generating; retry the request", code="unavailable")
            text.append(item["text"])
            completion_tokens += item["num_tokens"]
            finish = item["finish_reason"] or finish
        reasoning, content = split_reasoning("".join(text), think_prefilled=think_prefilled)
        self.generations.append(Generation(reasoning, content, finish, prompt_tokens, completion_tokens, cached))
        # The loop extracts code from the answer; a model that never closed its reasoning gets all of it.
        return content or reasoning


def run_code_loop(llm: Any, validator: Any, task: str, tests: list[str] | str | None, sampling: SamplingConfig,
                  config: CodeCheckConfig, max_repairs: int | None, timeout_s: float,
                  loop: asyncio.AbstractEventLoop, cancelled: threading.Event | None = None,
                  adapter: str | None = None) -> tuple[RepairOutcome, HandleGenerator]:
    """Blocking: run it in a worker thread. `loop` is the caller's event loop; the handles are called
    there (an ingress with `ingress_single_loop` can call them nowhere else). Once `cancelled` is set
    (the client went away) no further generation or sandbox run starts."""
    generate = HandleGenerator(llm, sampling, timeout_s, loop, adapter)
    outcome = solve_with_repair(task, generate, tests=tests, config=config,
                                validator=HandleValidator(validator, timeout_s, loop=loop),
                                temperature=sampling.temperature, max_repairs=max_repairs,
                                should_stop=cancelled.is_set if cancelled is not None else None)
    return outcome, generate
