"""Turning next-token logits into tokens: greedy, temperature, top-k, top-p, min-p, logit bias,
repetition penalty, frequency and presence penalties, min_tokens; and the log-probabilities a
request asks for.

Each row of a batch carries its own parameters; rows with the same temperature/top-k/top-p/min-p
are filtered and normalised together. Seeded rows draw from their own `torch.Generator`, so a seeded
request yields the same tokens whether it runs alone or batched; unseeded rows draw together, in
one call, from torch's default generator (so `torch.manual_seed` before a batch makes it repeatable,
as GRPO's rollouts rely on).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from r1.config import SamplingConfig
from r1.engine.structured import GrammarConstraint
from r1.engine.types import TokenLogprob


@dataclass
class RowState:
    """What sampling needs to remember about one sequence."""

    sampling: SamplingConfig
    generator: torch.Generator | None
    # Token ids the repetition penalty applies to (prompt and output, as Hugging Face does).
    seen_token_ids: torch.Tensor | None = None
    # How often the reply generated each token, when a frequency or presence penalty applies.
    output_counts: dict[int, int] | None = None
    # The request's logit_bias as (token ids, values), added to the logits before anything else.
    bias: tuple[torch.Tensor, torch.Tensor] | None = None
    # The ids that would end the reply, held back (min_tokens) for `hold_steps` more tokens.
    ending_ids: torch.Tensor | None = None
    hold_steps: int = 0
    # Structured output: masks the tokens that would break the constraint (r1.engine.structured).
    constraint: GrammarConstraint | None = None
    # allowed_token_ids: the tokens the row may take (a vocabulary mask made at its first step).
    allowed_ids: torch.Tensor | None = None
    blocked: torch.Tensor | None = None
    # bad_words: their token sequences, and the row's last tokens (as many as the longest's prefix).
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    recent_ids: deque[int] | None = None
    # thinking_token_budget: the reasoning tokens still allowed (None: no budget, or the reasoning
    # is over), the <think> and </think> ids, and whether the reply is inside the reasoning now.
    think_budget: int | None = None
    think_ids: tuple[int, int] | None = None
    in_reasoning: bool = False

    @classmethod
    def create(cls, sampling: SamplingConfig, prompt_token_ids: list[int], device: torch.device,
               ending_ids: frozenset[int] = frozenset(), constraint: GrammarConstraint | None = None,
               bad_words_ids: tuple[tuple[int, ...], ...] = (), think_ids: tuple[int, int] | None = None,
               reasoning_first: bool = False) -> RowState:
        generator = None
        if not sampling.greedy and sampling.seed is not None:
            generator = torch.Generator(device="cpu")
            generator.manual_seed(sampling.seed)
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompt_token_ids)), dtype=torch.long, device=device)
        counts = {} if sampling.frequency_penalty or sampling.presence_penalty else None
        bias = None
        if sampling.logit_bias:
            bias = (torch.tensor(list(sampling.logit_bias), dtype=torch.long, device=device),
                    torch.tensor(list(sampling.logit_bias.values()), dtype=torch.float32, device=device))
        hold = None
        if sampling.min_tokens and ending_ids:
            hold = torch.tensor(sorted(ending_ids), dtype=torch.long, device=device)
        allowed = None
        if sampling.allowed_token_ids is not None:
            allowed = torch.tensor(sorted(set(sampling.allowed_token_ids)), dtype=torch.long, device=device)
        return cls(sampling=sampling, generator=generator, seen_token_ids=seen, output_counts=counts, bias=bias,
                   ending_ids=hold, hold_steps=sampling.min_tokens if hold is not None else 0, constraint=constraint,
                   allowed_ids=allowed, bad_words_ids=bad_words_ids,
                   recent_ids=deque(maxlen=max(map(len, bad_words_ids))) if bad_words_ids else None,
                   think_budget=sampling.thinking_token_budget if think_ids else None, think_ids=think_ids,
                   in_reasoning=reasoning_first)

    def banned_now(self) -> list[int]:
        """The last tokens of the bad words whose other tokens the reply has just written (vLLM's
        rule: a one-token word always; the prompt does not count)."""
        recent = list(self.recent_ids or ())
        banned = []
        for ids in self.bad_words_ids:
            before = len(ids) - 1
            if before <= len(recent) and (before == 0 or tuple(recent[-before:]) == ids[:-1]):
                banned.append(ids[-1])
        return banned

    def mask_allowed(self, logits_row: torch.Tensor) -> None:
        """Set the logits of tokens outside allowed_token_ids to -inf (in place; [vocab])."""
        if self.blocked is None or self.blocked.shape[-1] != logits_row.shape[-1]:
            self.blocked = torch.ones(logits_row.shape[-1], dtype=torch.bool, device=logits_row.device)
            self.blocked[self.allowed_ids] = False
        logits_row.masked_fill_(self.blocked, float("-inf"))

    @property
    def must_close_reasoning(self) -> bool:
        """The reasoning has used its thinking_token_budget: the next token is </think>."""
        return self.think_budget == 0 and self.in_reasoning

    def _count_reasoning(self, token_id: int) -> None:
        start, end = self.think_ids
        if not self.in_reasoning:
            self.in_reasoning = token_id == start
        elif token_id == end:  # one reasoning block per reply (R1): no budget after it
            self.think_budget = None
        else:
            self.think_budget -= 1

    def observe(self, token_id: int) -> None:
        if self.constraint is not None:
            self.constraint.observe(token_id)
        if self.think_budget is not None:
            self._count_reasoning(token_id)
        if self.recent_ids is not None:
            self.recent_ids.append(token_id)
        if self.hold_steps:
            self.hold_steps -= 1
        if self.output_counts is not None:
            self.output_counts[token_id] = self.output_counts.get(token_id, 0) + 1
        if self.seen_token_ids is not None:
            token = torch.tensor([token_id], dtype=torch.long, device=self.seen_token_ids.device)
            if not bool((self.seen_token_ids == token).any()):
                self.seen_token_ids = torch.cat([self.seen_token_ids, token])


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Hugging Face semantics: positive logits are divided by the penalty, negative ones multiplied."""
    scores = logits.gather(-1, seen)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(-1, seen, scores)


def apply_frequency_presence_penalties(logits: torch.Tensor, counts: dict[int, int], frequency: float,
                                       presence: float) -> torch.Tensor:
    """OpenAI semantics: logit -= frequency × count + presence × (count > 0), for each token the reply
    has generated (`counts`)."""
    if not counts:
        return logits
    ids = torch.tensor(list(counts), dtype=torch.long, device=logits.device)
    times = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
    return logits.index_add(-1, ids, -(frequency * times + presence))


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """Mask (to -inf) the tokens less likely than min_p × the most likely one, then those outside
    top-k and outside the top-p nucleus, of each row (last dim); vLLM's order."""
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    if top_k and top_k < logits.shape[-1]:
        threshold = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already cover top_p; always keep the first.
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `probs` ([rows, vocab]) by inverse-CDF sampling: one uniform number per
    row (torch.multinomial on CPU draws one per vocabulary entry, ~25x slower at 2k tokens).

    A token with probability 0 is never drawn.
    """
    cdf = probs.double().cumsum(-1)
    u = torch.rand((probs.shape[0], 1), dtype=torch.float64, generator=generator) * cdf[:, -1:]
    index = torch.searchsorted(cdf, u, right=True).squeeze(1)
    # u rounds up to the total only in the last bit; the last token with p > 0 is then the answer.
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(-1)
    return torch.minimum(index, last)


@torch.inference_mode()
def sample_rows(logits: torch.Tensor, rows: list[RowState]) -> list[int]:
    """Pick one token per row of `logits` ([batch, vocab], any dtype)."""
    logits = logits.to(torch.float32, copy=True)
    tokens: list[int] = [0] * len(rows)
    greedy_rows: list[int] = []
    alike: dict[tuple[float, int, float, float], list[int]] = {}  # sampled rows by (temperature, top_k, top_p, min_p)
    for i, row in enumerate(rows):
        if row.bias is not None:
            logits[i] = logits[i].index_add(-1, *row.bias)  # made on the runner's device, float32 as `logits`
        if row.hold_steps:
            logits[i, row.ending_ids] = float("-inf")
        if row.constraint is not None and row.constraint.active:
            row.constraint.mask(logits[i : i + 1])
        if row.allowed_ids is not None:
            row.mask_allowed(logits[i])
        if row.bad_words_ids:
            banned = row.banned_now()
            if banned:
                logits[i, banned] = float("-inf")
        if row.think_budget is not None and row.must_close_reasoning:  # overrides every other mask
            end = row.think_ids[1]
            logits[i] = float("-inf")
            logits[i, end] = 0.0
        if row.seen_token_ids is not None:
            logits[i] = apply_repetition_penalty(logits[i], row.seen_token_ids, row.sampling.repetition_penalty)
        if row.output_counts:
            logits[i] = apply_frequency_presence_penalties(logits[i], row.output_counts, row.sampling.frequency_penalty,
                                                           row.sampling.presence_penalty)
        if row.sampling.greedy:
            greedy_rows.append(i)
        else:
            sampling = row.sampling
            alike.setdefault((sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p), []).append(i)
    if greedy_rows:
        for i, token in zip(greedy_rows, logits[greedy_rows].argmax(-1).tolist()):
            tokens[i] = token
    for (temperature, top_k, top_p, min_p), index in alike.items():
        probs = filter_top_k_top_p(logits[index] / temperature, top_k, top_p, min_p).softmax(-1).cpu()
        unseeded = [j for j, i in enumerate(index) if rows[i].generator is None]
        if unseeded:
            for j, token in zip(unseeded, draw(probs[unseeded]).tolist()):
                tokens[index[j]] = token
        for j, i in enumerate(index):
            if rows[i].generator is not None:
                tokens[i] = int(draw(probs[j : j + 1], rows[i].generator))
    for row, token in zip(rows, tokens):
        row.observe(token)
    return tokens


def _scored(logits: torch.Tensor, tokens: list[int], k: int) -> tuple[list[float], list[list[float]], list[list[int]]]:
    """For each row of `logits` ([rows, vocab]): the log-probability of its token in `tokens`, and
    the values and ids of its k most likely tokens (best first)."""
    logprobs = logits.to(torch.float32).log_softmax(-1)
    chosen = logprobs.gather(-1, torch.tensor(tokens, dtype=torch.long, device=logprobs.device).unsqueeze(-1)).squeeze(-1).tolist()
    top_values, top_ids = logprobs.topk(k, -1)  # k = 0 gives empty rows
    return chosen, top_values.tolist(), top_ids.tolist()


@torch.inference_mode()
def token_logprobs(logits: torch.Tensor, rows: list[RowState], tokens: list[int]) -> list[TokenLogprob | None]:
    """Each row's chosen token's log-probability and its `sampling.logprobs` most likely tokens,
    from the model's own distribution (`logits` as the model gave them: before temperature,
    penalties, logit_bias and filtering, as vLLM's default); None for rows that did not ask."""
    wanted = [i for i, row in enumerate(rows) if row.sampling.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(rows)
    if not wanted:
        return out
    scored = _scored(logits[wanted], [tokens[i] for i in wanted], max(rows[i].sampling.logprobs for i in wanted))
    for i, value, values, ids in zip(wanted, *scored):
        keep = rows[i].sampling.logprobs
        out[i] = TokenLogprob(tokens[i], value, tuple(zip(ids[:keep], values[:keep])))
    return out


@torch.inference_mode()
def prompt_token_logprobs(logits: torch.Tensor, prompt_ids: list[int], k: int) -> list[TokenLogprob]:
    """The log-probability of each prompt token after the ones before it, and the k most likely
    tokens there, from `logits` [len(prompt_ids), vocab] (a prefill's logits at every position);
    the first token's logprob is None. `chars` is left 0 (the caller knows the text)."""
    scored = _scored(logits[:-1], prompt_ids[1:], k)
    return [TokenLogprob(prompt_ids[0], None)] + [TokenLogprob(token, value, tuple(zip(ids, values)))
                                                  for token, value, values, ids in zip(prompt_ids[1:], *scored)]
