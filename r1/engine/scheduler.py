"""Iteration-level (continuous) batching.

One `step()` is one iteration of the decode loop:

1. aborted requests leave (their KV rows are freed);
2. waiting requests are admitted while slots (`max_num_seqs`) and the prefill token budget allow,
   prefilled together, and sample their first token;
3. every running request (the new ones too) feeds its last token through one batched decode step
   and samples the next;
4. finished requests leave at once, without stalling the rest.

A request that arrives while others decode therefore joins at the next step. The scheduler knows
nothing about how the model runs: it drives a `ModelRunner` (in-process or sharded over actors).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from r1.config import EngineConfig
from r1.engine.detok import IncrementalDetokenizer
from r1.engine.memory import CudaCachePolicy
from r1.engine.runner import ModelRunner
from r1.engine.sampling import RowState, prompt_token_logprobs, sample_rows, token_logprobs
from r1.engine.structured import GrammarConstraint
from r1.engine.types import Delta, FinishReason, Request, TokenLogprob, Usage

logger = logging.getLogger(__name__)

Emit = Callable[[Delta], None]


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; the caller should answer 429/503 and retry later."""


@dataclass
class _Sequence:
    request: Request
    emit: Emit
    row: RowState
    detok: IncrementalDetokenizer
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # until its first delta carries them

    @property
    def seq_id(self) -> str:
        return self.request.request_id


class Scheduler:
    def __init__(self, runner: ModelRunner, tokenizer: Any, config: EngineConfig, device: torch.device,
                 on_emitted: Callable[[], None] | None = None):
        """`on_emitted()` is called after each batch of deltas (a step's first tokens, its decoded
        tokens, a step's aborts and failures), so that consumers can be woken once per batch."""
        self.runner = runner
        self._on_emitted = on_emitted or (lambda: None)
        self.tokenizer = tokenizer
        self.config = config
        self.device = device
        self.memory = CudaCachePolicy(device, config.cuda_empty_cache_every_steps, config.cuda_fragmentation_flush_ratio)
        self._lock = threading.Lock()
        self._waiting: deque[_Sequence] = deque()
        self._aborted: set[str] = set()
        # Admitted sequences, from admission (before their prefill) until released from the runner.
        self.running: dict[str, _Sequence] = {}
        self.num_steps = 0
        # Requests ended with `abort` so far (aborted by their caller, or failed, or shut down).
        self.num_aborted = 0

    # -- called from any thread ------------------------------------------------------------
    def submit(self, request: Request, emit: Emit) -> None:
        seq = _Sequence(
            request=request,
            emit=emit,
            row=RowState.create(request.sampling, request.prompt_token_ids, self.device, request.ending_token_ids(),
                                None if request.grammar is None else GrammarConstraint(request.grammar, request.grammar_gate),
                                request.bad_words_ids, request.think_ids, request.reasoning_first),
            detok=IncrementalDetokenizer(self.tokenizer, request.sampling.stop, request.sampling.min_tokens,
                                        request.sampling.include_stop_str_in_output),
        )
        with self._lock:
            if seq.seq_id in self.running or any(other.seq_id == seq.seq_id for other in self._waiting):
                raise ValueError(f"request id {seq.seq_id!r} is already in the engine; request ids must be unique")
            if len(self._waiting) >= self.config.max_queued_requests + self._free_slots():
                raise EngineOverloaded(
                    f"the engine queue is full ({len(self._waiting)} waiting, {len(self.running)} running); retry later"
                )
            self._queue(seq)

    def _queue(self, seq: _Sequence) -> None:
        """Put a sequence in the waiting queue: at its end, or (scheduling_policy: priority) after
        every waiting sequence of the same or a lower priority value. Called with the lock held."""
        priority = seq.request.sampling.priority
        waiting = self._waiting
        if self.config.scheduling_policy == "fcfs" or not waiting or waiting[-1].request.sampling.priority <= priority:
            waiting.append(seq)
            return
        at = next(i for i, other in enumerate(waiting) if other.request.sampling.priority > priority)
        waiting.insert(at, seq)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborted.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self.running or self._aborted)

    def num_waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def _free_slots(self) -> int:
        return max(self.config.max_num_seqs - len(self.running), 0)

    # -- called from the engine loop only --------------------------------------------------
    def step(self) -> None:
        self._drop_aborted()  # their deltas go out with the step's
        admitted = self._admit()
        try:
            if admitted:
                logits = self._prefill(admitted)
                self._advance(admitted, logits)
                self._on_emitted()  # first tokens go out before the decode step
            # Sequences that just finished (at their first token, or aborted) leave the runner's
            # batch before the decode step, which takes exactly the sequences still running.
            self._release_finished()
            decoding = [s for s in self.running.values() if s.finish_reason is None]
            if decoding:
                logits = self.runner.step([s.seq_id for s in decoding], [s.output_ids[-1] for s in decoding])
                self._advance(decoding, logits)
        except Exception as error:  # a model failure must end every affected stream, never hang it
            self._fail_all(f"{type(error).__name__}: {error}")
            raise
        finally:
            self._on_emitted()
            self._release_finished()
        self.num_steps += 1
        self.memory.after_step(self.num_steps)

    def _drop_aborted(self) -> None:
        with self._lock:
            aborted, self._aborted = self._aborted, set()
            if not aborted:
                return
            kept = deque()
            for seq in self._waiting:
                if seq.seq_id in aborted:
                    self._finish(seq, "abort")
                else:
                    kept.append(seq)
            self._waiting = kept
        for seq_id in aborted:
            seq = self.running.get(seq_id)
            if seq is not None and seq.finish_reason is None:
                self._finish(seq, "abort")

    def _admit(self) -> list[_Sequence]:
        """Move sequences from the queue into `running` (before their prefill: should it fail, they
        end with the rest of `running`, and no moment passes where a request is in neither)."""
        admitted: list[_Sequence] = []
        budget = self.config.max_prefill_tokens
        with self._lock:
            while self._waiting and len(self.running) < self.config.max_num_seqs:
                prompt_len = len(self._waiting[0].request.prompt_token_ids)
                # A prompt longer than the budget is prefilled alone rather than starved; one that
                # wants its prompt's logprobs too (all its positions' logits, unpadded).
                alone = self._waiting[0].request.sampling.prompt_logprobs is not None
                if admitted and (prompt_len > budget or alone):
                    break
                seq = self._waiting.popleft()
                self.running[seq.seq_id] = seq
                admitted.append(seq)
                budget -= prompt_len
                if alone:
                    break
        return admitted

    def _prefill(self, admitted: list[_Sequence]) -> torch.Tensor:
        """The admitted prompts' next-token logits; a prompt that wants its log-probabilities (then
        admitted alone) gets them from the logits of every position, kept for its first delta."""
        ids, prompts = [s.seq_id for s in admitted], [s.request.prompt_token_ids for s in admitted]
        adapters = [s.request.adapter for s in admitted]
        # LoRA adapters only when a request has one: a runner that serves none need not take them.
        extra = {"adapters": adapters} if any(adapters) else {}
        k = admitted[0].request.sampling.prompt_logprobs
        if k is None:
            logits = self.runner.add(ids, prompts, **extra)
            cached = getattr(self.runner, "cached_tokens", None)  # a runner with a prefix cache
            if cached:
                for seq in admitted:
                    seq.request.cached_tokens = cached.get(seq.seq_id, 0)
            return logits
        logits = self.runner.add(ids, prompts, all_logits=True, **extra)
        detok = IncrementalDetokenizer(self.tokenizer)  # each token's share of the prompt's decoded text
        entries = [e._replace(chars=len(detok.add(e.token_id))) for e in prompt_token_logprobs(logits[0], prompts[0], k)]
        entries[-1] = entries[-1]._replace(chars=entries[-1].chars + len(detok.finish()))
        admitted[0].prompt_logprobs = entries
        return logits[:, -1, :]

    def _advance(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        rows = [s.row for s in seqs]
        tokens = sample_rows(logits, rows)
        for seq, token, logprob in zip(seqs, tokens, token_logprobs(logits, rows, tokens)):
            self._append(seq, token, logprob)

    def _append(self, seq: _Sequence, token: int, logprob: TokenLogprob | None = None) -> None:
        request = seq.request
        seq.output_ids.append(token)
        stop = request.stop_kind(token)
        text = "" if stop == "eos" else seq.detok.add(token)
        reason: FinishReason | None = None
        if stop or seq.detok.stopped or (seq.row.constraint is not None and seq.row.constraint.done):
            reason = "stop"
        elif len(seq.output_ids) >= request.max_new_tokens:
            reason = "length"
        if reason is None:
            logprobs = None if logprob is None else [logprob._replace(chars=len(text))]
            self._emit(seq, Delta(request.request_id, [token], text, logprobs=logprobs))
        else:
            stop_reason = request.stop_reason(token, seq.detok) if reason == "stop" else None
            self._finish(seq, reason, token_ids=[token], text=text, logprob=logprob, stop_reason=stop_reason)

    def _finish(
        self, seq: _Sequence, reason: FinishReason, token_ids: list[int] | None = None, text: str = "", error: str | None = None,
        logprob: TokenLogprob | None = None, stop_reason: str | int | None = None,
    ) -> None:
        """End a sequence; `token_ids`/`text`/`logprob`: its last token's, if it ends with one;
        `stop_reason`: the stop string or stop token id that ended it."""
        seq.finish_reason = reason
        if reason == "abort":
            self.num_aborted += 1
        if error is None:
            text += seq.detok.finish()
        usage = Usage(len(seq.request.prompt_token_ids), len(seq.output_ids))
        logprobs = None if logprob is None else [logprob._replace(chars=len(text))]
        self._emit(seq, Delta(seq.seq_id, token_ids or [], text, finish_reason=reason, usage=usage, error=error,
                              logprobs=logprobs, stop_reason=stop_reason))

    def _emit(self, seq: _Sequence, delta: Delta) -> None:
        """Hand a delta to the request's consumer. A consumer that cannot take it (its event loop
        closed, say) loses its own request, which is aborted; the other requests never notice."""
        if seq.prompt_logprobs is not None:  # the first delta carries them
            delta.prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None
        try:
            seq.emit(delta)
        except Exception as error:  # noqa: BLE001 - whatever the consumer's callback raises
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
                self.num_aborted += 1
                logger.info("request %s aborted: its consumer cannot take output (%s: %s)", seq.seq_id,
                            type(error).__name__, error)

    def _fail_all(self, message: str) -> None:
        for seq in self.running.values():
            if seq.finish_reason is None:
                self._finish(seq, "abort", error=message)

    def close(self, message: str) -> None:
        """End every waiting and running request with `abort` and `message` (the engine is shutting
        down); the caller makes sure no step runs meanwhile."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for seq in waiting:
            self._finish(seq, "abort", error=message)
        self._fail_all(message)
        self._on_emitted()
        self._release_finished()

    def _release_finished(self) -> None:
        finished = [seq_id for seq_id, s in self.running.items() if s.finish_reason is not None]
        if finished:
            # Forgotten first: a runner that cannot remove them (a dead model shard) must not keep
            # them running, or every later step would fail on them again and new requests would
            # wait for their slots forever.
            for seq_id in finished:
                del self.running[seq_id]
            try:
                self.runner.remove(finished)
            finally:
                self.memory.after_finish()
