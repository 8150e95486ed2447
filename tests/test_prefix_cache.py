"""Prefix caching (r1/engine/prefix_cache.py): blocks of finished sequences' keys and values, and the
transformers engine prefilling prompts that start with them, answering as it does without them."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from r1.config import EngineConfig, ModelConfig, SamplingConfig, ServeConfig
from r1.engine import TransformersEngine
from r1.engine.optimize import check_sharded_options
from r1.engine.prefix_cache import BLOCK_TOKENS, PrefixCache, new_prefix_cache
from tests.lora_helpers import write_adapter

GREEDY = SamplingConfig(temperature=0, max_new_tokens=24, ignore_eos=True)


def kv(tokens: int, layers: int = 2, offset: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer [2 heads, tokens, 4]: keys hold their position (+ offset), values its negative."""
    position = torch.arange(tokens, dtype=torch.float32)[None, :, None].expand(2, tokens, 4) + offset
    return [(position + layer, -(position + layer)) for layer in range(layers)]


def block_bytes(layers: int = 2) -> int:
    return layers * 2 * 2 * BLOCK_TOKENS * 4 * 4


# -- the cache ------------------------------------------------------------------------------------

def test_a_match_is_whole_cached_blocks_and_leaves_the_prompts_last_token():
    cache = PrefixCache(1 << 20)
    tokens = list(range(100, 140))  # 2 whole blocks and 8 tokens
    assert cache.put(tokens, kv(40)) == 2  # the partial block is not kept
    length, layers = cache.match(tokens + [7, 8, 9])
    assert length == 2 * BLOCK_TOKENS
    for layer, (keys, values) in enumerate(layers):
        assert torch.equal(keys, kv(40)[layer][0][:, :32]) and torch.equal(values, kv(40)[layer][1][:, :32])
    # The prompt's last token is always computed: a prompt of exactly two blocks gets one.
    assert cache.match(tokens[:32])[0] == BLOCK_TOKENS
    assert cache.match(tokens[:33])[0] == 2 * BLOCK_TOKENS
    # A prompt that leaves the cached tokens inside the second block gets the first block only.
    assert cache.match(tokens[:20] + [1] * 30)[0] == BLOCK_TOKENS
    # Nothing for a prompt whose first block differs, or shorter than a block and a token.
    assert cache.match([1] + tokens[1:]) is None
    assert cache.match(tokens[:BLOCK_TOKENS]) is None
    stats = cache.stats()
    assert stats["prefix_cache_hit_tokens"] == 32 + 16 + 32 + 16
    assert stats["prefix_cache_queried_tokens"] == 43 + 32 + 33 + 50 + 40 + 16


def test_blocks_shared_by_sequences_are_kept_once():
    cache = PrefixCache(1 << 20)
    shared = list(range(32))
    assert cache.put(shared + list(range(500, 516)), kv(48)) == 3
    assert cache.put(shared + list(range(600, 616)), kv(48, offset=0.5)) == 1  # only its last block is new
    assert len(cache) == 4 and cache.nbytes == 4 * block_bytes()
    # Each continuation finds its own last block (and its own values there).
    length, layers = cache.match(shared + list(range(600, 616)) + [1])
    assert length == 48 and torch.equal(layers[0][0][:, 32:], kv(48, offset=0.5)[0][0][:, 32:])


def test_least_recently_used_blocks_go_first_and_a_prefix_outlives_its_continuations():
    cache = PrefixCache(4 * block_bytes())
    first, second = list(range(48)), list(range(1000, 1032))
    cache.put(first, kv(48))
    cache.put(second, kv(32))  # five blocks for four places: the least recently used goes
    assert len(cache) == 4 and cache.nbytes == 4 * block_bytes()
    # It was the first sequence's last block, not its start: its first two blocks still match.
    assert cache.match(first + [1])[0] == 32
    assert cache.match(second + [1])[0] == 32
    cache.match(first + [1])  # used again: now the second sequence's blocks are the oldest
    cache.put(list(range(2000, 2016)), kv(16))
    assert cache.match(second + [1])[0] == BLOCK_TOKENS  # its continuation went first
    assert cache.match(first + [1])[0] == 32


def test_each_adapter_has_its_own_blocks():
    cache = PrefixCache(1 << 20)
    tokens = list(range(40))
    cache.put(tokens, kv(40), adapter=1)
    assert cache.match(tokens, adapter=0) is None and cache.match(tokens, adapter=2) is None
    assert cache.match(tokens, adapter=1)[0] == 32


def test_kept_blocks_are_copies_and_a_budget_below_one_block_keeps_none():
    cache = PrefixCache(1 << 20)
    source = kv(64)
    cache.put(list(range(32)), [(keys[:, :32], values[:, :32]) for keys, values in source])  # views
    for keys, values in source:
        keys.add_(100.0), values.add_(100.0)
    assert torch.equal(cache.match(list(range(33)))[1][0][0], kv(32)[0][0])  # the values as they were put
    tiny = PrefixCache(block_bytes() - 1)
    assert tiny.put(list(range(32)), kv(32)) == 0 and len(tiny) == 0 and tiny.match(list(range(33))) is None
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0 and cache.match(list(range(33))) is None


def test_auto_caches_only_for_an_engine_that_owns_its_weights():
    assert new_prefix_cache(EngineConfig(), owns_weights=False) is None
    assert new_prefix_cache(EngineConfig(), owns_weights=True).capacity_bytes == 256 << 20
    assert new_prefix_cache(EngineConfig(prefix_cache_mb=8), owns_weights=False).capacity_bytes == 8 << 20
    assert new_prefix_cache(EngineConfig(prefix_cache_mb=0), owns_weights=True) is None


@pytest.mark.parametrize("value", [-1, True, 1.5, "big", 1 << 21])
def test_a_bad_prefix_cache_size_is_a_config_error_naming_it(value):
    with pytest.raises(ValueError, match=r"prefix_cache_mb[\s\S]*expected auto or a size in MiB"):
        EngineConfig(prefix_cache_mb=value)


def test_the_engine_a_server_builds_keeps_a_prefix_cache_by_default():
    from r1.engine import create_engine

    engine = create_engine(ModelConfig(model="r1-tiny", device="cpu", dtype="fp32"), EngineConfig())
    assert engine.runner.prefix_cache.capacity_bytes == 256 << 20  # auto: it loaded its own model
    assert create_engine(ModelConfig(model="r1-tiny", device="cpu", dtype="fp32"),
                         EngineConfig(prefix_cache_mb=0)).runner.prefix_cache is None


def test_pipeline_stages_refuse_a_prefix_cache_size_and_take_auto():
    check_sharded_options(EngineConfig())  # auto: none there
    with pytest.raises(ValueError, match="prefix_cache_mb is not supported with pipeline_stages > 1"):
        check_sharded_options(ServeConfig(pipeline_stages=2, engine={"prefix_cache_mb": 64}).engine)


# -- the engine -----------------------------------------------------------------------------------

@pytest.fixture()
def engines(tiny):
    model, tokenizer = tiny
    return (TransformersEngine(model, tokenizer, EngineConfig(max_num_seqs=8)),
            TransformersEngine(model, tokenizer, EngineConfig(max_num_seqs=8, prefix_cache_mb=64)))


def hit_tokens(engine: TransformersEngine) -> int:
    return engine.stats()["prefix_cache_hit_tokens"]


def test_a_chats_later_turns_are_prefilled_from_the_earlier_ones_and_answer_the_same(engines):
    plain, cached = engines
    assert "prefix_cache_bytes" not in plain.stats()  # TransformersEngine(model): none unless asked
    history = [{"role": "system", "content": "You answer arithmetic questions. Think first, then answer."},
               {"role": "user", "content": "Mia has 23 apples. She buys 45 more. How many apples does she have now?"}]
    hits, prompts = [], []
    for turn in range(3):
        expected = plain.generate_batch([history], GREEDY)[0]
        reply = cached.generate_batch([history], GREEDY)[0]
        assert reply.token_ids == expected.token_ids, turn
        hits.append(hit_tokens(cached))
        prompts.append(cached.encode_prompt(history))
        history = history + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": f"And {turn} more?"}]
    # The first turn had nothing cached; each later one reused at least the whole blocks it shares
    # with the turn before's prompt (the template drops the reasoning from the history it repeats).
    assert hits[0] == 0
    for turn in (1, 2):
        shared = next(i for i, (a, b) in enumerate(zip(prompts[turn - 1], prompts[turn])) if a != b)
        assert shared >= 3 * BLOCK_TOKENS
        assert hits[turn] - hits[turn - 1] >= shared // BLOCK_TOKENS * BLOCK_TOKENS, turn


def test_a_prompt_continuing_a_generated_reply_reuses_the_generated_tokens_too(engines, tiny):
    plain, cached = engines
    prompt = tiny[1].encode("Tom has 5 pens. He buys 3 more pens and gives 2 away. How many pens does he have?")
    first = cached.generate_batch([prompt], GREEDY)[0]
    continued = prompt + first.token_ids[:20]  # the prompt and 20 of the tokens the engine generated
    before = hit_tokens(cached)
    assert cached.generate_batch([continued], GREEDY)[0].token_ids == plain.generate_batch([continued], GREEDY)[0].token_ids
    assert hit_tokens(cached) - before == (len(continued) - 1) // BLOCK_TOKENS * BLOCK_TOKENS


def test_hits_and_misses_admitted_together_answer_as_without_a_cache(engines, tiny):
    plain, cached = engines
    encode = tiny[1].encode
    base = encode("Ana had 40 cards and gave 15 away. Then she found 8 more cards in a box. How many cards")
    cached.generate_batch([base], GREEDY)
    prompts = [base + encode(" does she have now?"), encode("12 + 7 - 3 ="), base + encode(" are left?"),
               encode("Write a Python function that adds two numbers and returns the sum of them.")]
    before = hit_tokens(cached)
    got = cached.generate_batch(prompts, GREEDY)
    assert [c.token_ids for c in got] == [c.token_ids for c in plain.generate_batch(prompts, GREEDY)]
    assert hit_tokens(cached) - before >= 2 * BLOCK_TOKENS  # the two that start with `base`


def test_prompts_of_different_cached_and_new_lengths_prefill_together_and_their_blocks_are_kept_right(engines, tiny):
    plain, cached = engines
    encode = tiny[1].encode
    short = encode("Tom has 5 pens. He buys 3 more pens and gives 2 away. How many")  # about two blocks
    long = encode("Explain step by step why the sky is blue, in simple words, for a child of six. Then say "
                  "why sunsets are red and why the sea looks blue on a clear day.")  # about four blocks
    cached.generate_batch([short, long], GREEDY)
    # Cached prefixes of different lengths and rests of different lengths in one forward: rows with
    # padding between their prefix and their rest.
    prompts = [short + encode(" pens does he have at the end of the day, after all that?"), long + encode(" Why?")]
    before = hit_tokens(cached)
    got = cached.generate_batch(prompts, GREEDY)
    assert [c.token_ids for c in got] == [c.token_ids for c in plain.generate_batch(prompts, GREEDY)]
    assert hit_tokens(cached) - before >= (len(short) // BLOCK_TOKENS + len(long) // BLOCK_TOKENS - 2) * BLOCK_TOKENS
    # Their keys and values are kept from their unpadded positions. Seen with the cache emptied while
    # they run, so that every block of theirs is put again from those rows (the second has padding
    # between its prefix and its rest).
    runner = cached.runner
    fed = [[], []]
    tokens = runner.add(["a", "b"], prompts).argmax(-1).tolist()
    runner.prefix_cache.clear()
    for _ in range(4):
        for row, token in enumerate(tokens):
            fed[row].append(token)
        tokens = runner.step(["a", "b"], tokens).argmax(-1).tolist()
    runner.remove(["a", "b"])
    continued = [prompt + more for prompt, more in zip(prompts, fed)]
    before = hit_tokens(cached)
    torch.testing.assert_close(runner.add(["c", "d"], continued), plain.runner.add(["c", "d"], continued),
                               rtol=1e-4, atol=1e-4)
    assert hit_tokens(cached) - before == sum((len(p) - 1) // BLOCK_TOKENS * BLOCK_TOKENS for p in continued)
    runner.remove(["c", "d"]), plain.runner.remove(["c", "d"])


def test_cached_prefixes_give_the_logits_of_a_full_prefill(tiny):
    model, tokenizer = tiny
    plain = TransformersEngine(model, tokenizer, EngineConfig(max_num_seqs=4))
    cached = TransformersEngine(model, tokenizer, EngineConfig(max_num_seqs=4, prefix_cache_mb=16))
    prompt = tokenizer.encode("Explain step by step why the sky is blue, in simple words, for a child of six.")
    cached.generate_batch([prompt], GREEDY)
    longer = prompt + tokenizer.encode(" Then say why sunsets are red.")
    expected = plain.runner.add(["a"], [longer])
    got = cached.runner.add(["a"], [longer])
    assert cached.runner.prefix_cache.stats()["prefix_cache_hit_tokens"] >= 2 * BLOCK_TOKENS
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    plain.runner.remove(["a"]), cached.runner.remove(["a"])


def test_prompt_logprobs_and_repeated_prompts_are_computed_whole(engines, tiny):
    plain, cached = engines
    prompt = tiny[1].encode("Mia has 23 apples. She buys 45 more. How many apples does she have now?")
    cached.generate_batch([prompt], GREEDY)
    before = cached.stats()
    logprobs = SamplingConfig(temperature=0, max_new_tokens=4, prompt_logprobs=2)
    got = cached.generate_batch([prompt + [5]], logprobs)[0]
    assert got.prompt_logprobs == plain.generate_batch([prompt + [5]], logprobs)[0].prompt_logprobs
    # n copies of one prompt are prefilled once, as one row repeated, not each from the cache.
    assert [c.token_ids for c in cached.generate_batch([prompt + [6]] * 3, GREEDY)] == \
        [c.token_ids for c in plain.generate_batch([prompt + [6]] * 3, GREEDY)]
    after = cached.stats()
    assert after["prefix_cache_hit_tokens"] == before["prefix_cache_hit_tokens"]
    assert after["prefix_cache_queried_tokens"] == before["prefix_cache_queried_tokens"]


def test_an_adapters_requests_use_its_own_blocks(tiny, tmp_path):
    model, tokenizer = tiny
    merged = TransformersEngine(write_adapter(tmp_path / "attn", 1, ["q_proj", "v_proj"]), tokenizer)
    engine = TransformersEngine.from_config(ModelConfig(model="r1-tiny", device="cpu", dtype="fp32"),
                                            EngineConfig(lora_adapters={"attn": str(tmp_path / "attn")}, prefix_cache_mb=16))

    def adapted(prompt: list[int]) -> list[int]:
        async def tokens():
            return [t async for delta in engine.stream(engine.make_request(prompt, GREEDY, adapter="attn"))
                    for t in delta.token_ids]
        return asyncio.run(asyncio.wait_for(tokens(), timeout=120))

    prompt = tokenizer.encode("Ana had 40 cards and gave 15 away. Then she found 8 more cards. How many")
    longer = prompt + tokenizer.encode(" cards does she have?")
    engine.generate_batch([prompt], GREEDY)  # the base model's blocks
    engine.start()
    try:
        before = hit_tokens(engine)
        assert adapted(longer) == merged.generate_batch([longer], GREEDY)[0].token_ids
        assert hit_tokens(engine) == before  # the base model's blocks are not the adapter's
        assert adapted(longer + [5]) == merged.generate_batch([longer + [5]], GREEDY)[0].token_ids
        assert hit_tokens(engine) > before  # its own, from the request before
    finally:
        engine.shutdown()


def test_after_the_weights_change_reset_prefix_cache_makes_it_answer_as_the_new_model(tiny):
    model, tokenizer = tiny
    own = copy.deepcopy(model)
    engine = TransformersEngine(own, tokenizer, EngineConfig(prefix_cache_mb=16))
    prompt = tokenizer.encode("Mia has 23 apples. She buys 45 more. How many apples does she have now?")
    engine.generate_batch([prompt], GREEDY)
    with torch.no_grad():
        for layer in own.model.layers:
            layer.self_attn.v_proj.weight.mul_(1.5)  # as a trainer's step changes them in place
    engine.reset_prefix_cache()
    assert engine.stats()["prefix_cache_bytes"] == 0
    longer = prompt + [5, 6]
    assert engine.generate_batch([longer], GREEDY)[0].token_ids == \
        TransformersEngine(own, tokenizer).generate_batch([longer], GREEDY)[0].token_ids


def test_sequences_a_failed_step_ended_are_not_cached(tiny):
    model, tokenizer = tiny
    own = copy.deepcopy(model)
    engine = TransformersEngine(own, tokenizer, EngineConfig(prefix_cache_mb=16))
    last = own.model.layers[-1]
    forward = last.forward

    def fail_on_decode(hidden_states, *args, **kwargs):
        if hidden_states.shape[1] == 1:  # a decode step: the layers before this one already wrote their keys
            raise RuntimeError("injected failure")
        return forward(hidden_states, *args, **kwargs)

    last.forward = fail_on_decode
    prompt = tokenizer.encode("Mia has 23 apples. She buys 45 more. How many apples does she have now?")
    with pytest.raises(RuntimeError, match="injected failure"):
        engine.generate_batch([prompt], GREEDY)
    assert engine.stats()["prefix_cache_blocks"] == 0
    del last.forward  # the model works again; so does the cache
    engine.generate_batch([prompt], GREEDY)
    assert engine.stats()["prefix_cache_blocks"] >= 2


def test_the_prefix_cache_benchmark_runs_and_reports_against_its_baseline():
    from bench.contract import validate
    from bench.prefix_cache import main

    result = main(["--models", "tiny", "--conversations", "2", "--turns", "2", "--repeats", "1", "--new-tokens", "4",
                   "--system-tokens", "64"])
    assert validate(result) == []
    turns, overall = result["tables"]
    assert [row[1] for row in turns["rows"]] == [1, 2]
    assert overall["rows"][0][5] == "yes"  # the same tokens with and without the cache
    assert result["raw"]["rows"][0]["hit_share"] > 0
