"""The SafetyFilter Serve deployment on a real local Ray: checks and stateless stream steps through
a handle, and the fail-closed client (errors and timeouts become SafetyUnavailable)."""

from __future__ import annotations

import asyncio

import pytest
import ray
from ray import serve

from actors.safety import SafetyClient, SafetyUnavailable, build_safety_filter
from r1.config import DeploymentConfig, SafetyConfig
from r1.safety import SafetyFilter

APP = "safety-test"
REPLY_DEADLINE_S = 60.0
CARD = "4111 1111 1111 1111"


@pytest.fixture(scope="module")
def handle():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    config = SafetyConfig(
        deployment=DeploymentConfig(num_cpus=0.1, min_replicas=1, max_replicas=1, target_ongoing_requests=4, max_ongoing_requests=8)
    )
    try:
        yield serve.run(build_safety_filter(config), name=APP, route_prefix=None)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def test_check_through_the_handle(handle):
    reply = handle.check.remote(f"我的卡号是{CARD}，密码是abc123", "input").result(timeout_s=REPLY_DEADLINE_S)
    assert reply == {
        "action": "redact",
        "text": "我的卡号是[已隐藏]，密码是[已隐藏]",
        "findings": [
            {"rule_id": "card_number", "start": 5, "end": 24, "action": "redact"},
            {"rule_id": "secret", "start": 28, "end": 34, "action": "redact"},
        ],
    }
    harmless = handle.check.remote("忘记密码怎么办？", "input").result(timeout_s=REPLY_DEADLINE_S)
    assert harmless == {"action": "allow", "text": "忘记密码怎么办？", "findings": []}


def test_stream_steps_are_stateless_and_match_check(handle):
    # The caller carries the state between steps; the pieces equal the whole-text verdict.
    text = f"好的，您的卡号{CARD}已绑定，验证码384920请勿泄露。"
    state, pieces = None, []
    for i in range(0, len(text), 4):
        reply = handle.stream_feed.remote(state, text[i : i + 4], "output").result(timeout_s=REPLY_DEADLINE_S)
        state = reply["state"]
        pieces.append(reply["text"])
    final = handle.stream_flush.remote(state).result(timeout_s=REPLY_DEADLINE_S)
    pieces.append(final["text"])
    assert "".join(pieces) == SafetyFilter.from_profile("default").check(text, "output").text
    assert "".join(pieces) == "好的，您的卡号[已隐藏]已绑定，验证码[已隐藏]请勿泄露。"
    assert final["action"] == "redact" and final["rule_ids"] == ["card_number", "secret"]


def test_client_screens_input_and_stream(handle):
    async def scenario():
        client = SafetyClient(handle, timeout_s=REPLY_DEADLINE_S)
        verdict = await client.check(f"卡号{CARD}", "input")
        stream = client.stream("output")
        out = [await stream.feed(chunk) for chunk in ["密码是", "abc", "123，好的"]]
        out.append(await stream.flush())
        return verdict, "".join(out), stream.action

    verdict, streamed, action = asyncio.run(asyncio.wait_for(scenario(), REPLY_DEADLINE_S))
    assert verdict["text"] == "卡号[已隐藏]"
    assert (streamed, action) == ("密码是[已隐藏]，好的", "redact")


def test_client_fails_closed_on_error(handle):
    # A state made under other rules is refused by the replica: the client raises, and the
    # message names the failure, not the text.
    foreign = SafetyFilter.from_profile("strict").stream("output")
    foreign.feed("秘密文本12345")
    bad_state = foreign.to_state()

    async def scenario():
        client = SafetyClient(handle, timeout_s=REPLY_DEADLINE_S)
        with pytest.raises(SafetyUnavailable) as error:
            await client._call("stream_feed", bad_state, "更多", "output")
        return str(error.value)

    message = asyncio.run(asyncio.wait_for(scenario(), REPLY_DEADLINE_S))
    assert "stream_feed" in message and "秘密" not in message and "12345" not in message


def test_client_fails_closed_on_timeout(handle):
    # No answer within the deadline is a failure, not a pass.
    async def scenario():
        client = SafetyClient(handle, timeout_s=1e-6)
        with pytest.raises(SafetyUnavailable, match="did not answer"):
            await client.check(f"卡号{CARD}", "output")

    asyncio.run(asyncio.wait_for(scenario(), REPLY_DEADLINE_S))


def test_health_check_and_stats(handle):
    assert handle.check_health.remote().result(timeout_s=REPLY_DEADLINE_S) is None
    stats = handle.stats.remote().result(timeout_s=REPLY_DEADLINE_S)
    assert stats["profile"] == "default" and stats["counts"]["input:card_number"] >= 1
    # Only rule ids and counts: no text in the replica's stats.
    assert all("卡" not in key for key in stats["counts"])
