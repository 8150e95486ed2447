"""GRPO maths (DeepSeekMath / DeepSeek-R1): group advantages, clipped ratio objective, k3 KL.

All functions work on plain tensors. Shapes: a batch holds `num_groups * group_size` sequences,
group-contiguous (rows 0..G-1 are the samples of the first prompt); per-token tensors are
`[num_sequences, completion_len]` with a 0/1 `mask` over real (non-padding) completion tokens.

The objective per completion token t of sequence i, with ratio = exp(logp - old_logp):

    loss_it = -min(ratio * A_i, clip(ratio, 1 - eps, 1 + eps) * A_i) + beta * k3(logp, ref_logp)

and k3 (Schulman's unbiased, always non-negative estimator of KL(policy || ref)):

    k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1

This module does not sample, score or step an optimizer; see `r1.train.grpo_stage`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

LossAggregation = Literal["token", "sequence"]


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """(r - mean(group)) / (std(group) + eps) for each group of `group_size` consecutive rewards.

    std is the sample standard deviation (Bessel-corrected), as in DeepSeekMath's reference code and
    TRL. A group whose rewards are all equal gets advantage 0 for every sample: it teaches nothing.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (one per sequence), got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size={group_size} must be >= 2 to normalise within a group")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size).to(torch.float32)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)
    centered = grouped - mean
    # An all-equal group has nothing to compare: 0, not 0/eps noise (or 0/0 with eps=0).
    advantages = torch.where(std > 0, centered / (std + eps), torch.zeros_like(centered))
    return advantages.view(-1)


def token_log_probs(logits: Tensor, target_ids: Tensor) -> Tensor:
    """log p(target_ids[b, t]) under logits[b, t] (logits already aligned with the targets)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return log_probs.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(d) - d - 1 with d = ref_logp - logp."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


def clipped_surrogate(logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_eps: float) -> tuple[Tensor, Tensor]:
    """Per-token PPO-clip loss (to minimise) and a 0/1 tensor marking tokens where clipping was active.

    `advantages` has one value per sequence; it is broadcast over that sequence's tokens.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(-1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    loss = -torch.minimum(unclipped, clipped)
    was_clipped = (clipped < unclipped).to(logp.dtype)
    return loss, was_clipped


def aggregate(per_token: Tensor, mask: Tensor, mode: LossAggregation = "token") -> Tensor:
    """Reduce a per-token quantity to a scalar over the real tokens.

    token: sum over every real token of the batch / number of real tokens (long and short answers
    weigh each token equally; DAPO's token-level loss). sequence: mean within each sequence, then
    mean over sequences that have at least one real token (the original GRPO formulation).
    """
    mask = mask.to(per_token.dtype)
    if mode == "token":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if mode == "sequence":
        lengths = mask.sum(dim=1)
        per_sequence = (per_token * mask).sum(dim=1) / lengths.clamp(min=1.0)
        has_tokens = (lengths > 0).to(per_token.dtype)
        return (per_sequence * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)
    raise ValueError(f"loss aggregation {mode!r} is not one of: token, sequence")


@dataclass
class GRPOLossStats:
    """Detached diagnostics of one loss evaluation (token-mean over real tokens)."""

    policy_loss: float
    kl: float
    clip_fraction: float
    ratio_mean: float


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps: float = 0.2,
    kl_beta: float = 0.001,
    aggregation: LossAggregation = "token",
) -> tuple[Tensor, GRPOLossStats]:
    """The GRPO loss to minimise and its diagnostics.

    `ref_logp` may be None only when kl_beta is 0 (no reference model is loaded then).
    """
    if kl_beta > 0 and ref_logp is None:
        raise ValueError(f"kl_beta={kl_beta} needs reference log-probs; pass ref_logp or set kl_beta=0")
    surrogate, was_clipped = clipped_surrogate(logp, old_logp, advantages, clip_eps)
    per_token = surrogate
    kl_value = 0.0
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        if kl_beta > 0:
            per_token = per_token + kl_beta * kl
        kl_value = float(aggregate(kl.detach(), mask, "token"))
    loss = aggregate(per_token, mask, aggregation)
    with torch.no_grad():
        stats = GRPOLossStats(
            policy_loss=float(aggregate(surrogate, mask, aggregation)),
            kl=kl_value,
            clip_fraction=float(aggregate(was_clipped, mask, "token")),
            ratio_mean=float(aggregate(torch.exp(logp - old_logp), mask, "token")),
        )
    return loss, stats
