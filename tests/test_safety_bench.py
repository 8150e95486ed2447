"""bench/safety.py: the corpora it generates and the result it returns and writes (bench contract)."""

from __future__ import annotations

import json

import pytest

from bench.contract import validate
from bench.safety import FLOOR, R1_DEFAULT, corpus_jsonl, generate_corpus, main


def test_extra_corpora_are_all_benign_or_all_labelled():
    benign = generate_corpus(seed=1, num_short=60, num_long=4, sensitive_rate=0.0)
    dense = generate_corpus(seed=2, num_short=60, num_long=4, sensitive_rate=1.0)
    assert not any(r["labels"] for r in benign)
    assert all(len(r["labels"]) == 1 for r in dense)


def test_main_returns_and_writes_a_valid_result(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(corpus_jsonl(generate_corpus(seed=3, num_short=24, num_long=1)), encoding="utf-8")
    out = tmp_path / "safety.json"
    argv = ["--corpus", str(corpus), "--repeats", "1", "--extra-corpora", "", "--presidio", "noop", "--json", str(out)]
    result = main(argv)
    assert validate(result) == []
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(result))
    assert result["command"].startswith("python -m bench.safety --corpus") and "--json" not in result["command"]
    corpus_result = result["raw"]["corpora"][0]
    ours = corpus_result["detectors"][R1_DEFAULT]
    assert ours["span_recall"] == 1.0 and ours["mb_per_s"] > 0
    assert len(ours["seconds_per_pass"]) == 1
    (ratio,) = result["raw"]["ratios"]
    assert ratio["ratio"] == ours["mb_per_s"] / corpus_result["detectors"][ratio["baseline"]]["mb_per_s"]
    # The floor row times one re.search per record; it screens nothing, so it has no recall.
    floor = corpus_result["detectors"][FLOOR]
    assert floor["span_recall"] is None and floor["false_positive_rate"] is None and floor["mb_per_s"] > 0
    assert ratio["floor_ratio"] == floor["mb_per_s"] / corpus_result["detectors"][ratio["baseline"]]["mb_per_s"]
    assert any("target ≥ 100×" in note for note in result["notes"])


@pytest.mark.parametrize(
    "argv,message",
    [(["--extra-corpora", "sparse"], "unknown corpus"), (["--presidio", "spacy-lg"], "unknown corpus or engine"), (["--presidio", ""], "at least one engine")],
)
def test_main_rejects_unknown_corpora_and_engines(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(argv)
