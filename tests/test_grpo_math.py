"""GRPO maths against values computed by hand: advantages, clipped objective, k3 KL, aggregation."""

from __future__ import annotations

import math

import pytest
import torch

from r1.train.grpo import aggregate, clipped_surrogate, group_advantages, grpo_loss, k3_kl, token_log_probs

SQRT3 = math.sqrt(3.0)


@pytest.mark.parametrize(
    "rewards, group_size, expected",
    [
        # one group, two right and two wrong: mean 0.5, sample std sqrt(1/3) -> +-0.5*sqrt(3)
        ([1.0, 0.0, 0.0, 1.0], 4, [SQRT3 / 2, -SQRT3 / 2, -SQRT3 / 2, SQRT3 / 2]),
        # two groups are normalised independently; an all-equal group teaches nothing (all zeros)
        ([1.0, 2.0, 3.0, 5.0, 5.0, 5.0], 3, [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]),
        # a shift of every reward in a group does not change its advantages
        ([11.0, 12.0, 13.0], 3, [-1.0, 0.0, 1.0]),
        # a single correct answer out of 4 gets a large positive advantage: mean .25, std .5
        ([0.0, 0.0, 1.0, 0.0], 4, [-0.5, -0.5, 1.5, -0.5]),
    ],
)
def test_group_advantages(rewards, group_size, expected):
    advantages = group_advantages(torch.tensor(rewards), group_size, eps=0.0)
    assert advantages.tolist() == pytest.approx(expected, abs=1e-6)


def test_group_advantages_eps_keeps_zero_std_groups_finite():
    # With the default eps an all-equal group divides 0 by eps, not by 0.
    advantages = group_advantages(torch.tensor([0.5, 0.5]), 2)
    assert torch.isfinite(advantages).all() and advantages.abs().max() == 0


@pytest.mark.parametrize(
    "rewards, group_size, message",
    [
        ([1.0, 2.0, 3.0], 2, "do not split"),  # a ragged last group is a bug upstream, not data
        ([1.0, 2.0], 1, ">= 2"),  # one sample per group has no baseline
        ([[1.0, 2.0]], 2, "1-D"),  # rewards are one per sequence
    ],
)
def test_group_advantages_rejects(rewards, group_size, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(torch.tensor(rewards), group_size)


@pytest.mark.parametrize(
    "ratio, advantage, expected_loss, expected_clipped",
    [
        (1.5, 1.0, -1.2, 1.0),  # gain capped at 1 + eps: the ratio cannot run away upwards
        (1.5, -1.0, 1.5, 0.0),  # a bad action made more likely is penalised unclipped (pessimistic bound)
        (0.5, 1.0, -0.5, 0.0),  # a good action made less likely is penalised unclipped
        (0.5, -1.0, 0.8, 1.0),  # bad action pushed down past 1 - eps: no further gain
        (1.0, 2.0, -2.0, 0.0),  # at ratio 1 the objective is just the advantage
        (1.1, 1.0, -1.1, 0.0),  # inside the trust region nothing is clipped
    ],
)
def test_clipped_surrogate(ratio, advantage, expected_loss, expected_clipped):
    logp = torch.tensor([[math.log(ratio)]])
    loss, clipped = clipped_surrogate(logp, torch.zeros(1, 1), torch.tensor([advantage]), clip_eps=0.2)
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    assert clipped.item() == expected_clipped


@pytest.mark.parametrize(
    "p, p_ref, expected",
    [
        (0.5, 0.5, 0.0),  # identical policies: no divergence
        (0.5, 0.25, 0.25 / 0.5 - math.log(0.25 / 0.5) - 1),  # = 0.5 + ln 2 - 1
        (0.25, 0.5, 2.0 - math.log(2.0) - 1),  # asymmetric, still non-negative
    ],
)
def test_k3_kl(p, p_ref, expected):
    value = k3_kl(torch.tensor(math.log(p)), torch.tensor(math.log(p_ref)))
    assert value.item() == pytest.approx(expected, abs=1e-6)
    assert value.item() >= 0


def test_k3_is_unbiased_for_kl():
    # E_{x~pi}[k3] equals KL(pi || ref) exactly when summing over the support.
    pi = torch.tensor([0.7, 0.2, 0.1])
    ref = torch.tensor([0.4, 0.4, 0.2])
    expected_kl = float((pi * (pi / ref).log()).sum())
    assert float((pi * k3_kl(pi.log(), ref.log())).sum()) == pytest.approx(expected_kl, abs=1e-6)


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token", (1 + 2 + 3 + 4) / 4),  # every real token weighs the same
        ("sequence", ((1 + 2 + 3) / 3 + 4 / 1) / 2),  # each sequence weighs the same
    ],
)
def test_aggregate(mode, expected):
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(per_token, mask, mode).item() == pytest.approx(expected)


def test_aggregate_sequence_ignores_fully_masked_rows():
    # A dropped group (all-zero mask rows) must not dilute the mean.
    per_token = torch.tensor([[2.0, 2.0], [7.0, 7.0]])
    mask = torch.tensor([[1, 1], [0, 0]])
    assert aggregate(per_token, mask, "sequence").item() == pytest.approx(2.0)


def test_grpo_loss_by_hand():
    # Two sequences: A = +1 (tokens at ratio 1.5 and 1.0) and A = -1 (one token at ratio 1.0, one padding).
    logp = torch.log(torch.tensor([[0.6, 0.4], [0.5, 0.3]]))
    old_logp = torch.log(torch.tensor([[0.4, 0.4], [0.5, 0.3]]))
    ref_logp = torch.log(torch.tensor([[0.3, 0.4], [0.5, 0.3]]))
    advantages = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    beta = 0.1
    loss, stats = grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, kl_beta=beta, aggregation="token")
    kl_first = 0.3 / 0.6 - math.log(0.3 / 0.6) - 1
    # token losses: -min(1.5, 1.2) = -1.2 (+beta*kl_first), -1.0, +1.0; mean over 3 real tokens
    expected = (-1.2 + beta * kl_first - 1.0 + 1.0) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats.kl == pytest.approx(kl_first / 3, abs=1e-6)
    assert stats.clip_fraction == pytest.approx(1 / 3)
    assert stats.policy_loss == pytest.approx(-1.2 / 3, abs=1e-6)


def test_grpo_gradient_at_ratio_one_is_minus_advantage_per_token():
    # On the first iteration (old = current) d loss / d logp_t = -A / num_tokens for token aggregation.
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]], requires_grad=True)
    advantages = torch.tensor([0.5, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, _ = grpo_loss(logp, logp.detach(), None, advantages, mask, kl_beta=0.0)
    loss.backward()
    expected = torch.tensor([[-0.5, -0.5, -0.5], [2.0, 2.0, 0.0]]) / 5
    assert torch.allclose(logp.grad, expected, atol=1e-6)


def test_grpo_loss_needs_reference_when_kl_is_on():
    # beta > 0 without reference log-probs would silently drop the KL term.
    with pytest.raises(ValueError, match="kl_beta"):
        grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), None, torch.ones(1), torch.ones(1, 1), kl_beta=0.001)


def test_token_log_probs_matches_log_softmax():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])
    targets = torch.tensor([[0, 2]])
    expected = [2.0 - math.log(math.exp(2) + 1 + math.exp(-1)), -math.log(3)]
    assert token_log_probs(logits, targets)[0].tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "candidate, baseline, fixed, broken, p_value",
    [
        # 10 fixed, 2 broken: 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096
        ([True] * 10 + [False] * 2 + [True] * 5, [False] * 10 + [True] * 2 + [True] * 5, 10, 2, 158 / 4096),
        # one discordant problem either way: p = 2 * 1/2 = 1
        ([True, False], [False, False], 1, 0, 1.0),
        # identical answers: nothing discordant
        ([True, False, True], [True, False, True], 0, 0, 1.0),
        # 3 vs 3: symmetric, p capped at 1
        ([True] * 3 + [False] * 3, [False] * 3 + [True] * 3, 3, 3, 1.0),
    ],
)
def test_paired_comparison_mcnemar_exact(candidate, baseline, fixed, broken, p_value):
    from r1.train.evaluate import paired_comparison

    result = paired_comparison(candidate, baseline)
    assert (result.fixed, result.broken) == (fixed, broken)
    assert result.p_value == pytest.approx(p_value)
    assert result.difference == pytest.approx((fixed - broken) / len(candidate))


def test_paired_comparison_needs_the_same_problems():
    from r1.train.evaluate import paired_comparison

    with pytest.raises(ValueError, match="same non-empty problems"):
        paired_comparison([True, False], [True])
