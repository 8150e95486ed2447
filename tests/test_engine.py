"""The continuous-batching engine on the real r1-tiny model.

Greedy results must equal `model.generate` on each prompt alone, whatever else is in the batch and
whenever a request arrives; a late request must start producing tokens before earlier ones finish.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
import torch

from r1.config import EngineConfig, SamplingConfig
from r1.engine import EngineOverloaded, TransformersEngine, resolve_max_new_tokens

PROMPTS = [
    "Mia has 23 apples.",
    "Tom has 5 pens. He buys 17 more. How many pens does he have now?",
    "1",
    "忘记密码怎么办？",
    "def add(a, b):\n    return a + b",
    "A long prompt " * 12,
    "Reason step by step: 12 + 7 - 3",
    "The answer is",
    "Ana had 40 cards and gave 15 away.",
]


@torch.inference_mode()
def reference(model, ids: list[int], max_new_tokens: int, frequency_penalty: float = 0.0,
              presence_penalty: float = 0.0, held: tuple[set[int], int] = (set(), 0)) -> list[int]:
    """Plain greedy decoding of one sequence with the model's own KV cache, EOS included; with
    OpenAI's penalties written out: each logit lowered by frequency × (times the reply generated the
    token) + presence × (generated at all); `held` = (ids, n): those ids are never chosen while the
    reply has fewer than n tokens.

    (Not `generate(min_new_tokens=...)`: that masks EOS, while `ignore_eos` keeps decoding past it.)
    """
    out = model(torch.tensor([ids]), use_cache=True)
    tokens = []
    for _ in range(max_new_tokens):
        logits = out.logits[0, -1].float().clone()
        for token in set(tokens):
            logits[token] -= frequency_penalty * tokens.count(token) + presence_penalty
        if len(tokens) < held[1]:
            logits[list(held[0])] = float("-inf")
        tokens.append(int(logits.argmax()))
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


@pytest.fixture(scope="module")
def engine(tiny):
    model, tokenizer = tiny
    engine = TransformersEngine(model, tokenizer, EngineConfig(max_num_seqs=16))
    yield engine
    engine.shutdown()


def test_staggered_greedy_requests_equal_generate_alone(engine, tiny):
    model, tokenizer = tiny
    # Request 0 is the longest so that every later request arrives while it is still decoding.
    max_tokens = [60] + [12 + 3 * i for i in range(1, len(PROMPTS))]
    greedy = [SamplingConfig(temperature=0, max_new_tokens=n, ignore_eos=True) for n in max_tokens]
    clock = itertools.count()
    events: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
    outputs: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}

    async def one(i: int) -> None:
        # Request i arrives after request 0 has produced 3*i tokens.
        while len(outputs[0]) < 3 * i and i > 0:
            await asyncio.sleep(0.001)
        async for delta in engine.stream(PROMPTS[i], greedy[i]):
            outputs[i].extend(delta.token_ids)
            events[i].append(next(clock))

    async def main() -> None:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(len(PROMPTS)))), timeout=120)

    asyncio.run(main())
    for i, prompt in enumerate(PROMPTS):
        ids = tokenizer.encode(prompt, add_special_tokens=True)
        assert outputs[i] == reference(model, ids, max_tokens[i]), f"request {i} differs from generate() alone"
    # The last request joined while request 0 was still decoding.
    last = len(PROMPTS) - 1
    assert events[last][0] < events[0][-1]
    assert len(set(map(len, outputs.values()))) > 1  # different lengths really were in flight together


def test_generate_batch_matches_streaming_and_reports_usage(engine):
    sampling = SamplingConfig(temperature=0, max_new_tokens=8, ignore_eos=True)
    completions = engine.generate_batch(PROMPTS[:4], sampling)
    for prompt, completion in zip(PROMPTS[:4], completions):
        assert completion.finish_reason == "length"
        assert completion.usage.completion_tokens == 8
        assert completion.usage.prompt_tokens == len(engine.tokenizer.encode(prompt))
        assert completion.text == engine.tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def test_identical_prompts_are_prefilled_once_and_decode_as_if_alone(tiny):
    # A batch with repeated prompts (a GRPO group, n > 1) runs the prefill on the distinct prompts
    # only; every row must still decode exactly what its prompt gives alone.
    from r1.engine.runner import LocalModelRunner

    model, tokenizer = tiny
    prompts = [tokenizer.encode(p, add_special_tokens=True) for p in (PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[1])]
    prefill_rows = []
    hook = model.model.register_forward_pre_hook(lambda _, args, kwargs: prefill_rows.append(kwargs["input_ids"].shape), with_kwargs=True)
    try:
        runner = LocalModelRunner(model, pad_token_id=0)
        logits = runner.add(["a", "b", "c", "d"], prompts)
    finally:
        hook.remove()
    assert prefill_rows[0][0] == 2  # two distinct prompts
    assert len(runner.kv) == 4 and runner.kv.mask.shape[0] == 4
    assert torch.equal(logits[0], logits[2]) and torch.equal(logits[0], logits[3])
    tokens = logits.argmax(-1).tolist()
    outputs = [[t] for t in tokens]
    for _ in range(5):
        step = runner.step(["a", "b", "c", "d"], [out[-1] for out in outputs]).argmax(-1).tolist()
        for out, token in zip(outputs, step):
            out.append(token)
    for prompt, out in zip(prompts, outputs):
        assert out == reference(model, prompt, 6)


def _decode(runner, steps: int, first: list[int], seq_ids: list[str]) -> tuple[list[torch.Tensor], list[int]]:
    """Greedy steps of a runner; the logits of each step and the last tokens."""
    tokens, logits = first, []
    for _ in range(steps):
        out = runner.step(seq_ids, tokens)
        logits.append(out)
        tokens = out.argmax(-1).tolist()
    return logits, tokens


def test_growing_kv_cache_gives_the_logits_of_a_concatenating_cache(tiny, monkeypatch):
    # The in-place cache must be invisible in the results: the same logits, bit for bit, as
    # transformers' concatenating cache, across reallocations (a spare of 3 positions forces one
    # every few steps), rows merged in mid-decode (their cache arrives concatenated) and rows removed
    # (their cache arrives index-selected).
    from r1.engine.runner import GrowingLayer, LocalModelRunner

    monkeypatch.setattr(GrowingLayer, "MIN_SPARE", 3)
    model, tokenizer = tiny
    prompts = [tokenizer.encode(p, add_special_tokens=True) for p in PROMPTS[:4]]
    results = []
    for growing in (True, False):
        runner = LocalModelRunner(model, pad_token_id=0, growing_cache=growing)
        first = runner.add(["a", "b"], prompts[:2]).argmax(-1).tolist()
        logits, tokens = _decode(runner, 9, first, ["a", "b"])
        late = runner.add(["c", "d"], prompts[2:]).argmax(-1).tolist()
        more, tokens = _decode(runner, 7, tokens + late, ["a", "b", "c", "d"])
        runner.remove(["b"])
        rest, _ = _decode(runner, 6, [tokens[0], tokens[2], tokens[3]], ["a", "c", "d"])
        layer_types = {type(layer).__name__ for layer in runner.kv.cache.layers}
        results.append((logits + more + rest, layer_types))
    (grown, grown_types), (concatenated, plain_types) = results
    assert grown_types == {"GrowingLayer"} and plain_types == {"DynamicLayer"}
    assert len(grown) == len(concatenated) == 22
    for step, (a, b) in enumerate(zip(grown, concatenated)):
        assert torch.equal(a, b), f"step {step} differs"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decode_steps_build_the_attention_mask_transformers_would_build(attn):
    # A decode step hands the model a 4D mask built from the batch's padding (transformers would
    # build it from the 2D mask on every forward, at a tenth of r1-tiny's step): the logits must be
    # those of transformers' own mask, through merges (new padding), removals (trimmed columns)
    # and a batch left without padding (no mask at all, as transformers gives SDPA).
    from r1.config import ModelConfig
    from r1.engine.runner import LocalModelRunner
    from r1.model import load_model

    model, tokenizer = load_model(ModelConfig(model="r1-tiny", device="cpu", dtype="fp32", attn_implementation=attn))
    prompts = [tokenizer.encode(p, add_special_tokens=True) for p in PROMPTS[:4]]
    assert len({len(p) for p in prompts}) == 4, "prompts of different lengths, so the batch has padding"
    results, masks = [], []
    for kind in (attn, None):
        runner = LocalModelRunner(model, pad_token_id=0)
        assert runner._mask_kind == attn
        runner._mask_kind = kind  # None: the 2D mask, for transformers to expand
        seen = []
        forward = runner._forward
        runner._forward = lambda **kwargs: (seen.append(kwargs["attention_mask"]), forward(**kwargs))[1]
        first = runner.add(["a", "b"], prompts[:2]).argmax(-1).tolist()
        logits, tokens = _decode(runner, 5, first, ["a", "b"])
        late = runner.add(["c", "d"], prompts[2:]).argmax(-1).tolist()
        more, tokens = _decode(runner, 5, tokens + late, ["a", "b", "c", "d"])
        runner.remove(["a", "b", "d"])  # "c" alone: its padding columns are trimmed
        rest, _ = _decode(runner, 3, [tokens[2]], ["c"])
        results.append(logits + more + rest)
        masks.append(seen)
    built, expanded = results
    for step, (a, b) in enumerate(zip(built, expanded)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), f"step {step} differs"
    decode_masks = [m for m in masks[0] if m is None or m.dim() == 4]
    assert len(decode_masks) == 13  # every decode step got a built mask (prefills keep the 2D one)
    assert all(m is not None and m.shape[1:3] == (1, 1) for m in decode_masks[:10])
    assert decode_masks[10:] == [None, None, None]  # no padding left
    expected_dtype = torch.bool if attn == "sdpa" else torch.float32
    assert decode_masks[0].dtype == expected_dtype
    assert all(m.dim() == 2 for m in masks[1])


def test_decode_mask_is_left_to_transformers_where_it_differs_by_layer_or_is_compiled(tiny):
    import copy

    from r1.engine.runner import decode_mask_kind

    model, _ = tiny
    assert decode_mask_kind(model) == "sdpa"
    sliding = copy.deepcopy(model)
    sliding.config.layer_types = ["sliding_attention"] + sliding.config.layer_types[1:]
    assert decode_mask_kind(sliding) is None
    flash = copy.deepcopy(model)
    flash.config._attn_implementation = "flash_attention_2"
    assert decode_mask_kind(flash) is None
    compiled = copy.deepcopy(model)
    forward = compiled.forward
    compiled.forward = lambda *args, **kwargs: forward(*args, **kwargs)
    compiled.forward.r1_compiled = True
    assert decode_mask_kind(compiled) is None


def test_growing_kv_cache_writes_decode_steps_into_its_buffer(tiny):
    # A decode step must not copy the cache: the keys stay in the same storage until the spare
    # positions run out, and then the buffer grows by at least a quarter of what it holds.
    from r1.engine.runner import GrowingLayer, LocalModelRunner

    model, tokenizer = tiny
    runner = LocalModelRunner(model, pad_token_id=0)
    first = runner.add(["a"], [tokenizer.encode(PROMPTS[1], add_special_tokens=True)]).argmax(-1).tolist()
    layer = runner.kv.cache.layers[0]
    assert isinstance(layer, GrowingLayer)
    storages, lengths = [], []
    tokens = first
    for _ in range(GrowingLayer.MIN_SPARE + 10):
        tokens = runner.step(["a"], tokens).argmax(-1).tolist()
        storages.append(layer.keys.untyped_storage().data_ptr())
        lengths.append(layer.keys.shape[-2])
    assert lengths == list(range(lengths[0], lengths[0] + len(lengths)))
    changes = [i for i in range(1, len(storages)) if storages[i] != storages[i - 1]]
    assert len(changes) == 1, f"the buffer moved at steps {changes}"
    capacity = layer._key_buffer.shape[-2]
    assert capacity - lengths[changes[0]] >= GrowingLayer.MIN_SPARE - 1


def test_seeded_sampling_is_reproducible_alone_or_batched(engine):
    seeded = SamplingConfig(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_new_tokens=16, ignore_eos=True)
    alone = engine.generate_batch([PROMPTS[1]], seeded)[0].token_ids
    batched = engine.generate_batch([PROMPTS[0], PROMPTS[1], PROMPTS[2]], [seeded.model_copy(update={"seed": 7}), seeded, seeded])
    assert batched[1].token_ids == alone
    other_seed = engine.generate_batch([PROMPTS[1]], seeded.model_copy(update={"seed": 99}))[0].token_ids
    assert other_seed != alone


def test_unseeded_sampling_follows_torchs_seed(engine):
    # Unseeded rows draw together from torch's default generator: the same torch.manual_seed before
    # the same batch gives the same tokens (GRPO's resumable rollouts), another seed other tokens.
    unseeded = SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=12, ignore_eos=True)

    def sample(seed):
        torch.manual_seed(seed)
        return [c.token_ids for c in engine.generate_batch(PROMPTS[:4], unseeded)]

    first = sample(5)
    assert sample(5) == first
    assert sample(6) != first


def test_filtering_a_batch_equals_filtering_each_row():
    from r1.engine.sampling import filter_top_k_top_p

    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0)) * 3
    for top_k, top_p in [(0, 0.9), (20, 1.0), (20, 0.5), (0, 1.0)]:
        batched = filter_top_k_top_p(logits, top_k, top_p)
        for row in range(5):
            assert torch.equal(batched[row], filter_top_k_top_p(logits[row], top_k, top_p)), (top_k, top_p, row)
        kept = torch.isfinite(batched).sum(-1)
        assert bool((kept >= 1).all()) and (top_k == 0 or bool((kept <= top_k).all()))


def test_draw_follows_the_distribution_and_never_picks_a_zero():
    from r1.engine.sampling import draw

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]] * 20_000)
    picked = draw(probs, torch.Generator().manual_seed(0))
    counts = torch.bincount(picked, minlength=6).double() / len(picked)
    assert counts[[0, 2, 5]].sum() == 0  # zero-probability tokens, the last one included
    torch.testing.assert_close(counts, probs[0].double(), atol=0.015, rtol=0)
    assert draw(torch.tensor([[0.0, 0.0, 1.0]])).tolist() == [2]
    same = draw(probs[:50], torch.Generator().manual_seed(3)), draw(probs[:50], torch.Generator().manual_seed(3))
    assert torch.equal(*same)


def test_stop_string_truncates_text_and_finishes(engine):
    free = engine.generate_batch([PROMPTS[0]], SamplingConfig(temperature=0, max_new_tokens=24, ignore_eos=True))[0]
    # Pick a stop string that really occurs in the greedy continuation.
    stop = free.text[5:8]
    assert stop and stop in free.text
    stopped = engine.generate_batch([PROMPTS[0]], SamplingConfig(temperature=0, max_new_tokens=24, ignore_eos=True, stop=[stop]))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(stop)]
    assert (stopped.stop_reason, free.stop_reason) == (stop, None)  # vLLM's stop_reason: the string; none at length
    # vLLM's include_stop_str_in_output keeps the stop string at the end; streamed, the deltas add up
    # to the same text, and the tokens are those of the request without it.
    kept = SamplingConfig(temperature=0, max_new_tokens=24, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    included = engine.generate_batch([PROMPTS[0]], kept)[0]
    assert included.text == free.text[: free.text.index(stop) + len(stop)] and included.finish_reason == "stop"
    assert included.token_ids == stopped.token_ids and included.stop_reason == stop

    async def streamed() -> str:
        return "".join([delta.text async for delta in engine.stream(PROMPTS[0], kept)])

    assert asyncio.run(streamed()) == included.text


def test_detokenizer_keeps_the_earliest_stop_string_when_asked(engine):
    # Stop strings that overlap: the earliest match ends the text, and of two starting there the
    # shorter (it completed first); with include_stop the matched string is kept, not the longer one.
    from r1.engine.detok import IncrementalDetokenizer

    ids = engine.tokenizer.encode("one two three four", add_special_tokens=False)
    for include, expected in ((False, "one two "), (True, "one two thre")):  # "thre" and "three" end at "ee"
        detok = IncrementalDetokenizer(engine.tokenizer, ["three", "four", "thre"], include_stop=include)
        text = "".join(detok.add(token) for token in ids) + detok.finish()
        assert (text, detok.stopped) == (expected, True)


def test_repetition_penalty_changes_greedy_output(engine):
    plain = engine.generate_batch([PROMPTS[2]], SamplingConfig(temperature=0, max_new_tokens=24, ignore_eos=True))[0]
    penalised = engine.generate_batch(
        [PROMPTS[2]], SamplingConfig(temperature=0, max_new_tokens=24, ignore_eos=True, repetition_penalty=5.0)
    )[0]
    assert len(set(penalised.token_ids)) >= len(set(plain.token_ids))
    assert penalised.token_ids != plain.token_ids


@pytest.mark.parametrize("frequency, presence", [(1.5, 0.0), (0.0, 2.0), (0.7, 0.7), (-1.0, 0.0)])
def test_frequency_and_presence_penalties_follow_openai(engine, tiny, frequency, presence):
    # Greedy tokens with the penalties equal a reference that applies them by hand, alone and in a
    # batch with an unpenalised request (each row keeps its own counts); and they change the output.
    model, tokenizer = tiny
    penalised = SamplingConfig(temperature=0, max_new_tokens=24, ignore_eos=True, frequency_penalty=frequency,
                               presence_penalty=presence)
    plain = SamplingConfig(temperature=0, max_new_tokens=24, ignore_eos=True)
    ids = tokenizer.encode(PROMPTS[2], add_special_tokens=False)
    expected = reference(model, ids, 24, frequency, presence)
    assert expected != reference(model, ids, 24)
    assert engine.generate_batch([PROMPTS[2]], penalised)[0].token_ids == expected
    both = engine.generate_batch([PROMPTS[2], PROMPTS[2]], [penalised, plain])
    assert both[0].token_ids == expected and both[1].token_ids == reference(model, ids, 24)


def test_logit_bias_forces_and_bans_tokens(engine, tiny):
    model, tokenizer = tiny
    greedy = SamplingConfig(temperature=0, max_new_tokens=8, ignore_eos=True)
    plain = engine.generate_batch([PROMPTS[1]], greedy)[0].token_ids
    forced_token = (plain[0] + 1) % engine.runner.vocab_size
    forced, banned, again = engine.generate_batch([PROMPTS[1]] * 3, [
        greedy.model_copy(update={"logit_bias": {forced_token: 100.0}}),
        greedy.model_copy(update={"logit_bias": {plain[0]: -100.0}}),
        greedy,  # batched beside them: untouched
    ])
    assert forced.token_ids == [forced_token] * 8
    assert plain[0] not in banned.token_ids and again.token_ids == plain
    # Sampled rows too: a +100 bias leaves no other token a chance.
    sampled = greedy.model_copy(update={"temperature": 1.0, "seed": 3, "logit_bias": {forced_token: 100.0}})
    assert engine.generate_batch([PROMPTS[1]], sampled)[0].token_ids == [forced_token] * 8
    with pytest.raises(ValueError, match="logit_bias names token id"):
        engine.make_request(PROMPTS[1], greedy.model_copy(update={"logit_bias": {engine.runner.vocab_size: 1.0}}))


@torch.inference_mode()
def reference_logprobs(model, ids: list[int], tokens: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at each generated position, from one forward pass over
    prompt + reply (no KV cache): [len(tokens), vocab]."""
    logits = model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1 : len(ids) + len(tokens) - 1]
    return logits.float().log_softmax(-1)


def test_logprobs_are_the_models_own_distribution_at_each_generated_token(engine, tiny):
    # Greedy, sampled and biased requests batched together: each row's logprobs are those of a plain
    # forward pass over its prompt and reply, before its temperature and logit_bias; rows that did not
    # ask get none.
    model, tokenizer = tiny
    greedy = SamplingConfig(temperature=0, max_new_tokens=12, ignore_eos=True, logprobs=3)
    sampled = SamplingConfig(temperature=1.3, seed=7, max_new_tokens=12, ignore_eos=True, logprobs=5)
    biased = greedy.model_copy(update={"logit_bias": {5: 100.0}, "logprobs": 0})
    plain = greedy.model_copy(update={"logprobs": None})
    results = engine.generate_batch([PROMPTS[1], PROMPTS[3], PROMPTS[6], PROMPTS[1]], [greedy, sampled, biased, plain])
    for result, prompt, asked in zip(results, [PROMPTS[1], PROMPTS[3], PROMPTS[6]], [3, 5, 0]):
        assert len(result.logprobs) == len(result.token_ids) == 12
        assert sum(entry.chars for entry in result.logprobs) == len(result.text)  # each token's share of the text
        expected = reference_logprobs(model, tokenizer.encode(prompt, add_special_tokens=False), result.token_ids)
        for position, (entry, token) in enumerate(zip(result.logprobs, result.token_ids)):
            assert entry.token_id == token
            assert entry.logprob == pytest.approx(float(expected[position, token]), abs=1e-4)
            assert len(entry.top) == asked
            values, ids = expected[position].topk(asked) if asked else (torch.empty(0), torch.empty(0))
            assert [t for t, _ in entry.top] == ids.tolist()
            assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
    # Greedy: the chosen token is the most likely one; the bias forced a token the model finds unlikely.
    assert all(entry.top[0] == (entry.token_id, entry.logprob) for entry in results[0].logprobs)
    assert results[2].token_ids == [5] * 12 and all(entry.logprob < -1.0 for entry in results[2].logprobs)
    assert results[3].logprobs is None and results[3].token_ids == results[0].token_ids
    # A streamed request gets one entry per token, however the deltas were merged.
    async def streamed():
        deltas = [d async for d in engine.stream(engine.make_request(PROMPTS[1], greedy), coalesce=True)]
        return [entry for d in deltas for entry in d.logprobs or ()], [t for d in deltas for t in d.token_ids]

    entries, token_ids = asyncio.run(streamed())
    assert token_ids == results[0].token_ids and len(entries) == 12
    for entry, batched in zip(entries, results[0].logprobs):  # alone, not batched: equal up to float rounding
        assert entry.token_id == batched.token_id and entry.logprob == pytest.approx(batched.logprob, abs=1e-4)
        assert [t for t, _ in entry.top] == [t for t, _ in batched.top]


def test_prompt_logprobs_are_the_models_own_distribution_at_each_prompt_token(engine, tiny):
    # vLLM's prompt_logprobs: each prompt token's log-probability after the ones before it (the first
    # has none), from the logits of every position of a prefill run alone; requests beside it are
    # untouched, and the generated tokens are those of a request without it.
    model, tokenizer = tiny
    greedy = SamplingConfig(temperature=0, max_new_tokens=6, ignore_eos=True)
    asking = greedy.model_copy(update={"prompt_logprobs": 2, "logprobs": 1})
    results = engine.generate_batch([PROMPTS[1], PROMPTS[3], PROMPTS[0]], [greedy, asking, greedy])
    ids = engine.make_request(PROMPTS[3], greedy).prompt_token_ids
    with torch.inference_mode():
        expected = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    entries = results[1].prompt_logprobs
    assert [e.token_id for e in entries] == ids and entries[0].logprob is None and entries[0].top == ()
    for position, entry in enumerate(entries[1:], start=1):
        assert entry.logprob == pytest.approx(float(expected[position - 1, ids[position]]), abs=1e-4)
        assert [t for t, _ in entry.top] == expected[position - 1].topk(2).indices.tolist()
    # Each token's share of the prompt's text (a Chinese character spans several byte tokens).
    assert sum(e.chars for e in entries) == len(tokenizer.decode(ids, skip_special_tokens=True))
    alone = engine.generate_batch([PROMPTS[1], PROMPTS[3], PROMPTS[0]], greedy)
    assert [r.token_ids for r in results] == [r.token_ids for r in alone]
    assert results[0].prompt_logprobs is None and results[1].logprobs[0].token_id == results[1].token_ids[0]
    # A one-token prompt: its only token has no logprob.
    one = engine.generate_batch([[ids[0]]], asking)[0]
    assert [(e.token_id, e.logprob) for e in one.prompt_logprobs] == [(ids[0], None)]


YES_NO = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
          "additionalProperties": False}


def test_json_schema_constrains_the_reply_and_ends_it_when_complete(engine):
    # Structured output: the reply is compact JSON valid against the schema and ends with it; a
    # chat reply reasons first (r1-tiny's template opens <think>) and is constrained after </think>;
    # a row batched beside them is untouched.
    import json

    greedy = SamplingConfig(temperature=0, max_new_tokens=64)
    constrained = greedy.model_copy(update={"json_schema": YES_NO})
    chat = [{"role": "user", "content": "What is 2 + 3?"}]
    plain_before = engine.generate_batch([PROMPTS[6]], greedy)[0]
    completion, reply, plain = engine.generate_batch(["Is 12 + 7 = 19?", chat, PROMPTS[6]], [constrained, constrained, greedy])
    assert completion.finish_reason == "stop" and json.loads(completion.text) in ({"answer": "yes"}, {"answer": "no"})
    reasoning, _, answer = reply.text.partition("</think>")
    assert reasoning.strip() and reply.finish_reason == "stop"
    assert json.loads(answer) in ({"answer": "yes"}, {"answer": "no"})
    assert plain.token_ids == plain_before.token_ids
    # Sampled rows follow the schema too; the JSON's end is followed by end-of-sequence only.
    sampled = engine.generate_batch(["Is 12 + 7 = 19?"] * 4, [constrained.model_copy(update={"temperature": 1.5,
                                                                                             "seed": s}) for s in range(4)])
    assert all(json.loads(c.text)["answer"] in ("yes", "no") and c.finish_reason == "stop" for c in sampled)
    # OpenAI's json_object: any object; a +100 bias on "}" closes it at once.
    close = engine.tokenizer.convert_tokens_to_ids("}")
    empty = engine.generate_batch(["Is 12 + 7 = 19?"], greedy.model_copy(update={
        "json_schema": {"type": "object"}, "logit_bias": {close: 100.0}}))[0]
    assert empty.text == "{}" and empty.finish_reason == "stop"
    # An integer value: only digits can follow (the tiny model never stops writing them).
    number = engine.generate_batch(["Is 12 + 7 = 19?"], greedy.model_copy(update={"max_new_tokens": 24, "json_schema": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}}))[0]
    assert __import__("re").fullmatch(r'\{"n": -?\d*\}?', number.text), number.text
    # Properties come in the schema's order (a schema compiled with sorted keys wrote "a" first).
    ordered = {"type": "object", "properties": {"z": {"enum": [1]}, "a": {"enum": [2]}}, "required": ["z", "a"],
               "additionalProperties": False}
    in_order = engine.generate_batch(["Is 12 + 7 = 19?"], greedy.model_copy(update={"json_schema": ordered}))[0]
    assert in_order.text == '{"z": 1, "a": 2}', in_order.text


def test_guided_decoding_regex_choice_and_grammar_constrain_the_reply(engine):
    # vLLM's guided_regex / guided_choice / guided_grammar: the reply matches the regex, is one of the
    # choices (Chinese ones too: byte-level tokens), or is a sentence of the grammar; a chat reply
    # reasons first and is constrained after </think>; a row batched beside them is untouched.
    import re

    greedy = SamplingConfig(temperature=0, max_new_tokens=48)
    prompt = "Is 12 + 7 = 19?"
    plain = engine.generate_batch([prompt, PROMPTS[6]], greedy)
    regex = r"(yes|no), [0-9]{1,3}\."
    choices = ["正确", "错误", "not sure"]
    grammar = 'root ::= "The sum is " digit digit? "."\ndigit ::= [0-9]'
    assert not re.fullmatch(regex, plain[0].text) and plain[0].text not in choices  # what the constraints change
    chat = [{"role": "user", "content": "What is 2 + 3?"}]
    by_regex, by_choice, by_grammar, in_chat, beside = engine.generate_batch(
        [prompt, prompt, prompt, chat, PROMPTS[6]],
        [greedy.model_copy(update={"regex": regex}), greedy.model_copy(update={"choice": choices}),
         greedy.model_copy(update={"grammar": grammar}), greedy.model_copy(update={"choice": choices}), greedy])
    assert re.fullmatch(regex, by_regex.text) and by_regex.finish_reason == "stop", by_regex.text
    assert by_choice.text in choices and by_choice.finish_reason == "stop", by_choice.text
    assert re.fullmatch(r"The sum is [0-9]{1,2}\.", by_grammar.text) and by_grammar.finish_reason == "stop"
    reasoning, _, answer = in_chat.text.partition("</think>")
    assert reasoning.strip() and answer in choices and in_chat.finish_reason == "stop", in_chat.text
    assert beside.token_ids == plain[1].token_ids
    # Sampled rows follow them too, and the choices they take differ by seed (not one forced answer).
    sampled = engine.generate_batch([prompt] * 8, [greedy.model_copy(update={"choice": choices, "temperature": 2.0,
                                                                             "seed": seed}) for seed in range(8)])
    assert all(c.text in choices for c in sampled) and len({c.text for c in sampled}) > 1
    # A lone choice is the only reply there is.
    assert engine.generate_batch([prompt], greedy.model_copy(update={"choice": ["只有这个"]}))[0].text == "只有这个"


@pytest.mark.parametrize("kind, value, message", [
    ("regex", "[a-", "Unclosed"),
    ("regex", "(?<=a)b", "Lookbehind"),
    ("grammar", "root ::= missing", "not defined"),
])
def test_a_guide_that_cannot_be_compiled_names_its_field(engine, kind, value, message):
    from r1.engine import RequestError
    from r1.engine.structured import check_constraint

    with pytest.raises(RequestError, match=message) as error:
        engine.make_request("1", SamplingConfig(**{kind: value}))
    assert error.value.field == kind and ".cc:" not in str(error.value)
    with pytest.raises(RequestError, match=message) as error:  # the server's check, before any model work
        check_constraint(kind, value, f"guided_{kind}")
    assert error.value.field == f"guided_{kind}" and str(error.value).startswith(f"guided_{kind}: ")


def test_sampling_takes_one_constraint_at_most():
    with pytest.raises(ValueError, match="json_schema and choice each constrain the reply"):
        SamplingConfig(json_schema={"type": "object"}, choice=["a"])
    with pytest.raises(ValueError):
        SamplingConfig(choice=[])
    with pytest.raises(ValueError):
        SamplingConfig(choice=["a", ""])


@pytest.mark.parametrize("schema, message", [
    ({"type": "nonsense"}, "Unsupported type"),
    ({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}, "nowhere"),
])
def test_a_schema_that_cannot_be_compiled_names_response_format(engine, schema, message):
    from r1.engine import RequestError

    with pytest.raises(RequestError, match=message) as error:
        engine.make_request("1", SamplingConfig(json_schema=schema))
    assert error.value.field == "response_format" and ".cc:" not in str(error.value)  # xgrammar's source location cut
    with pytest.raises(RequestError) as error:
        engine.make_request("1", SamplingConfig(json_schema=YES_NO, min_tokens=2, max_new_tokens=8))
    assert error.value.field == "min_tokens"


def test_min_tokens_holds_back_end_of_sequence_and_stop_token_ids(engine, tiny):
    # vLLM's min_tokens: the ids that would end the reply cannot be chosen before it has that many
    # tokens; greedy output then equals a reference decoding that masks them as long.
    model, tokenizer = tiny
    eos = set(engine.make_request("x", SamplingConfig()).stop_token_ids)
    greedy = SamplingConfig(temperature=0, max_new_tokens=96)
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    plain = engine.generate_batch([prompt], greedy)[0]
    assert plain.finish_reason == "stop" and plain.token_ids[-1] in eos  # the case this test is about
    assert plain.stop_reason is None  # end-of-sequence has none (vLLM's stop_reason)
    ids = engine.make_request(prompt, greedy).prompt_token_ids
    k = len(plain.token_ids) + 4
    held = engine.generate_batch([prompt], greedy.model_copy(update={"min_tokens": k}))[0]
    expected = reference(model, ids, 96, held=(eos, k))
    first_end = next(i for i, token in enumerate(expected) if token in eos)
    assert first_end >= k and held.token_ids == expected[: first_end + 1] and held.finish_reason == "stop"
    # With a stop token id it holds that back too; batched beside a plain row, which is untouched.
    stop_id = plain.token_ids[1]
    both = engine.generate_batch([prompt, prompt], [greedy.model_copy(update={"min_tokens": 3, "stop_token_ids": [stop_id]}),
                                                    greedy])
    assert stop_id not in both[0].token_ids[:3] and both[1].token_ids == plain.token_ids
    expected = reference(model, ids, 96, held=(eos | {stop_id}, 3))
    end = next(i for i, token in enumerate(expected) if token in eos | {stop_id})
    assert both[0].token_ids == expected[: end + 1]
    with pytest.raises(ValueError, match="^min_tokens=97 is more than this reply may have"):
        engine.make_request(prompt, greedy.model_copy(update={"min_tokens": 97}))


def test_min_tokens_suspends_stop_strings_as_vllm_does(engine):
    # Before the reply has min_tokens tokens no stop string counts (vLLM checks them only after);
    # the reply then stops at the first one ending in the text decoded after that.
    greedy = SamplingConfig(temperature=0, max_new_tokens=32, ignore_eos=True)
    tokens = engine.generate_batch([PROMPTS[1]], greedy)[0].token_ids
    decode = lambda ids: engine.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    text = decode(tokens)
    stop = next(c for c in text if c.strip() and text.count(c) >= 2 and text.index(c) < len(decode(tokens[:16])))
    first = text.index(stop)
    early = engine.generate_batch([PROMPTS[1]], greedy.model_copy(update={"stop": [stop]}))[0]
    assert early.text == text[:first] and early.finish_reason == "stop"
    # Stop strings count from the k-th token on; the text of the k - 1 before it holds the first one.
    k = next(n for n in range(1, 32) if len(decode(tokens[:n])) > first) + 1
    held = engine.generate_batch([PROMPTS[1]], greedy.model_copy(update={"stop": [stop], "min_tokens": k}))[0]
    unchecked = len(decode(tokens[: k - 1]))
    later = text.find(stop, unchecked)
    if later < 0:
        assert held.text == text and held.finish_reason == "length"
    else:
        assert held.text == text[:later] and held.finish_reason == "stop"
    assert len(held.text) > first  # it went past the first one


def test_stop_token_ids_end_the_reply_and_keep_their_text(engine):
    greedy = SamplingConfig(temperature=0, max_new_tokens=24, ignore_eos=True)
    plain = engine.generate_batch([PROMPTS[1]], greedy)[0].token_ids
    at = next(i for i in range(2, 24) if plain[i] not in plain[:i])
    for ignore_eos in (True, False):  # they end the reply with ignore_eos too
        sampling = greedy.model_copy(update={"stop_token_ids": [plain[at]], "ignore_eos": ignore_eos})
        stopped = engine.generate_batch([PROMPTS[1]], sampling)[0]
        assert stopped.token_ids == plain[: at + 1] and stopped.finish_reason == "stop"
        assert stopped.text == engine.tokenizer.decode(plain[: at + 1], skip_special_tokens=True)
        assert stopped.stop_reason == plain[at]  # vLLM's stop_reason: the id that stopped it
    with pytest.raises(ValueError, match="^stop_token_ids names token id"):
        engine.make_request(PROMPTS[1], greedy.model_copy(update={"stop_token_ids": [engine.runner.vocab_size]}))


def test_a_prefix_message_is_continued_as_its_rendering_would_be(engine):
    # A final assistant message marked prefix (DeepSeek's prefix completion, vLLM's
    # continue_final_message) is rendered cut after its text: the reply is the greedy continuation
    # of that text, as a raw prompt of it gives. A prefix inside the reasoning goes on reasoning,
    # so structured output waits for </think>; a prefix of the answer is constrained at once.
    from r1.chat_template import render_chat

    greedy = SamplingConfig(temperature=0, max_new_tokens=24)
    question = {"role": "user", "content": "What is 2 + 3?"}
    for start in ("The answer is", "<think>\nFirst, 2"):
        chat = [question, {"role": "assistant", "content": start, "prefix": True}]
        text = render_chat(engine.tokenizer, chat)
        assert text.endswith("<｜Assistant｜>" + start)  # no end of turn, no generation prompt
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        continued, raw = engine.generate_batch([chat, ids], greedy)
        assert continued.token_ids == raw.token_ids and continued.text == raw.text
    plain = engine.generate_batch([[question]], greedy)[0]
    assert continued.token_ids != plain.token_ids  # the prefix changed the reply
    choices = SamplingConfig(temperature=0, max_new_tokens=64, choice=["5", "6"])
    answer, reasoning = engine.generate_batch(
        [[question, {"role": "assistant", "content": "The answer is ", "prefix": True}],
         [question, {"role": "assistant", "content": "<think>\nFirst, 2", "prefix": True}]], choices)
    assert answer.text in ("5", "6")
    thought, closed, rest = reasoning.text.partition("</think>")
    assert closed and thought.strip() and rest in ("5", "6"), reasoning.text


def test_thinking_token_budget_closes_the_reasoning_and_lets_the_answer_follow(engine):
    # vLLM's thinking_token_budget: at most that many reasoning tokens, then </think> is forced and
    # the model answers; the reasoning up to there is the unbudgeted one's. 0 answers at once; a
    # budget the reasoning stays within changes nothing; with structured output the answer after
    # the forced </think> is constrained as usual.
    close = engine.tokenizer.convert_tokens_to_ids("</think>")
    chat = [{"role": "user", "content": "Tom has 5 pens. He buys 17 more. How many pens does he have now?"}]
    greedy = SamplingConfig(temperature=0, max_new_tokens=160)
    plain = engine.generate_batch([chat], greedy)[0]
    thought = plain.token_ids.index(close)
    assert thought > 8  # the case this test is about: a reasoning longer than the budgets below
    budgets = [0, 3, 8, thought, thought + 20]
    replies = engine.generate_batch([chat] * len(budgets), [greedy.model_copy(update={"thinking_token_budget": b})
                                                            for b in budgets])
    for budget, reply in zip(budgets, replies):
        closed_at = reply.token_ids.index(close)
        assert closed_at == min(budget, thought) and reply.token_ids[:closed_at] == plain.token_ids[:closed_at]
        assert len(reply.token_ids) > closed_at + 1  # an answer follows
    assert replies[-1].token_ids == plain.token_ids and replies[-2].token_ids == plain.token_ids
    sampled = engine.generate_batch([chat] * 4, [greedy.model_copy(update={"thinking_token_budget": 5, "temperature": 1.2,
                                                                           "seed": seed}) for seed in range(4)])
    assert all(close in c.token_ids[:6] for c in sampled)
    answered = engine.generate_batch([chat], greedy.model_copy(update={"thinking_token_budget": 4,
                                                                       "choice": ["22", "twenty-two"]}))[0]
    assert answered.token_ids.index(close) == 4 and answered.text.partition("</think>")[2] in ("22", "twenty-two")
    # A completion prompt does not start inside the reasoning: the budget waits for a <think>.
    completion = engine.generate_batch(["12 + 7 ="] * 2, [greedy.model_copy(update={"max_new_tokens": 12}),
                                                          greedy.model_copy(update={"max_new_tokens": 12,
                                                                                    "thinking_token_budget": 0})])
    assert completion[0].token_ids == completion[1].token_ids


def test_priority_scheduling_gives_free_slots_to_the_lowest_priority_first(tiny):
    # engine.scheduling_policy: priority (vLLM's): with one slot, queued requests are admitted by
    # priority (lower first), in arrival order among equals; fcfs refuses a priority naming it.
    import threading

    model, tokenizer = tiny
    engine = TransformersEngine(model, tokenizer, EngineConfig(max_num_seqs=1, scheduling_policy="priority"))
    try:
        finished, done = [], threading.Event()
        arrivals = [("b", 5), ("c", 0), ("d", -1), ("e", 0), ("f", 5)]

        def emit(delta):
            if delta.finish_reason is not None:
                finished.append(delta.request_id)
                if len(finished) == len(arrivals):
                    done.set()

        for name, priority in arrivals:  # all queued before the decode thread takes the first
            sampling = SamplingConfig(temperature=0, max_new_tokens=2, priority=priority)
            engine.submit(engine.make_request(PROMPTS[0], sampling, name), emit)
        engine.start()
        assert done.wait(60)
        assert finished == ["d", "c", "e", "b", "f"]
    finally:
        engine.shutdown()
    fcfs = TransformersEngine(model, tokenizer, EngineConfig(max_num_seqs=1))
    try:
        with pytest.raises(ValueError, match="^priority needs priority scheduling") as refused:
            fcfs.make_request(PROMPTS[0], SamplingConfig(priority=1))
        assert refused.value.field == "priority"
    finally:
        fcfs.shutdown()


def test_allowed_token_ids_restrict_the_reply_to_them(engine):
    # vLLM's allowed_token_ids: every token of the reply is one of them, greedy and sampled; a row
    # beside them is untouched; ids outside the vocabulary are refused naming the field.
    greedy = SamplingConfig(temperature=0, max_new_tokens=12, ignore_eos=True)
    plain = engine.generate_batch([PROMPTS[1]], greedy)[0]
    digits = [engine.tokenizer.convert_tokens_to_ids(d) for d in "0123456789"]
    assert not set(plain.token_ids) <= set(digits)  # what the restriction changes
    only = greedy.model_copy(update={"allowed_token_ids": digits})
    restricted, beside, *sampled = engine.generate_batch(
        [PROMPTS[1], PROMPTS[1]] + [PROMPTS[1]] * 3,
        [only, greedy] + [only.model_copy(update={"temperature": 1.5, "seed": seed}) for seed in range(3)])
    assert set(restricted.token_ids) <= set(digits) and restricted.text.isdigit() and len(restricted.token_ids) == 12
    assert all(set(c.token_ids) <= set(digits) for c in sampled) and beside.token_ids == plain.token_ids
    with pytest.raises(ValueError, match="^allowed_token_ids names token id") as error:
        engine.make_request("1", greedy.model_copy(update={"allowed_token_ids": [engine.runner.vocab_size]}))
    assert error.value.field == "allowed_token_ids"
    with pytest.raises(ValueError, match="^allowed_token_ids cannot be combined with structured output"):
        engine.make_request("1", greedy.model_copy(update={"allowed_token_ids": digits, "choice": ["1"]}))


@pytest.mark.parametrize("word", ["answer", "12"])  # one token after a space; two digit tokens
def test_bad_words_are_never_written(engine, word):
    # vLLM's bad_words: the word's last token cannot follow its other tokens, so the reply is the
    # plain one up to where the word would end, and then goes another way without the word's tokens.
    from r1.engine.engine import bad_words_token_ids

    greedy = SamplingConfig(temperature=0, max_new_tokens=40, ignore_eos=True)
    plain = engine.generate_batch([PROMPTS[1]], greedy)[0]
    assert word in plain.text
    sequences = bad_words_token_ids(engine.tokenizer, [word])
    assert sequences and all(engine.tokenizer.decode(list(ids)).strip() == word for ids in sequences)

    def first_end(tokens: list[int]) -> int | None:
        ends = [at + len(ids) for ids in sequences for at in range(len(tokens)) if tuple(tokens[at:at + len(ids)]) == ids]
        return min(ends, default=None)

    end = first_end(plain.token_ids)
    assert end is not None  # the word is written as one of its banned sequences
    banned = engine.generate_batch([PROMPTS[1]], greedy.model_copy(update={"bad_words": [word]}))[0]
    assert first_end(banned.token_ids) is None
    assert banned.token_ids[: end - 1] == plain.token_ids[: end - 1] and banned.token_ids[end - 1] != plain.token_ids[end - 1]


def test_min_p_keeps_the_tokens_near_the_most_likely_one():
    from r1.engine.sampling import filter_top_k_top_p

    logits = torch.tensor([[2.0, 1.0, 0.0, -3.0], [0.0, 0.0, -1.0, -9.0]])
    probs = logits.softmax(-1)
    kept = filter_top_k_top_p(logits, 0, 1.0, min_p=0.3).isfinite()
    assert torch.equal(kept, probs >= 0.3 * probs.amax(-1, keepdim=True))
    assert kept.tolist() == [[True, True, False, False], [True, True, True, False]]
    assert torch.equal(filter_top_k_top_p(logits, 0, 1.0, min_p=0.0), logits)


def test_min_p_one_samples_the_most_likely_token(engine):
    # Only the most likely token is within min_p = 1 of itself: seeded sampling turns greedy.
    greedy = SamplingConfig(temperature=0, max_new_tokens=16, ignore_eos=True)
    sampled = SamplingConfig(temperature=1.5, seed=5, max_new_tokens=16, ignore_eos=True)
    results = engine.generate_batch([PROMPTS[6]] * 3, [greedy, sampled.model_copy(update={"min_p": 1.0}), sampled])
    assert results[1].token_ids == results[0].token_ids != results[2].token_ids


def test_frequency_and_presence_penalty_arithmetic():
    from r1.engine.sampling import apply_frequency_presence_penalties

    logits = torch.zeros(5)
    out = apply_frequency_presence_penalties(logits, {1: 3, 4: 1}, frequency=0.5, presence=0.25)
    assert out.tolist() == [0.0, -1.75, 0.0, 0.0, -0.75] and logits.tolist() == [0.0] * 5  # a copy
    assert apply_frequency_presence_penalties(logits, {}, 0.5, 0.25) is logits


def test_cancel_frees_the_slot(engine):
    aborted = engine.stats()["aborted"]

    async def main() -> None:
        stream = engine.stream(PROMPTS[0], SamplingConfig(temperature=0, max_new_tokens=200, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()
        deadline = asyncio.get_running_loop().time() + 30
        while engine.stats()["running"] and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert engine.stats() == {"running": 0, "waiting": 0, "aborted": aborted + 1}  # aborted, not run to its end


def test_chat_messages_use_the_template_with_prefilled_think(engine):
    request = engine.make_request([{"role": "user", "content": "2 + 2?"}], SamplingConfig())
    text = engine.tokenizer.decode(request.prompt_token_ids)
    assert text.endswith("<｜Assistant｜><think>\n")


@pytest.mark.parametrize(
    "prompt_tokens, requested, context, expected",
    [
        (10, None, 1024, 1014),  # default: what the context allows
        (10, None, 100_000, 4096),  # default capped at 4096 new tokens
        (10, 100, 1024, 100),  # explicit and within the context
    ],
)
def test_max_new_tokens_resolution(prompt_tokens, requested, context, expected):
    assert resolve_max_new_tokens(prompt_tokens, requested, context) == expected


@pytest.mark.parametrize(
    "prompt_tokens, requested, context, message, field",
    [
        (10, 2000, 1024, "use max_new_tokens <= 1014", "max_new_tokens"),  # prompt + max_new_tokens beyond the context
        (1024, None, 1024, "shorten the prompt", None),  # prompt alone fills the context: the prompt's fault
    ],
)
def test_max_new_tokens_beyond_context_is_an_error(prompt_tokens, requested, context, message, field):
    from r1.engine import RequestError

    with pytest.raises(RequestError, match=message) as error:
        resolve_max_new_tokens(prompt_tokens, requested, context)
    assert (error.value.field, error.value.code) == (field, "context_length_exceeded")


def test_refused_requests_name_the_field_at_fault(engine):
    # The LLM server answers these with a 400 naming the field; it reads the field from the error.
    from r1.engine import RequestError

    greedy = SamplingConfig(temperature=0, max_new_tokens=4)
    vocab = engine.runner.vocab_size
    for prompt, sampling, field in [
        ("", greedy, None),
        ([vocab], greedy, None),
        ("1", greedy.model_copy(update={"logit_bias": {vocab: 1.0}}), "logit_bias"),
        ("1", greedy.model_copy(update={"stop_token_ids": [vocab]}), "stop_token_ids"),
        ("1", greedy.model_copy(update={"min_tokens": 5}), "min_tokens"),
    ]:
        with pytest.raises(RequestError) as error:
            engine.make_request(prompt, sampling)
        assert (error.value.field, error.value.code) == (field, "invalid_value"), error.value


def test_full_queue_refuses_fast(tiny):
    model, tokenizer = tiny
    engine = TransformersEngine(model, tokenizer, EngineConfig(max_num_seqs=1, max_queued_requests=1))
    sampling = SamplingConfig(temperature=0, max_new_tokens=4)
    engine.submit(engine.make_request("a", sampling), lambda d: None)
    engine.submit(engine.make_request("b", sampling), lambda d: None)
    with pytest.raises(EngineOverloaded):
        engine.submit(engine.make_request("c", sampling), lambda d: None)
    engine.shutdown()


def test_coalesced_stream_merges_what_piled_up_and_loses_nothing(engine):
    sampling = SamplingConfig(temperature=0, max_new_tokens=24, ignore_eos=True)
    expected = engine.generate_batch(["12 + 7 ="], sampling)[0]

    async def slow_consumer():
        deltas = []
        async for delta in engine.stream("12 + 7 =", sampling, coalesce=True):
            deltas.append(delta)
            await asyncio.sleep(0.05)  # a busy consumer: several tokens arrive meanwhile
        return deltas

    deltas = asyncio.run(slow_consumer())
    assert "".join(d.text for d in deltas) == expected.text
    assert [t for d in deltas for t in d.token_ids] == expected.token_ids
    assert len(deltas) < 24 and any(len(d.token_ids) > 1 for d in deltas)
    assert deltas[-1].finish_reason == "length" and deltas[-1].usage.completion_tokens == 24


def test_stream_batcher_merges_deltas_within_the_interval_and_never_aborts_the_stream():
    from r1.engine.batching import StreamBatcher
    from r1.engine.types import Delta

    closed = []

    async def deltas():
        try:
            for i in range(6):
                await asyncio.sleep(0.01 if i != 3 else 0.3)  # a pause longer than the window before token 3
                yield Delta("r", [i], str(i), finish_reason="length" if i == 5 else None)
        finally:
            closed.append(True)

    async def main():
        stream = deltas()
        batcher = StreamBatcher(stream, interval_s=0.1)
        batches = []
        while not batches or batches[-1].finish_reason is None:
            batches.append(await batcher.next())
        batcher.close()
        await stream.aclose()
        return batches

    batches = asyncio.run(main())
    # Tokens 0-2 arrive within one window; the window closes during the pause without ending the
    # stream; 3-5 form the next batch, which ends at the finish reason.
    assert [d.token_ids for d in batches] == [[0, 1, 2], [3, 4, 5]]
    assert "".join(d.text for d in batches) == "012345" and batches[-1].finish_reason == "length"
    assert closed == [True]


@pytest.mark.parametrize("interval_ms, active, per_s, expected_s", [
    (20, 1, 400, 0.020),    # a lone stream keeps the configured window
    (20, 8, 400, 0.020),    # 8 streams x 50 messages/s fit the budget: unchanged
    (20, 16, 400, 0.040),   # 16 streams share 400 messages/s: 25 each, a 40 ms window
    (20, 64, 400, 0.160),   # the window grows with the load, not with the token rate
    (50, 16, 400, 0.050),   # never shorter than the configured window
    (20, 64, None, 0.020),  # no budget: the configured window whatever the load
    (0, 0, 400, 0.0),       # no window and no streams: tokens go as they come
])
def test_stream_window_widens_with_the_number_of_streams(interval_ms, active, per_s, expected_s):
    from r1.engine.batching import stream_window_s

    assert stream_window_s(interval_ms, active, per_s) == pytest.approx(expected_s)


def test_stream_batcher_reads_a_window_function_for_each_message():
    from r1.engine.batching import StreamBatcher
    from r1.engine.types import Delta

    windows = iter([0.0, 0.5])  # first message: no window; second: a window longer than the stream

    async def deltas():
        for i in range(4):
            await asyncio.sleep(0.02)
            yield Delta("r", [i], str(i), finish_reason="length" if i == 3 else None)

    async def main():
        batcher = StreamBatcher(deltas(), lambda: next(windows))
        return [await batcher.next(), await batcher.next()]

    first, rest = asyncio.run(asyncio.wait_for(main(), timeout=30))
    assert first.token_ids == [0] and rest.token_ids == [1, 2, 3] and rest.finish_reason == "length"


def test_a_request_that_ends_at_its_first_token_while_others_decode(engine):
    # It finishes during its prefill step; the decode step that follows must not still count it.
    long = SamplingConfig(temperature=0, max_new_tokens=30, ignore_eos=True)
    one_token = SamplingConfig(temperature=0, max_new_tokens=1, ignore_eos=True)
    finals, long_tokens = {}, []

    async def run(name, prompt, sampling, after=0):
        while len(long_tokens) < after:  # the short request arrives once the long one is decoding
            await asyncio.sleep(0.001)
        async for delta in engine.stream(prompt, sampling):
            if name == "long":
                long_tokens.extend(delta.token_ids)
            if delta.finish_reason is not None:
                finals[name] = (delta.finish_reason, delta.error, delta.usage.completion_tokens)

    async def main():
        await asyncio.wait_for(asyncio.gather(
            run("long", PROMPTS[0], long), run("short", PROMPTS[1], one_token, after=3)), timeout=60)

    asyncio.run(main())
    assert finals["short"] == ("length", None, 1)
    assert finals["long"] == ("length", None, 30)


# -- failures stay with the request that caused them ------------------------------------------------

async def _last_delta(engine, prompt, sampling, request_id=None):
    last = None
    async for delta in engine.stream(prompt, sampling, request_id=request_id):
        last = delta
    return last


@pytest.fixture
def fresh_engine(tiny):
    """An engine of its own (these tests break it, or shut it down), shut down afterwards."""
    model, tokenizer = tiny
    engine = TransformersEngine(model, tokenizer, EngineConfig())
    yield engine
    engine.shutdown()


def test_a_failed_prefill_ends_every_request_it_admitted(fresh_engine, monkeypatch):
    engine = fresh_engine
    add = engine.runner.add

    def failing_add(ids, prompts):  # stands in for an out-of-memory error in one prefill
        if any(len(p) > 500 for p in prompts):
            raise RuntimeError("simulated out of memory")
        return add(ids, prompts)

    monkeypatch.setattr(engine.runner, "add", failing_add)
    sampling = SamplingConfig(temperature=0, max_new_tokens=5)

    async def both():
        return await asyncio.wait_for(asyncio.gather(
            _last_delta(engine, "1+1=", sampling), _last_delta(engine, [5] * 600, sampling)), timeout=60)

    finals = asyncio.run(both())  # the two are admitted in one step: neither may hang
    assert [(d.finish_reason, "simulated out of memory" in d.error) for d in finals] == [("abort", True)] * 2
    assert asyncio.run(_last_delta(engine, "1+1=", sampling)).finish_reason == "length"  # the engine goes on


def test_a_consumer_whose_loop_is_gone_loses_only_its_own_request(fresh_engine):
    import threading

    engine = fresh_engine
    long_sampling = SamplingConfig(temperature=0, max_new_tokens=120, ignore_eos=True)
    result = {}
    runner = threading.Thread(target=lambda: result.update(last=asyncio.run(_last_delta(engine, "1+1=", long_sampling))))

    async def take_two():  # leaves the stream, and then its loop closes, while the engine still emits
        count = 0
        async for _ in engine.stream("hello", SamplingConfig(temperature=0, max_new_tokens=100, ignore_eos=True)):
            count += 1
            if count == 2:
                break

    runner.start()
    for _ in range(5):
        asyncio.run(take_two())
    runner.join(timeout=120)
    assert (result["last"].finish_reason, result["last"].error) == ("length", None)
    assert result["last"].usage.completion_tokens == 120


def test_generate_batch_and_a_stream_at_once(fresh_engine):
    import threading

    engine = fresh_engine
    sampling = SamplingConfig(temperature=0, max_new_tokens=40, ignore_eos=True)
    prompts = ["1+1=", "hello there", "Mia has 23 apples."]
    solo = [c.token_ids for c in engine.generate_batch(prompts, sampling)]
    solo_stream = engine.generate_batch(["x y z"], sampling)[0].token_ids
    result = {}
    batch = threading.Thread(target=lambda: result.update(batch=engine.generate_batch(prompts, sampling)))
    batch.start()  # steps inline in its thread ...
    streamed = []

    async def consume():  # ... while the stream starts the background thread
        async for delta in engine.stream("x y z", sampling):
            streamed.extend(delta.token_ids)

    asyncio.run(asyncio.wait_for(consume(), timeout=120))
    batch.join(timeout=120)
    assert [c.token_ids for c in result["batch"]] == solo and streamed == solo_stream


def test_shutdown_ends_in_flight_streams(fresh_engine):
    engine = fresh_engine

    async def main():
        stream = asyncio.ensure_future(_last_delta(engine, "1+1=", SamplingConfig(temperature=0, max_new_tokens=500,
                                                                                    ignore_eos=True)))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(engine.shutdown)
        return await asyncio.wait_for(stream, timeout=30)

    last = asyncio.run(main())
    assert last.finish_reason == "abort" and "shut down" in last.error
    assert engine.stats() == {"running": 0, "waiting": 0, "aborted": 1}


def test_closed_loops_do_not_stay_alive(engine):
    import gc

    async def two_tokens():
        async for _ in engine.stream("hi", SamplingConfig(temperature=0, max_new_tokens=2)):
            pass

    for _ in range(10):
        asyncio.run(two_tokens())
    gc.collect()
    assert len(engine._mailboxes._by_loop) <= 1


def test_a_deferred_mailbox_delivers_a_batch_of_deltas_in_one_drain_when_woken():
    import threading

    from r1.engine.engine import Inbox, Mailbox
    from r1.engine.types import Delta

    async def scenario():
        loop = asyncio.get_running_loop()
        mailbox = Mailbox(loop, deferred=True)
        drains = []
        drain = mailbox._drain
        mailbox._drain = lambda: (drains.append(len(mailbox._items)), drain())[1]
        inboxes = [Inbox(), Inbox()]
        producer = threading.Thread(target=lambda: [mailbox.post(inboxes[i % 2], Delta("r", [i], str(i)))
                                                    for i in range(6)])
        producer.start()
        producer.join(timeout=30)
        await asyncio.sleep(0.05)
        assert drains == [] and not inboxes[0].deltas  # posted, not delivered: nobody woke the loop
        threading.Thread(target=mailbox.wake).start()
        for _ in range(100):
            if drains:
                break
            await asyncio.sleep(0.01)
        assert drains == [6]
        assert [d.token_ids[0] for d in inboxes[0].deltas] == [0, 2, 4]
        assert [d.token_ids[0] for d in inboxes[1].deltas] == [1, 3, 5]
        mailbox.wake()  # nothing left: no drain
        await asyncio.sleep(0.05)
        assert drains == [6]
        return mailbox

    mailbox = asyncio.run(scenario())
    with pytest.raises(RuntimeError, match="gone"):  # its loop closed: the scheduler aborts the request
        mailbox.post(Inbox(), Delta("r", [1], "x"))


def test_streams_wake_their_loop_once_per_batch_of_tokens(fresh_engine):
    # 16 streams decoding together: each batch of tokens (a prefill's first tokens, a decode
    # step's tokens) reaches the consumers' loop in one drain, where waking the loop on the first
    # delta drained about ten times a step.
    from r1.engine.engine import Mailbox

    engine = fresh_engine
    drains, forwards = [], []
    drain, add, step = Mailbox._drain, engine.runner.add, engine.runner.step
    engine.runner.add = lambda *args: (forwards.append("prefill"), add(*args))[1]
    engine.runner.step = lambda *args: (forwards.append("decode"), step(*args))[1]
    sampling = SamplingConfig(temperature=0, max_new_tokens=24, ignore_eos=True)

    async def one(prompt):
        return [d async for d in engine.stream(prompt, sampling)]

    async def run():
        return await asyncio.gather(*(one(p) for p in PROMPTS + PROMPTS[:7]))

    try:
        Mailbox._drain = lambda self: (drains.append(len(self._items)), drain(self))[1]
        streams = asyncio.run(run())
    finally:
        Mailbox._drain = drain
    assert all(sum(len(d.token_ids) for d in deltas) == 24 for deltas in streams)
    assert sum(drains) == sum(len(deltas) for deltas in streams)  # every delta, each delivered once
    assert len(drains) <= len(forwards)  # never more than one wake-up per step (not one per delta)
    # A step's 16 deltas travel together: at least one drain carries them all. (More than 16 when
    # the loop was slow: a drain that ran late takes the steps decoded meanwhile, whole or in part;
    # 208, thirteen steps, in a clean-clone run on two busy cores.)
    assert max(drains) >= 16


def test_the_decode_thread_yields_once_on_waking_so_a_burst_is_admitted_together(fresh_engine, monkeypatch):
    # The first request of a burst wakes the decode thread while the thread submitting the burst
    # still holds the GIL: the decode thread yields it once before stepping, so the rest of the burst
    # joins the first step (in 20 fresh engines starting 16 streams at once, 17 admitted all 16 at
    # the first step with the yield, 1 without it).
    import r1.engine.engine as engine_module

    engine = fresh_engine
    events = []
    real_sleep = time.sleep
    monkeypatch.setattr(engine_module, "time", type("Clock", (), {
        "sleep": staticmethod(lambda seconds: (events.append(("sleep", seconds)), real_sleep(seconds))[1])}))
    add = engine.runner.add
    engine.runner.add = lambda ids, prompts: (events.append(("prefill", len(ids))), add(ids, prompts))[1]
    completions = engine.generate_batch(["1+1="], SamplingConfig(temperature=0, max_new_tokens=2))  # inline: no yield
    assert completions[0].usage.completion_tokens == 2 and events == [("prefill", 1)]
    events.clear()

    async def burst():
        sampling = SamplingConfig(temperature=0, max_new_tokens=3, ignore_eos=True)

        async def one(prompt):
            return [d async for d in engine.stream(prompt, sampling)]

        return await asyncio.gather(*(one(p) for p in PROMPTS))

    for _ in range(3):
        assert all(deltas[-1].finish_reason == "length" for deltas in asyncio.run(burst()))
        deadline = time.monotonic() + 30
        while engine.scheduler.has_work() and time.monotonic() < deadline:  # idle again before the next burst
            real_sleep(0.01)
        real_sleep(0.05)
    wakes = [i for i, event in enumerate(events) if event == ("sleep", 0)]
    # One yield per burst (the first one's also starts the thread), none per step, each right before
    # the burst's first prefill.
    assert len(wakes) == 3 and wakes[0] == 0, events
    assert all(events[i + 1][0] == "prefill" for i in wakes), events
    assert sum(size for kind, size in events if kind == "prefill") == 3 * len(PROMPTS)


def test_the_detokenizer_decodes_through_the_rust_backend_as_the_tokenizer_would(tiny):
    # The fast path (the tokenizer's Rust backend) must hand out exactly the pieces the tokenizer's
    # own decode gives: multi-byte characters split across tokens, special tokens skipped, stop strings.
    from r1.engine.detok import IncrementalDetokenizer

    _, tokenizer = tiny
    texts = ["忘记密码怎么办？我的验证码是 123456。", "Mia has 23 apples 🍎🍏 and 7 pears.",
             "<think>12 + 7 = 19</think>\nThe answer is 19."]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=True) + [tokenizer.eos_token_id] + tokenizer.encode(" 下一句")
        for stop in ([], ["19"], ["验证码"]):
            fast, plain = IncrementalDetokenizer(tokenizer, stop), IncrementalDetokenizer(tokenizer, stop)
            assert fast._backend_decode is not None
            plain._backend_decode = None
            pieces = [([d.add(t) for t in ids] + [d.finish()]) for d in (fast, plain)]
            assert pieces[0] == pieces[1], (text, stop)
            if not stop:
                assert "".join(pieces[0]) == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_tiny_temperature_decodes_greedily(engine):
    greedy = engine.generate_batch(["1+1="], SamplingConfig(temperature=0, max_new_tokens=6))[0].token_ids
    tiny_t = engine.generate_batch(["1+1="], SamplingConfig(temperature=1e-39, max_new_tokens=6, seed=0))[0].token_ids
    assert tiny_t == greedy  # logits / 1e-39 overflowed to NaN probabilities and drew the last token id


def test_request_ids_must_be_unique(engine):
    sampling = SamplingConfig(temperature=0, max_new_tokens=30, ignore_eos=True)

    async def both():
        first = asyncio.ensure_future(_last_delta(engine, "1+1=", sampling, request_id="dup"))
        await asyncio.sleep(0)
        with pytest.raises(ValueError, match="already in the engine"):
            await _last_delta(engine, "2+2=", sampling, request_id="dup")
        return await first

    assert asyncio.run(asyncio.wait_for(both(), timeout=60)).finish_reason == "length"


def _count_step_sizes(engine: TransformersEngine) -> list[int]:
    """Record the batch size of every decode step the engine's runner takes from now on."""
    sizes: list[int] = []
    step = engine.runner.step

    def counted(seq_ids, token_ids):
        sizes.append(len(seq_ids))
        return step(seq_ids, token_ids)

    engine.runner.step = counted
    return sizes


def test_warmup_decodes_once_at_every_batch_size_then_leaves_the_engine_idle(tiny):
    model, tokenizer = tiny
    engine = TransformersEngine(model, tokenizer, EngineConfig(max_num_seqs=6))
    try:
        sizes = _count_step_sizes(engine)
        engine.warmup(all_batch_sizes=True)
        assert sizes == [6, 5, 4, 3, 2, 1]
        assert engine.stats() == {"running": 0, "waiting": 0, "aborted": 0}
        sizes.clear()
        engine.warmup()  # on CPU the default is one short request
        assert sizes == [1]
        # The engine serves as before.
        completion = engine.generate_batch(["1 + 1 ="], SamplingConfig(temperature=0, max_new_tokens=3, ignore_eos=True))[0]
        assert len(completion.token_ids) == 3
    finally:
        engine.shutdown()


def test_warmup_fits_a_short_context(tiny):
    # More slots than the context has room for tokens: warm-up requests stop at the context's end.
    model, tokenizer = tiny
    engine = TransformersEngine(model, tokenizer, EngineConfig(max_num_seqs=12), context_tokens=6)
    try:
        sizes = _count_step_sizes(engine)
        engine.warmup(all_batch_sizes=True)
        assert sizes[0] == 12 and sizes[-1] > 0
        assert engine.stats() == {"running": 0, "waiting": 0, "aborted": 0}
    finally:
        engine.shutdown()


def test_a_full_batch_warmup_decodes_padded_prompts_and_fits_a_short_context(tiny):
    model, tokenizer = tiny
    for context, longest in ((None, 96), (6, 2)):
        engine = TransformersEngine(model, tokenizer, EngineConfig(max_num_seqs=4), context_tokens=context)
        try:
            sizes = _count_step_sizes(engine)
            engine.warmup(all_batch_sizes=True, full_batch=True)
            # The sweep (4, 3, 2, 1), then the full batch of four rows for `longest` new tokens.
            assert sizes[:4] == [4, 3, 2, 1] and sizes[4:] == [4] * (longest - 1), (context, sizes)
            assert engine.stats() == {"running": 0, "waiting": 0, "aborted": 0}
        finally:
            engine.shutdown()


def test_engine_attention_runs_without_cudnn_on_cuda_and_leaves_the_setting_as_it_was():
    from r1.engine.runner import attention_kernels

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with attention_kernels(torch.device("cuda", 0)):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with attention_kernels(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_a_runner_that_cannot_remove_finished_rows_does_not_keep_them_running(fresh_engine, monkeypatch):
    # A pipeline whose model shard died fails every call, `remove` included. The finished requests
    # used to stay in `running`: each later step failed on them again (a busy loop) and new
    # requests waited for slots that never freed.
    engine = fresh_engine
    monkeypatch.setattr(engine.runner, "step", lambda ids, tokens: (_ for _ in ()).throw(RuntimeError("shard died")))

    def dead_remove(ids):
        raise RuntimeError("shard died")

    monkeypatch.setattr(engine.runner, "remove", dead_remove)
    sampling = SamplingConfig(temperature=0, max_new_tokens=5)
    first = asyncio.run(asyncio.wait_for(_last_delta(engine, "1+1=", sampling), timeout=60))
    assert first.finish_reason == "abort" and "shard died" in first.error
    steps = engine.scheduler.num_steps
    time.sleep(0.5)
    assert engine.stats() == {"running": 0, "waiting": 0, "aborted": 1}
    assert engine.scheduler.num_steps == steps  # idle: no step is retried on the dead rows
    # A new request is not left waiting: it fails at once too.
    second = asyncio.run(asyncio.wait_for(_last_delta(engine, "2+2=", sampling), timeout=60))
    assert second.finish_reason == "abort"


def test_engine_health_reports_a_pipeline_stage_that_cannot_answer(tiny):
    from r1.engine.pipeline import ModelStage, PipelineRunner

    model, tokenizer = tiny
    stages = [ModelStage.from_full_model(model, index, 2, tokenizer.pad_token_id) for index in range(2)]

    class Unreachable:  # a remote stage whose actor is gone: its calls fail
        def __init__(self, stage):
            self.stage = stage

        def __getattr__(self, name):
            return getattr(self.stage, name)

        def ping(self):
            raise RuntimeError("the actor died")

    runner = PipelineRunner([stages[0], Unreachable(stages[1])], model.config.vocab_size)
    engine = TransformersEngine(None, tokenizer, EngineConfig(), runner=runner, context_tokens=256)
    engine.start()
    try:
        with pytest.raises(RuntimeError, match="the actor died"):
            engine.check_health()
        PipelineRunner(stages, model.config.vocab_size).check_health()  # local stages always answer
    finally:
        engine.shutdown()


def test_a_pipeline_on_gpus_gets_the_gpu_warmup(tiny):
    # The engine of a sharded model holds no model and sees only the CPU; its stages' GPUs decide.
    from r1.engine.pipeline import ModelStage, PipelineRunner

    model, tokenizer = tiny
    stages = [ModelStage.from_full_model(model, index, 2, tokenizer.pad_token_id) for index in range(2)]
    for on_gpu in (False, True):
        runner = PipelineRunner(stages, model.config.vocab_size, on_gpu=on_gpu)
        engine = TransformersEngine(None, tokenizer, EngineConfig(max_num_seqs=3), runner=runner, context_tokens=8)
        try:
            sizes = _count_step_sizes(engine)
            engine.warmup()
            # On GPUs: the sweep (3, 2, 1), then the padded full batch (an 8-token context: prompts of
            # up to 4 tokens, 3 new tokens, i.e. 2 decode steps after the prefill).
            assert sizes == ([3, 2, 1, 3, 3] if on_gpu else [1]), (on_gpu, sizes)
        finally:
            engine.shutdown()
