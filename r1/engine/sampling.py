"""Turning next-token logits into tokens: greedy, temperature, top-k, top-p, repetition penalty.

Each row of a batch carries its own parameters. Seeded rows draw from their own
`torch.Generator`, so a seeded request yields the same tokens whether it runs alone or batched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1.config import SamplingConfig


@dataclass
class RowState:
    """What sampling needs to remember about one sequence."""

    sampling: SamplingConfig
    generator: torch.Generator | None
    # Token ids the repetition penalty applies to (prompt and output, as Hugging Face does).
    seen_token_ids: torch.Tensor | None = None

    @classmethod
    def create(cls, sampling: SamplingConfig, prompt_token_ids: list[int], device: torch.device) -> RowState:
        generator = None
        if not sampling.greedy:
            generator = torch.Generator(device="cpu")
            if sampling.seed is not None:
                generator.manual_seed(sampling.seed)
            else:
                generator.seed()
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(prompt_token_ids)), dtype=torch.long, device=device)
        return cls(sampling=sampling, generator=generator, seen_token_ids=seen)

    def observe(self, token_id: int) -> None:
        if self.seen_token_ids is not None:
            token = torch.tensor([token_id], dtype=torch.long, device=self.seen_token_ids.device)
            if not bool((self.seen_token_ids == token).any()):
                self.seen_token_ids = torch.cat([self.seen_token_ids, token])


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Hugging Face semantics: positive logits are divided by the penalty, negative ones multiplied."""
    scores = logits.gather(-1, seen)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(-1, seen, scores)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside top-k and outside the top-p nucleus of a 1-D logits row."""
    if top_k and top_k < logits.shape[-1]:
        threshold = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already cover top_p; always keep the first.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.inference_mode()
def sample_rows(logits: torch.Tensor, rows: list[RowState]) -> list[int]:
    """Pick one token per row of `logits` ([batch, vocab], any dtype)."""
    logits = logits.to(torch.float32, copy=True)
    tokens: list[int | None] = [None] * len(rows)
    greedy_rows = []
    for i, row in enumerate(rows):
        if row.seen_token_ids is not None:
            logits[i] = apply_repetition_penalty(logits[i], row.seen_token_ids, row.sampling.repetition_penalty)
        if row.sampling.greedy:
            greedy_rows.append(i)
    if greedy_rows:
        picked = logits[greedy_rows].argmax(-1).tolist()
        for i, token in zip(greedy_rows, picked):
            tokens[i] = token
    for i, row in enumerate(rows):
        if tokens[i] is not None:
            continue
        row_logits = filter_top_k_top_p(logits[i] / row.sampling.temperature, row.sampling.top_k, row.sampling.top_p)
        probs = row_logits.softmax(-1).cpu()
        tokens[i] = int(torch.multinomial(probs, 1, generator=row.generator).item())
    for row, token in zip(rows, tokens):
        row.observe(token)
    return tokens  # type: ignore[return-value]
