"""Rule rewards and their weighted sum: scores, failure accounting, picklability."""

from __future__ import annotations

import math
import pickle

import pytest

from r1.config import GRPORewardSpec
from r1.rewards import AccuracyReward, FormatReward, RewardModelReward, RewardTerm, WeightedReward, build_reward

GOOD = "57 - 35 = 22\n</think>\nThe answer is 22."


@pytest.mark.parametrize(
    "completion, expected",
    [
        (GOOD, 1.0),  # the pre-filled <think> is not repeated: reasoning, close tag, answer
        ("<think>\n57 - 35 = 22\n</think>\nThe answer is 22.", 1.0),  # repeating the opener once is allowed
        ("57 - 35 = 22\nThe answer is 22.", 0.0),  # reasoning never closed: no answer section
        ("57 - 35 = 22\n</think>\n", 0.0),  # closed, but nothing after it
        ("\n</think>\nThe answer is 22.", 0.0),  # empty reasoning
        ("a\n</think>\nb</think>c", 0.0),  # a second close tag breaks the format
    ],
)
def test_format_reward(completion, expected):
    assert FormatReward()([completion]) == [expected]


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        (GOOD, 22, 1.0),  # the stated answer matches
        (GOOD, 23, 0.0),  # a wrong reference answer scores 0
        ("1 + 1 = 22\n</think>\nThe answer is 2.", 22, 0.0),  # numbers inside the reasoning do not count
        ("57 - 35 = 22\nThe answer is 22.", 22, 0.0),  # no </think>: no answer at all
        ("x\n</think>\n\\boxed{22}", 22, 1.0),  # boxed answers are read too
    ],
)
def test_accuracy_reward(completion, answer, expected):
    assert AccuracyReward()([completion], answers=[answer]) == [expected]


def _raises(completions, **_):
    raise RuntimeError("checker crashed")


def _short(completions, **_):
    return [1.0][: len(completions) - 1]


def _not_finite(completions, **_):
    return [float("nan"), 1.0][: len(completions)]


def _constant(completions, **_):
    return [0.25] * len(completions)


@pytest.mark.parametrize(
    "broken, expected_failures, reason",
    [
        (_raises, 2, "RuntimeError: checker crashed"),  # a raising reward fails the whole batch, counted
        (_short, 2, "returned 1 scores for 2 completions"),  # a wrong-length answer cannot be aligned
        (_not_finite, 1, "non-finite"),  # only the NaN sample fails; the other one is kept
    ],
)
def test_weighted_reward_counts_failures_instead_of_scoring_zero(broken, expected_failures, reason):
    reward = WeightedReward([RewardTerm("const", _constant, 2.0), RewardTerm("broken", broken, 1.0)])
    scores = reward(["a", "b"], prompts=["p", "p"], answers=[0, 0])
    assert scores.failures == {"const": 0, "broken": expected_failures}
    assert reason in scores.errors["broken"][0]
    assert scores.num_failed == expected_failures
    # A failed sample's total is NaN (dropped later), never a plausible-looking number.
    assert sum(math.isnan(t) for t in scores.total) == expected_failures
    assert scores.term_means()["const"] == 0.25


def test_weighted_sum_and_term_means():
    reward = build_reward([GRPORewardSpec(name="format", weight=0.5), GRPORewardSpec(name="accuracy", weight=1.0)])
    bad_format = "The answer is 22."
    scores = reward([GOOD, bad_format, GOOD], prompts=["q"] * 3, answers=[22, 22, 5])
    assert scores.total == [1.5, 0.0, 0.5]
    assert scores.term_means() == pytest.approx({"format": 2 / 3, "accuracy": 1 / 3})
    assert scores.failures == {"format": 0, "accuracy": 0}


def test_rewards_are_picklable():
    # Rewards may run in other processes (Ray workers, validator actors): they must pickle,
    # and the reward-model reward must not drag a loaded model along.
    reward = build_reward([GRPORewardSpec(name="format"), GRPORewardSpec(name="reward_model", model_path="/nowhere")])
    clone = pickle.loads(pickle.dumps(reward))
    assert [t.name for t in clone.terms] == ["format", "reward_model"]
    model_reward = RewardModelReward("/nowhere")
    model_reward._loaded = ("model", "tokenizer")
    assert pickle.loads(pickle.dumps(model_reward))._loaded is None


def test_reward_model_reward_failure_is_counted():
    # A missing reward model is a counted failure with its reason, not a crash or a 0.
    reward = build_reward([GRPORewardSpec(name="reward_model", model_path="/nowhere")])
    scores = reward([GOOD], prompts=["q"], answers=[22])
    assert scores.failures == {"reward_model": 1}
    assert "config.json" in scores.errors["reward_model"][0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "reward_model"}, "model_path is required"),  # a reward model needs its checkpoint
        ({"name": "format", "model_path": "/x"}, "only allowed"),  # a stray path is a config mistake
        ({"name": "length"}, "format"),  # unknown reward names list the known ones
    ],
)
def test_reward_spec_validation(spec, message):
    with pytest.raises(ValueError, match=message):
        GRPORewardSpec(**spec)


def test_accuracy_reward_rejects_unknown_task():
    with pytest.raises(ValueError, match="arithmetic"):
        AccuracyReward(task="code")


def test_code_tests_reward_scores_the_share_of_tests_passed_in_the_sandbox():
    from r1.codecheck.tasks import CODING_TASKS

    add = next(task for task in CODING_TASKS if task.name == "add")
    reward = build_reward([GRPORewardSpec(name="code_tests", validators=0)])
    completions = [
        "add them\n</think>\n```python\ndef add(a, b):\n    return a + b\n```",
        "</think>\n```python\ndef add(a, b):\n    return a - b\n```",  # passes only add(0, 0) == 0
        "no code at all",
    ]
    scores = reward(completions, prompts=[add.prompt] * 3, answers=[list(add.tests)] * 3)
    assert scores.per_term["code_tests"] == [1.0, pytest.approx(1 / 3), 0.0]
    assert scores.failures == {"code_tests": 0}


def test_validators_belong_to_the_code_tests_reward():
    with pytest.raises(ValueError, match="validators is only used by name=code_tests"):
        GRPORewardSpec(name="format", validators=3)
    assert GRPORewardSpec(name="code_tests").num_validators == 2
    assert GRPORewardSpec(name="format").num_validators == 0
