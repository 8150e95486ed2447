"""Pipeline stages: splitting r1-tiny by decoder layers gives the same greedy tokens."""

from __future__ import annotations

import pytest

from r1.config import SamplingConfig, ServeConfig
from r1.engine import TransformersEngine
from r1.engine.pipeline import ModelStage, PipelineRunner, split_layers

PROMPTS = ["Mia has 23 apples.", "1", "忘记密码怎么办？", "def add(a, b):"]


@pytest.mark.parametrize(
    "num_layers, num_stages, expected",
    [
        (4, 1, [range(0, 4)]),  # one stage holds everything
        (4, 2, [range(0, 2), range(2, 4)]),  # even split
        (5, 2, [range(0, 3), range(3, 5)]),  # the remainder goes to earlier stages
        (4, 4, [range(i, i + 1) for i in range(4)]),  # one layer per stage is the limit
    ],
)
def test_split_layers(num_layers, num_stages, expected):
    assert split_layers(num_layers, num_stages) == expected


def test_more_stages_than_layers_is_a_config_error():
    with pytest.raises(ValueError, match="pipeline_stages=5 exceeds num_hidden_layers=4; use pipeline_stages <= 4"):
        split_layers(4, 5)


@pytest.mark.parametrize("engine", [{"quantization": "int8"}, {"compile": True}, {"prepack": True}])
def test_serve_app_rejects_model_transforms_with_shards(engine):
    # Refused when the app is built, not when a replica starts (Serve would retry it forever).
    from cluster.serve.app import build_app

    with pytest.raises(ValueError, match="not supported with pipeline_stages > 1"):
        build_app({"pipeline_stages": 2, "engine": engine})


def test_serve_app_rejects_too_many_stages():
    from cluster.serve.app import build_app

    with pytest.raises(ValueError, match="use pipeline_stages <= 4"):
        build_app(ServeConfig(pipeline_stages=9))


@pytest.mark.parametrize("num_stages", [2, 3, 4])
def test_pipeline_greedy_equals_whole_model(tiny, num_stages):
    model, tokenizer = tiny
    greedy = SamplingConfig(temperature=0, max_new_tokens=20, ignore_eos=True)
    whole = TransformersEngine(model, tokenizer).generate_batch(PROMPTS, greedy)
    stages = [ModelStage.from_full_model(model, i, num_stages, tokenizer.pad_token_id) for i in range(num_stages)]
    assert [s.layers for s in stages] == split_layers(model.config.num_hidden_layers, num_stages)
    engine = TransformersEngine(None, tokenizer, runner=PipelineRunner(stages, model.config.vocab_size),
                                context_tokens=1024, stop_ids=frozenset([tokenizer.eos_token_id]))
    sharded = engine.generate_batch(PROMPTS, greedy)
    assert [c.token_ids for c in sharded] == [c.token_ids for c in whole]
    # The prompt's logprobs need the last stage's logits at every position.
    asking = greedy.model_copy(update={"prompt_logprobs": 1})
    for ours, theirs in zip(engine.generate_batch(PROMPTS[2:], asking)[0].prompt_logprobs,
                            TransformersEngine(model, tokenizer).generate_batch(PROMPTS[2:], asking)[0].prompt_logprobs):
        assert (ours.token_id, [t for t, _ in ours.top], ours.chars) == (theirs.token_id, [t for t, _ in theirs.top], theirs.chars)
        assert ours.logprob == pytest.approx(theirs.logprob, abs=1e-4)
    # Each stage kept only its own layers.
    assert sum(len(s.model.model.layers) for s in stages) == model.config.num_hidden_layers
