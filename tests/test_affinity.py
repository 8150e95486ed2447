"""Prefix affinity (r1/serving/affinity.py): the key of a request's prompt and the replicas' ranking
that `cluster.serve.routing.PrefixAffinityRouter` routes by (over real Serve: tests/test_serve_api.py)."""

from __future__ import annotations

import collections

from r1.serving.affinity import KEY_CHARS, affinity_key, rank_replicas

SYSTEM = {"role": "system", "content": "You answer arithmetic questions step by step, then give one number. " * 3}


def test_a_chats_turns_and_requests_sharing_a_long_system_text_have_one_key():
    first = [SYSTEM, {"role": "user", "content": "What is 2 + 3?"}]
    later = first + [{"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 more?"}]
    other_user = [SYSTEM, {"role": "user", "content": "What is 7 * 8?"}]
    assert affinity_key(first) == affinity_key(later)  # every turn repeats the chat's opening
    assert affinity_key([{"role": "user", "content": "hi"}]) == affinity_key(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}])
    # The key is at most KEY_CHARS of the opening: a system text shorter than that leaves room for
    # the first question, so other chats with it get other keys ...
    assert len(SYSTEM["content"]) < KEY_CHARS and affinity_key(other_user) != affinity_key(first)
    # ... and one at least that long puts every chat with it on one key (its blocks are shared).
    long_system = {"role": "system", "content": "x" * KEY_CHARS}
    assert affinity_key([long_system, first[1]]) == affinity_key([long_system, other_user[1]])


def test_content_parts_roles_and_raw_prompts_make_keys_and_short_raw_prompts_none():
    parts = [{"role": "user", "content": [{"type": "text", "text": "Explain why the sky is blue."}]}]
    assert affinity_key(parts) == affinity_key([{"role": "user", "content": "Explain why the sky is blue."}])
    assert affinity_key([{"role": "system", "content": "a"}]) != affinity_key([{"role": "user", "content": "a"}])
    text = "Once upon a time " * 20
    assert affinity_key(text) == affinity_key(text + "and more")
    assert affinity_key(list(range(200))) == affinity_key(list(range(64)) + [9, 9])
    for short in ("2 + 3 =", list(range(10)), None, 5, [], [1, "x"]):
        assert affinity_key(short) is None, short


def test_rendezvous_ranking_is_stable_spreads_keys_and_moves_only_a_removed_replicas_keys():
    replicas = [f"replica-{i}" for i in range(4)]
    keys = [affinity_key([{"role": "user", "content": f"conversation {i}"}]) for i in range(400)]
    first = {key: rank_replicas(key, replicas, str)[0] for key in keys}
    assert all(rank_replicas(key, list(reversed(replicas)), str)[0] == first[key] for key in keys)  # any order
    counts = collections.Counter(first.values())
    assert set(counts) == set(replicas) and min(counts.values()) > 60  # spread over all four (100 each expected)
    survivors = replicas[1:]
    for key in keys:
        now = rank_replicas(key, survivors, str)[0]
        if first[key] != "replica-0":
            assert now == first[key]  # only the removed replica's keys move
        else:
            assert now == rank_replicas(key, replicas, str)[1]  # to their second choice
