"""The feedback store and the output checks, without Ray: matching rule, durability, validation."""
from __future__ import annotations

import json

import numpy as np
import pytest

from contract.datasets import DatasetError, load_feedback
from reward_service.combine import call_function, combine
from reward_service.feedback import FeedbackStore, ngrams


def test_ngram_jaccard_match_and_weighted_mean(tmp_path):
    store = FeedbackStore(tmp_path, ngram=2, threshold=0.5)
    store.add([{"prompt": "p", "response": "red blue green sky", "score": 1.0},
               {"prompt": "p", "response": "red blue green sea", "score": -1.0}])
    # "red blue green sky" vs itself: 1.0; vs the other: 2 shared of 4 bigrams -> 0.5 (matches too)
    assert store.match(["Red, blue green SKY"]) == [pytest.approx((1.0 * 1.0 + 0.5 * -1.0) / 1.5)]
    assert store.match(["the lazy dog", ""]) == [0.0, 0.0]
    assert ngrams("one", 2) == {("one",)}


def test_bad_batch_stores_nothing_and_replayed_id_stores_once(tmp_path):
    store = FeedbackStore(tmp_path, ngram=2, threshold=0.5)
    with pytest.raises(DatasetError, match=r"feedback\[1\]: field 'score' must be a number in \[-1, 1\]"):
        store.add([{"prompt": "p", "response": "a b", "score": 0.5}, {"prompt": "p", "response": "c", "score": 2}])
    with pytest.raises(DatasetError, match="non-empty list"):
        store.add({"prompt": "p", "response": "a", "score": 0})
    assert not (tmp_path / "feedback.jsonl").exists() and len(store) == 0
    rec = [{"prompt": "p", "response": "a b", "score": 0.5}]
    assert (store.add(rec, "id-1"), store.add(rec, "id-1"), store.add(rec)) == (1, 0, 1)
    assert [r["score"] for r in load_feedback(tmp_path / "feedback.jsonl")] == [0.5, 0.5]


def test_reopen_reads_back_and_cuts_a_torn_line(tmp_path):
    store = FeedbackStore(tmp_path, ngram=1, threshold=1.0)
    store.add([{"prompt": "p", "response": "green", "score": 0.25}], "id-1")
    with open(tmp_path / "feedback.jsonl", "a") as f:
        f.write('{"prompt": "p", "response": "bl')  # a crash mid-write
    again = FeedbackStore(tmp_path, ngram=1, threshold=1.0)
    assert len(again) == 1 and again.match(["green"]) == [0.25]
    assert again.add([{"prompt": "p", "response": "green", "score": 0.25}], "id-1") == 0
    again.add([{"prompt": "q", "response": "blue", "score": -0.5}])
    lines = (tmp_path / "feedback.jsonl").read_text().splitlines()
    assert [json.loads(x)["response"] for x in lines] == ["green", "blue"]


def test_combine_marks_nonfinite_and_wrong_length_rows_invalid():
    values, err = call_function("fn:f", lambda p, r: [1.0, 2.0], ["a"] * 3, ["x"] * 3)
    assert err == "reward function fn:f returned 2 values for 3 pairs" and np.isnan(values).all()
    model = np.array([0.5, np.inf, 1.0])
    out = combine(3, {"model": (model, 2.0), "fn:g": (np.array([1.0, 1.0, np.nan]), 1.0)},
                  np.array([1.0, 0.0, 0.0]), 0.25, [])
    assert out.valid.tolist() == [True, False, False]
    assert out.reward.tolist() == [pytest.approx(0.25 * 1.0 + 0.75 * (2.0 * 0.5 + 1.0)), 0.0, 0.0]
    assert out.errors == ["model: 1 of 3 values are NaN/inf", "fn:g: 1 of 3 values are NaN/inf"]
    assert out.reward.dtype == np.float32 and np.isinf(out.parts["model"][1])
