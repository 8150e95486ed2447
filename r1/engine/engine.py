"""The transformers engine: continuous batching over a Hugging Face causal LM.

`TransformersEngine` turns prompts (text, token ids or chat messages) into validated requests,
feeds them to the `Scheduler`, and exposes two ways to get results:

- `stream(...)`: an async iterator of `Delta`s, served by a background decode thread shared by all
  requests (the Serve deployment and `r1 chat` use this); closing the iterator aborts the request
  and frees its slot;
- `generate_batch(...)`: a blocking call that runs the decode loop in the calling thread when no
  background thread is running (training rollouts, evaluation, benchmarks).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Union

import torch

from r1.chat_template import continued_message, continues_reasoning, render_chat
from r1.config import DEFAULT_MAX_NEW_TOKENS_CAP, EngineConfig, ModelConfig, SamplingConfig
from r1.engine.openmp import release_thread_pool
from r1.engine.lora import AdapterRows, adapter_index, attach_adapters
from r1.engine.prefix_cache import new_prefix_cache
from r1.engine.runner import LocalModelRunner, ModelRunner
from r1.engine.scheduler import EngineOverloaded, Scheduler
from r1.engine.structured import Grammars, constraint_of
from r1.engine.types import Completion, Delta, Request, RequestError
from r1.reasoning import THINK_CLOSE, THINK_OPEN

logger = logging.getLogger(__name__)

Prompt = Union[str, list[int], list[dict[str, str]]]


def resolve_max_new_tokens(prompt_tokens: int, requested: int | None, context_tokens: int) -> int:
    """How many tokens a request may generate; a prompt or request beyond the context is an error."""
    room = context_tokens - prompt_tokens
    if room <= 0:
        raise RequestError(
            f"the prompt has {prompt_tokens} tokens but the model's context is {context_tokens} tokens; shorten the prompt",
            code="context_length_exceeded",
        )
    if requested is None:
        return min(room, DEFAULT_MAX_NEW_TOKENS_CAP)
    if requested > room:
        raise RequestError(
            f"max_new_tokens={requested} plus the prompt's {prompt_tokens} tokens exceeds the model's context of "
            f"{context_tokens} tokens; use max_new_tokens <= {room}", "max_new_tokens", "context_length_exceeded",
        )
    return requested


def stop_token_ids(model: Any, tokenizer: Any, generation_config: Any = None) -> frozenset[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    generation_config = generation_config or getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    return frozenset(ids)


class Inbox:
    """One stream's deltas on its consumer's loop, and the future its consumer waits on when it has
    read them all. Lighter than an `asyncio.Queue`, whose `get` is one more coroutine per delta:
    with r1-tiny at 16 streams, handing deltas over is a sizeable share of what the decode thread
    waits for (the consumer holds the GIL meanwhile)."""

    __slots__ = ("deltas", "waiter")

    def __init__(self) -> None:
        self.deltas: collections.deque[Delta] = collections.deque()
        self.waiter: asyncio.Future | None = None

    def put(self, delta: Delta) -> None:
        self.deltas.append(delta)
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Mailbox:
    """Hands deltas from the producing thread to one asyncio loop in batches.

    Every running sequence emits a delta per decode step; waking the loop once per delta costs a
    self-pipe write and an epoll round trip each, on the cores the model runs on. Immediately
    (`deferred=False`), the first delta after a drain schedules one drain and the rest ride along
    while it waits. Deferred, nothing is scheduled until the producer calls `wake()` when its batch
    of deltas is complete: the engine's decode loop does so after each batch of tokens, so a step of
    16 sequences wakes the loop once. Immediate delivery woke it about ten times a step, since the
    loop drained as soon as the first delta came and each of the step's later ones found it idle.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, deferred: bool = False) -> None:
        # Weak: `Mailboxes` keys its mailboxes by loop weakly, and a strong reference here would keep
        # every loop that ever streamed (and its mailbox) alive.
        self._loop = weakref.ref(loop)
        self._deferred = deferred
        self._items: list[tuple[Inbox, Delta]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, inbox: Inbox, delta: Delta) -> None:
        """Queue a delta; raises RuntimeError when the loop is gone (nobody is listening any more:
        the scheduler then aborts the request)."""
        loop = self._loop()
        if loop is None or loop.is_closed():
            raise RuntimeError("the event loop is gone")
        with self._lock:
            self._items.append((inbox, delta))
            if self._scheduled or self._deferred:
                return
            self._scheduled = True
        self._schedule()

    def wake(self) -> None:
        """Schedule a drain of what was posted, if nothing is scheduled yet."""
        with self._lock:
            if self._scheduled or not self._items:
                return
            self._scheduled = True
        self._schedule()

    def _schedule(self) -> None:
        try:
            loop = self._loop()
            if loop is None:
                raise RuntimeError("the event loop is gone")
            loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop closed meanwhile: nobody is listening any more
            with self._lock:
                self._items.clear()
                self._scheduled = False
            raise

    def _drain(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for inbox, delta in items:
            inbox.put(delta)


class Mailboxes:
    """One `Mailbox` per asyncio loop that streams from an engine (weakly held: a closed loop goes).
    `deferred`: the producer calls `wake()` when a batch of deltas is complete (see `Mailbox`)."""

    def __init__(self, deferred: bool = False) -> None:
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._deferred = deferred

    def get(self, loop: asyncio.AbstractEventLoop) -> Mailbox:
        with self._lock:
            mailbox = self._by_loop.get(loop)
            if mailbox is None:
                mailbox = self._by_loop[loop] = Mailbox(loop, self._deferred)
            return mailbox

    def wake(self) -> None:
        """Deliver what was posted to every loop (one drain each); a loop that closed meanwhile
        loses its deltas, whose requests abort at their next post."""
        with self._lock:
            mailboxes = list(self._by_loop.values())
        for mailbox in mailboxes:
            try:
                mailbox.wake()
            except RuntimeError:
                pass

    async def stream(
        self, request: Request, submit: Callable[[Request, Any], None], abort: Callable[[str], None], coalesce: bool,
    ) -> AsyncIterator[Delta]:
        """An engine's `stream` for a made request: `submit(request, emit)` it with an `emit` that
        posts to the running loop's mailbox, yield its deltas, and `abort(request_id)` it when the
        consumer leaves before the last one.

        `coalesce`: deltas that piled up while the consumer was busy come as one (fewer, larger
        messages when each costs a network hop; a fast consumer still gets one per token)."""
        loop = asyncio.get_running_loop()
        mailbox = self.get(loop)
        inbox = Inbox()
        deltas = inbox.deltas
        submit(request, lambda delta: mailbox.post(inbox, delta))
        finished = False
        try:
            while True:
                if not deltas:
                    inbox.waiter = loop.create_future()
                    await inbox.waiter
                delta = deltas.popleft()
                while coalesce and delta.finish_reason is None and deltas:
                    delta = delta.followed_by(deltas.popleft())
                finished = delta.finish_reason is not None
                yield delta
                if finished:
                    return
        finally:
            if not finished:
                abort(request.request_id)


_REQUEST_IDS = itertools.count()


def encode_prompt(tokenizer: Any, prompt: Prompt, vocab_size: int) -> list[int]:
    """Token ids for a text prompt, token ids, or chat messages (rendered with the chat template)."""
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt, add_special_tokens=True))
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        if any(t < 0 or t >= vocab_size for t in prompt):
            raise RequestError(f"prompt token ids must be in [0, {vocab_size})")
        return list(prompt)
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "this model's tokenizer has no chat template; send a raw text prompt instead "
                "(`r1 generate --raw`, or /v1/completions)"
            )
        text = render_chat(tokenizer, prompt)
        return list(tokenizer.encode(text, add_special_tokens=False))
    raise ValueError("prompt must be a string, a list of token ids, or a list of chat messages")


def new_request(
    tokenizer: Any, prompt: Prompt, sampling: SamplingConfig, request_id: str | None, *,
    vocab_size: int, context_tokens: int, stop_ids: frozenset[int], scheduling_policy: str = "fcfs",
) -> Request:
    """A validated request: encoded prompt, resolved token budget, stop ids. Every engine makes its
    requests here, so prompts and limits follow the same rules whichever engine runs them."""
    prompt_ids = encode_prompt(tokenizer, prompt, vocab_size)
    if not prompt_ids:
        raise RequestError("the prompt is empty")
    if sampling.priority and scheduling_policy != "priority":
        raise RequestError("priority needs priority scheduling (engine.scheduling_policy: priority); this engine "
                           "serves requests in arrival order", "priority")
    for field, ids in (("logit_bias", sampling.logit_bias), ("stop_token_ids", sampling.stop_token_ids),
                       ("allowed_token_ids", sampling.allowed_token_ids or ())):
        beyond = [token for token in ids if token >= vocab_size]
        if beyond:
            raise RequestError(f"{field} names token id {beyond[0]}, outside the model's vocabulary of {vocab_size} tokens",
                               field)
    max_new_tokens = resolve_max_new_tokens(len(prompt_ids), sampling.max_new_tokens, context_tokens)
    if sampling.min_tokens > max_new_tokens:
        raise RequestError(f"min_tokens={sampling.min_tokens} is more than this reply may have ({max_new_tokens} tokens)",
                           "min_tokens")
    return Request(
        request_id=request_id or f"req-{next(_REQUEST_IDS)}-{uuid.uuid4().hex[:8]}",
        prompt_token_ids=prompt_ids,
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        stop_token_ids=stop_ids,
        bad_words_ids=bad_words_token_ids(tokenizer, sampling.bad_words),
    )


def bad_words_token_ids(tokenizer: Any, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """The token sequences `words` are banned as: each word (leading spaces dropped) as it is
    tokenized alone, and after a space, which byte-level tokenizers often write as other tokens
    (" answer" one token, "answer" three). vLLM keeps the spaced form only when it has as many
    tokens as the bare one, so a word like that stays writable after a space there."""
    sequences: list[tuple[int, ...]] = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if ids:
                sequences.append(ids)
    return tuple(dict.fromkeys(sequences))


def chat_template_prefills_think(tokenizer: Any) -> bool:
    """Whether the chat template opens the reasoning block itself (DeepSeek-R1 style)."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    probe = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)
    return probe.rstrip().endswith("<think>")


def per_prompt_sampling(
    prompts: Sequence[Prompt], sampling: SamplingConfig | Sequence[SamplingConfig] | None
) -> list[SamplingConfig]:
    """`generate_batch`'s sampling argument as one config per prompt (one for all, or one each)."""
    if sampling is None or isinstance(sampling, SamplingConfig):
        return [sampling or SamplingConfig()] * len(prompts)
    samplings = list(sampling)
    if len(samplings) != len(prompts):
        raise ValueError(f"got {len(samplings)} sampling configs for {len(prompts)} prompts")
    return samplings


class BatchResults:
    """The deltas of a batch of requests, collected from any thread until every request finished."""

    def __init__(self, requests: list[Request]) -> None:
        self.requests = requests
        self._deltas: dict[str, list[Delta]] = {r.request_id: [] for r in requests}
        self._done = threading.Semaphore(0)
        self._finished = 0

    def collect(self, delta: Delta) -> None:
        self._deltas[delta.request_id].append(delta)
        if delta.finish_reason is not None:
            self._finished += 1
            self._done.release()

    def done(self) -> bool:
        return self._finished == len(self.requests)

    def wait(self) -> list[Completion]:
        """Every request's completion, in order; RuntimeError if any generation failed."""
        for _ in self.requests:
            self._done.acquire()
        completions = [completion_of(r, self._deltas[r.request_id]) for r in self.requests]
        failed = [c for c in completions if c.error]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(completions)} generations failed: {failed[0].error}")
        return completions


def completion_of(request: Request, deltas: list[Delta]) -> Completion:
    """The whole result of a request from all its deltas (the last one carries the finish reason)."""
    last = deltas[-1]
    return Completion(
        request_id=request.request_id,
        prompt_token_ids=request.prompt_token_ids,
        token_ids=[t for d in deltas for t in d.token_ids],
        text="".join(d.text for d in deltas),
        finish_reason=last.finish_reason or "abort",
        error=last.error,
        logprobs=[lp for d in deltas for lp in d.logprobs or ()] if request.sampling.logprobs is not None else None,
        prompt_logprobs=deltas[0].prompt_logprobs,
        stop_reason=last.stop_reason,
    )


class TransformersEngine:
    """The default engine (CPU and GPU). Satisfies the `r1.engine.Engine` protocol."""

    name = "transformers"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: EngineConfig | None = None,
        runner: ModelRunner | None = None,
        context_tokens: int | None = None,
        stop_ids: frozenset[int] | None = None,
        adapters: tuple[dict[str, int], AdapterRows] | None = None,
        owns_weights: bool = False,
    ):
        """`model` may be None when a `runner` (e.g. the sharded one) runs the model elsewhere; then
        `context_tokens` must be given. `adapters`: what `r1.engine.lora.attach_adapters` returned
        for `model` (each adapter's index, and the rows its layers read). `owns_weights`: nothing
        but this engine uses `model` (`from_config` loaded it), so `engine.prefix_cache_mb: auto`
        may keep a prefix cache of it; a caller that changes the weights of a model it gave keeps
        the default (False), or calls `reset_prefix_cache()` after each change."""
        from r1.model import context_length

        if model is None and (runner is None or context_tokens is None):
            raise ValueError("TransformersEngine without a model needs a runner and context_tokens")
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.device = next(model.parameters()).device if model is not None else torch.device("cpu")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.adapters, adapter_rows = adapters if adapters is not None else ({}, None)
        self.runner = runner or LocalModelRunner(model, pad_token_id=pad_id or 0, adapter_rows=adapter_rows,
                                                 prefix_cache=new_prefix_cache(self.config, owns_weights))
        self.context_tokens = context_tokens or context_length(model, tokenizer)
        self.stop_token_ids = stop_ids if stop_ids is not None else stop_token_ids(model, tokenizer)
        self.grammars = Grammars(tokenizer, self.runner.vocab_size, self.stop_token_ids)  # compiled on first use
        # asyncio loop -> its mailbox. Deferred: the scheduler wakes the loops once per batch of
        # tokens it emitted (one cross-thread wakeup per loop and step, not one per token).
        self._mailboxes = Mailboxes(deferred=True)
        self.scheduler = Scheduler(self.runner, tokenizer, self.config, self.device, on_emitted=self._mailboxes.wake)
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._inline_lock = threading.Lock()
        # One scheduler step at a time, whoever runs it: the background loop or generate_batch's caller.
        self._step_lock = threading.Lock()

    @classmethod
    def from_config(cls, model_config: ModelConfig, engine_config: EngineConfig | None = None) -> TransformersEngine:
        from r1.engine.optimize import apply_engine_options, check_engine_options
        from r1.model import load_model, resolve_device

        engine_config = engine_config or EngineConfig()
        check_engine_options(engine_config, resolve_device(model_config.device))  # before the weights load
        model, tokenizer = load_model(model_config)
        # Before the engine options: they may replace the Linear layers the adapters wrap (prepack
        # and int8 then replace the wrapped layer inside its wrapper).
        adapters = attach_adapters(model, engine_config.lora_adapters) if engine_config.lora_adapters else None
        return cls(apply_engine_options(model, engine_config), tokenizer, engine_config, adapters=adapters,
                   owns_weights=True)

    # -- inputs ----------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.runner.vocab_size)

    def make_request(self, prompt: Prompt, sampling: SamplingConfig, request_id: str | None = None,
                     adapter: str | None = None) -> Request:
        """`adapter`: the name of a LoRA adapter of `engine.lora_adapters` (None: the base model)."""
        index = adapter_index(self.adapters, adapter)
        request = new_request(self.tokenizer, prompt, sampling, request_id, vocab_size=self.runner.vocab_size,
                              context_tokens=self.context_tokens, stop_ids=self.stop_token_ids,
                              scheduling_policy=self.config.scheduling_policy)
        request.adapter = index
        constraint = constraint_of(sampling)
        if constraint is not None:
            if sampling.allowed_token_ids is not None:  # the two masks could leave no token at all
                raise RequestError("allowed_token_ids cannot be combined with structured output (response_format "
                                   "json_object/json_schema, guided decoding)", "allowed_token_ids")
            if sampling.min_tokens:  # it would hold back the end-of-sequence a complete reply must take
                raise RequestError("min_tokens cannot be combined with structured output (response_format json_object/"
                                   "json_schema, guided decoding)", "min_tokens")
            request.grammar = self.grammars.compile(*constraint)
            request.grammar_gate = self.grammars.think_end_id if self._reasoning_first(prompt) else None
        if sampling.thinking_token_budget is not None:
            request.think_ids = self._think_ids
            if None in request.think_ids:
                raise RequestError(f"thinking_token_budget needs {THINK_OPEN} and {THINK_CLOSE} to be single tokens of "
                                   "the model's vocabulary; this model has no such tokens", "thinking_token_budget")
            request.reasoning_first = self._reasoning_first(prompt)
        return request

    def _reasoning_first(self, prompt: Prompt) -> bool:
        """Whether the reply to `prompt` starts inside the reasoning: a chat prompt whose template
        opens it, or that continues a message stopped inside it."""
        if not (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)):
            return False
        continued = continued_message(prompt)
        return self.think_prefilled if continued is None else continues_reasoning(continued)

    # -- streaming API (background decode thread) ------------------------------------------
    def start(self) -> None:
        """Start the decode thread (idempotent). From here on the model runs there, so the calling
        thread gives back its OpenMP workers, which would otherwise halve the decode thread's speed
        (r1/engine/openmp.py); a later torch call in it builds them again."""
        release_thread_pool()
        with self._wakeup:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="r1-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        """Stop the decode thread; requests still waiting or running end with `abort`."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with self._step_lock:
            self.scheduler.close("the engine shut down")

    def _step(self) -> None:
        with self._step_lock:
            self.scheduler.step()

    def _loop(self) -> None:
        woke = True  # a new decode thread starts with the request that started it
        while True:
            with self._wakeup:
                if not self._stopping and not self.scheduler.has_work():
                    # Idle: give back this thread's OpenMP workers, so that they do not slow
                    # another thread's torch work meanwhile (r1/engine/openmp.py).
                    release_thread_pool()
                    while not self._stopping and not self.scheduler.has_work():
                        self._wakeup.wait(timeout=1.0)
                    woke = True
                if self._stopping:
                    return
            if woke:
                # The first request of a burst woke this thread, and the thread submitting the
                # burst (an event loop starting many streams) waits for the GIL: yield it once, so
                # the burst is admitted at one step rather than its first request alone a step
                # ahead of the rest. Costs a lone request one GIL hand-off.
                time.sleep(0)
                woke = False
            try:
                self._step()
            except Exception:  # the scheduler already ended the affected streams with an error
                logger.exception("engine step failed; in-flight requests were aborted")

    def submit(self, request: Request, emit: Any) -> None:
        """Queue a request; `emit(delta)` is called from the decode thread. Raises EngineOverloaded."""
        self.scheduler.submit(request, emit)
        with self._wakeup:
            self._wakeup.notify_all()

    def stream(
        self, prompt: Prompt | Request, sampling: SamplingConfig | None = None, request_id: str | None = None,
        coalesce: bool = False,
    ) -> AsyncIterator[Delta]:
        """Stream deltas for one request; leaving the loop early aborts the request. A bad prompt
        raises ValueError here; a full queue raises EngineOverloaded at the first delta.
        `coalesce`: see `Mailboxes.stream`."""
        request = prompt if isinstance(prompt, Request) else self.make_request(prompt, sampling or SamplingConfig(), request_id)
        self.start()
        return self._mailboxes.stream(request, self.submit, self.abort, coalesce)

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)
        with self._wakeup:
            self._wakeup.notify_all()

    # -- blocking API ------------------------------------------------------------------------
    def generate_batch(
        self, prompts: Sequence[Prompt], sampling: SamplingConfig | Sequence[SamplingConfig] | None = None
    ) -> list[Completion]:
        """Generate for many prompts at once with continuous batching; blocks until all finish."""
        requests = [self.make_request(p, s) for p, s in zip(prompts, per_prompt_sampling(prompts, sampling))]
        batch = BatchResults(requests)
        collect = batch.collect

        background = self._thread is not None and self._thread.is_alive()
        with self._inline_lock:
            self._submit_batch(requests, collect, step_when_full=not background)
            if not background:
                # Steps run here; should a stream start the background thread meanwhile, the step
                # lock keeps the two from stepping at once.
                while not batch.done() and self.scheduler.has_work():
                    self._step()
        return batch.wait()

    def _submit_batch(self, requests: list[Request], emit: Any, step_when_full: bool) -> None:
        """Submit a batch so that it joins at one step: no step runs between two of its submissions
        while they fit, so the same batch after the same `torch.manual_seed` draws the same tokens
        whoever steps. When the queue is full, the caller steps itself (`step_when_full`) or waits
        for the decode thread to make room."""
        remaining = collections.deque(requests)
        while remaining:
            with self._step_lock:
                while remaining:
                    try:
                        self.submit(remaining[0], emit)
                    except EngineOverloaded:
                        break
                    remaining.popleft()
            if remaining:
                if step_when_full:
                    self._step()
                else:
                    threading.Event().wait(0.01)

    @functools.cached_property
    def think_prefilled(self) -> bool:
        return chat_template_prefills_think(self.tokenizer)

    @functools.cached_property
    def _think_ids(self) -> tuple[int | None, int | None]:
        """The ids of <think> and </think> when each is one token (looked up once: the vocabulary map
        costs tens of milliseconds on a large model)."""
        vocab = self.tokenizer.get_vocab()
        return vocab.get(THINK_OPEN), vocab.get(THINK_CLOSE)

    @property
    def alive(self) -> bool:
        """False once the background decode thread died unexpectedly."""
        return self._thread is None or self._thread.is_alive() or self._stopping

    def stats(self) -> dict[str, int]:
        prefix_cache = getattr(self.runner, "prefix_cache", None)
        return {"running": len(self.scheduler.running), "waiting": self.scheduler.num_waiting(),
                "aborted": self.scheduler.num_aborted, **(prefix_cache.stats() if prefix_cache is not None else {})}

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix: call after changing the model's weights in place (the cached
        keys and values were computed with the old ones). A no-op without a prefix cache."""
        prefix_cache = getattr(self.runner, "prefix_cache", None)
        if prefix_cache is not None:
            prefix_cache.clear()

    def check_health(self) -> None:
        """Raise unless the engine can serve: its decode loop runs and its runner answers (a
        pipeline's model shards are alive). The LLM server's health check, so Serve replaces a
        replica whose shard died instead of leaving it to fail every request."""
        if not self.alive:
            raise RuntimeError("the engine's decode thread is not running")
        check = getattr(self.runner, "check_health", None)
        if check is not None:
            check()

    @torch.inference_mode()
    def warmup(self, all_batch_sizes: bool | None = None, full_batch: bool | None = None) -> None:
        """Run requests shaped like real ones so the first real ones do not pay one-time costs.

        `all_batch_sizes` (default: on CUDA) decodes once at every batch size from `max_num_seqs`
        down to 1, in `max_num_seqs` steps: request i stops after i + 2 tokens, so the batch shrinks
        by one row a step. `full_batch` (default: on CUDA) then decodes one full batch of prompts
        of different lengths (rows left-padded, attention with a real padding mask, as with real
        traffic) for up to 96 tokens. On CPU the default is one short request. The runner says where
        the model runs (`on_gpu`: a pipeline's stages may be on GPUs while the engine is not).

        On a GPU the first steps at a new shape pay for loading and choosing kernels and for the
        allocator's growth. r1-tiny on an H200, first 64-prompt batch after each warm-up, in
        tokens/s (bench/first_batch.py; about 11k once warm): fp32 1.3k with none, 6.3k after the
        sweep, 10.9k after the sweep and the full batch; bf16 2.2k, 5.4k and 9.9k. Both together
        took 1.2-1.4 s there (BENCHMARKS.md, "GPU check").
        """
        on_gpu = self.runner.on_gpu
        if all_batch_sizes is None:
            all_batch_sizes = on_gpu
        count = self.config.max_num_seqs if all_batch_sizes else 1
        longest = max(1, self.context_tokens - 1)
        sampling = [SamplingConfig(temperature=0, max_new_tokens=min(i + 2, longest), ignore_eos=True) for i in range(count)]
        self.generate_batch([[0]] * count, sampling)
        if full_batch is None:
            full_batch = on_gpu
        if full_batch:
            longest_prompt = max(1, min(32, self.context_tokens // 2))
            # Distinct prompts (a different first token per row), so the prefill has as many rows as
            # real traffic's: identical prompts are prefilled once.
            vocab = self.runner.vocab_size
            prompts = [[i % vocab] + [0] * (i % longest_prompt) for i in range(self.config.max_num_seqs)]
            new_tokens = max(1, min(96, self.context_tokens - longest_prompt - 1))
            self.generate_batch(prompts, SamplingConfig(temperature=0, max_new_tokens=new_tokens, ignore_eos=True))
