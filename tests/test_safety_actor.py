"""The SafetyFilter Serve deployment on a real local Ray: checks and stateless stream steps through
a handle, and the fail-closed client (errors and timeouts become SafetyUnavailable)."""

from __future__ import annotations

import asyncio

import pytest
import ray
from ray import serve

from actors.safety import SafetyClient, SafetyUnavailable, build_safety_filter
from cluster.ray_start import init_ray
from r1.config import DeploymentConfig, SafetyConfig
from r1.safety import SafetyFilter

APP = "safety-test"
REPLY_DEADLINE_S = 60.0
CARD = "4111 1111 1111 1111"


@pytest.fixture(scope="module")
def handle():
    init_ray(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    config = SafetyConfig(
        deployment=DeploymentConfig(num_cpus=0.1, min_replicas=1, max_replicas=1, target_ongoing_requests=4, max_ongoing_requests=8)
    )
    try:
        # Handles only: no HTTP proxy, so nothing competes for a port with other Serve instances.
        serve.start(proxy_location="Disabled")
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


def _foreign_state() -> dict:
    """A stream state made under other rules (strict profile): the replica refuses to resume it."""
    foreign = SafetyFilter.from_profile("strict").stream("output")
    foreign.feed("秘密文本12345")
    return foreign.to_state()


def test_client_fails_closed_on_error(handle):
    # A state made under other rules is refused by the replica: the client raises, and the
    # message names the failure, not the text.
    bad_state = _foreign_state()

    async def scenario():
        client = SafetyClient(handle, timeout_s=REPLY_DEADLINE_S)
        with pytest.raises(SafetyUnavailable) as error:
            await client._call("stream_feed", bad_state, "更多", "output")
        return str(error.value)

    message = asyncio.run(asyncio.wait_for(scenario(), REPLY_DEADLINE_S))
    assert "stream_feed" in message and "秘密" not in message and "12345" not in message


def test_concurrent_streams_share_calls_and_match_check(handle):
    # 8 streams fed concurrently: each stream's pieces equal the whole-text verdict, and the steps
    # of different streams travel together (fewer calls than steps).
    texts = [f"第{i}个：卡号{CARD}，验证码{384920 + i}，好的。" * 2 for i in range(8)]
    library = SafetyFilter.from_profile("default")

    async def one(client, text):
        stream = client.stream("output")
        pieces = [await stream.feed(text[i : i + 5]) for i in range(0, len(text), 5)]
        pieces.append(await stream.flush())
        return "".join(pieces)

    async def scenario():
        client = SafetyClient(handle, timeout_s=REPLY_DEADLINE_S)
        return await asyncio.gather(*(one(client, text) for text in texts))

    before = handle.stats.remote().result(timeout_s=REPLY_DEADLINE_S)["counts"]
    streamed = asyncio.run(asyncio.wait_for(scenario(), REPLY_DEADLINE_S))
    after = handle.stats.remote().result(timeout_s=REPLY_DEADLINE_S)["counts"]
    assert streamed == [library.check(text, "output").text for text in texts]
    assert all("[已隐藏]" in s and CARD not in s for s in streamed)
    steps = sum(len(range(0, len(text), 5)) for text in texts)
    calls = sum(after.get(k, 0) - before.get(k, 0) for k in ("requests:stream_feed", "requests:stream_feed_batch"))
    assert after["requests:stream_feed_batch"] - before.get("requests:stream_feed_batch", 0) >= 1
    assert calls < steps


def test_the_last_step_flushes_in_the_same_call(handle):
    # What the ingress does at a stream's end: the last chunk and the held text in one batched step,
    # after a prompt given as context; the same text as the library, and no separate flush call.
    library = SafetyFilter.from_profile("default").stream("output", context="卡号 4111 1111 ")

    async def scenario():
        client = SafetyClient(handle, timeout_s=REPLY_DEADLINE_S)
        stream = client.stream("output", context="卡号 4111 1111 ")
        pieces = [await stream.feed("1111 "), await stream.finish("1111，密码是abc123")]
        return "".join(pieces), stream.action

    before = handle.stats.remote().result(timeout_s=REPLY_DEADLINE_S)["counts"]
    streamed, action = asyncio.run(asyncio.wait_for(scenario(), REPLY_DEADLINE_S))
    after = handle.stats.remote().result(timeout_s=REPLY_DEADLINE_S)["counts"]
    assert streamed == library.feed("1111 ") + library.feed("1111，密码是abc123") + library.flush()
    assert (streamed, action) == ("[已隐藏]，密码是[已隐藏]", "redact")
    assert after["requests:stream_feed_batch"] - before.get("requests:stream_feed_batch", 0) == 2
    assert after.get("requests:stream_flush", 0) == before.get("requests:stream_flush", 0)


def test_a_failing_step_fails_only_its_stream(handle):
    # A bad state among concurrent steps: that stream fails closed, the others are screened.
    bad_state = _foreign_state()

    async def scenario():
        client = SafetyClient(handle, timeout_s=REPLY_DEADLINE_S)
        good = [client.feed(None, f"卡号{CARD}", "output") for _ in range(3)]
        bad = client.feed(bad_state, "更多", "output")
        return await asyncio.gather(*good, bad, return_exceptions=True)

    *good, bad = asyncio.run(asyncio.wait_for(scenario(), REPLY_DEADLINE_S))
    assert isinstance(bad, SafetyUnavailable) and "秘密" not in str(bad) and "12345" not in str(bad)
    assert all(isinstance(reply, dict) and CARD not in reply["text"] for reply in good)


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


def test_a_cluster_started_by_init_ray_gives_serves_proxy_time_to_start(handle):
    # The value Serve's code reads in the cluster's processes (its controller among them).
    @ray.remote(num_cpus=0)
    def proxy_ready_check_timeout_s() -> float:
        from ray.serve._private.constants import PROXY_READY_CHECK_TIMEOUT_S

        return PROXY_READY_CHECK_TIMEOUT_S

    assert ray.get(proxy_ready_check_timeout_s.remote(), timeout=REPLY_DEADLINE_S) == 30.0
