"""The review page's stores without Ray: ratings (what each kind becomes, durability, idempotency),
the sample and curve reader, the reward model version log, and the held-out split of
`train-rm --from-run`."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contract.config_base import ConfigError
from contract.datasets import DatasetError, load_labels, load_preferences
from reward_service.ratings import LABELS, PAIRS, RatingStore, feedback_records, validate_rating
from reward_service.review import ReviewSource, parse_query
from reward_service.rm_from_ratings import both_classes_first, split
from reward_service.versions import ModelVersions, check_model_dir


def test_each_kind_becomes_feedback_and_a_dataset_line_train_rm_reads(tmp_path):
    store = RatingStore(tmp_path)
    store.add({"kind": "like", "prompt": "p", "response": "a", "value": True, "step": 3})
    store.add({"kind": "like", "prompt": "p", "response": "b", "value": False})
    assert store.add({"kind": "score", "prompt": "p", "response": "c", "value": 3})["file"] is None  # neutral
    store.add({"kind": "score", "prompt": "p", "response": "d", "value": 5})
    out = store.add({"kind": "pick", "prompt": "p", "chosen": "e", "rejected": "f"})
    assert out["feedback"] == [{"prompt": "p", "response": "e", "score": 0.5},
                               {"prompt": "p", "response": "f", "score": -0.5}]
    assert [r["score"] for r in feedback_records(validate_rating(
        {"kind": "score", "prompt": "p", "response": "x", "value": 1}))] == [-1.0]
    labels = load_labels(tmp_path / LABELS)
    assert labels.column("response").to_pylist() == ["a", "b", "d"]
    assert labels.column("label").to_pylist() == [1.0, 0.0, 1.0]
    pairs = load_preferences(tmp_path / PAIRS)
    assert pairs.column("chosen").to_pylist() == ["e"] and pairs.column("rejected").to_pylist() == ["f"]
    assert store.counts() == {"pairs": 1, "labels": 3}


def test_a_torn_last_line_is_cut_and_a_replayed_id_is_stored_once(tmp_path):
    store = RatingStore(tmp_path)
    rating = {"kind": "like", "prompt": "p", "response": "a", "value": True, "rating_id": "r-1"}
    store.add(rating)
    with open(tmp_path / LABELS, "a") as f:
        f.write('{"prompt": "p", "respo')  # a crash mid-append
    again = RatingStore(tmp_path)
    again.add(rating)
    lines = (tmp_path / LABELS).read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["rating_id"] == "r-1"


@pytest.mark.parametrize("bad,says", [
    ([], "expected an object"), ({"kind": "meh"}, "'kind' must be one of"),
    ({"kind": "like", "prompt": 1, "response": "r", "value": True}, "'prompt' must be a string"),
    ({"kind": "score", "prompt": "p", "response": "r", "value": True}, "integer 1-5"),
    ({"kind": "like", "prompt": "p", "response": "r", "value": True, "step": -1}, "'step' must be"),
    ({"kind": "like", "prompt": "p", "response": "x" * 100_001, "value": True}, "longer than"),
])
def test_bad_ratings_are_one_line_errors(bad, says):
    with pytest.raises(DatasetError, match=says):
        validate_rating(bad)


def write_step(root, step: int, prompts: list[str]):
    rows = [{"prompt_id": f"p{i}", "sample_idx": 0, "prompt": p, "response": f"r{step}-{i}", "reward": float("nan"),
             "reward_valid": False, "reward_parts": [("model", float("nan"))], "policy_version": step,
             "worker_id": "rollout-0", "step": step, "reward_model_version": 0} for i, p in enumerate(prompts)]
    (root / "rollouts").mkdir(exist_ok=True)
    schema = pa.schema([("prompt_id", pa.string()), ("sample_idx", pa.int32()), ("prompt", pa.string()),
                        ("response", pa.string()), ("reward", pa.float32()), ("reward_valid", pa.bool_()),
                        ("reward_parts", pa.map_(pa.string(), pa.float64())), ("policy_version", pa.int64()),
                        ("worker_id", pa.string()), ("step", pa.int64()), ("reward_model_version", pa.int64())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "rollouts" / f"step={step:06d}.parquet")


def test_samples_newest_first_filtered_and_reread_when_a_file_changes(tmp_path):
    for s in range(3):
        write_step(tmp_path, s, ["Red cat", "blue dog"])
    (tmp_path / "rollouts" / "eval_step=000002.parquet").write_bytes(b"not read")
    src = ReviewSource(tmp_path / "rollouts", tmp_path / "metrics.jsonl")
    out = src.samples(limit=3)
    assert [(r["step"], r["prompt_id"]) for r in out["samples"]] == [(2, "p0"), (2, "p1"), (1, "p0")]
    assert out["latest_step"] == 2 and out["samples"][0]["reward"] is None  # NaN is not JSON
    assert [r["step"] for r in src.samples(prompt="RED")["samples"]] == [2, 1, 0]
    assert [r["prompt"] for r in src.samples(step=1)["samples"]] == ["Red cat", "blue dog"]
    write_step(tmp_path, 1, ["green"])
    assert [r["prompt"] for r in src.samples(step=1)["samples"]] == ["green"]
    assert src.metrics() == {"rows": []}
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "reward_mean": 0.5, "kl": NaN, "x": 1}\n{"step": 1, "rew')
    assert src.metrics() == {"rows": [{"step": 0, "reward_mean": 0.5, "kl": None}]}
    assert parse_query({"step": "4", "prompt": " cat ", "limit": ""}) == {"step": 4, "prompt": "cat", "limit": 50}


def test_model_versions_survive_a_restart_unless_the_config_names_another_model(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"],
                                                   "id2label": {"0": "LABEL_0"}}))
    store = tmp_path / "store"
    assert ModelVersions(store).start(str(a))["version"] == 0
    assert ModelVersions(store).add(str(b))["version"] == 1
    assert ModelVersions(store).start(str(a))["model_dir"] == str(b.resolve())  # a resume keeps v1
    assert ModelVersions(store).start(str(b)) == {**ModelVersions(store).latest(), "version": 2}
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match="not a one-output sequence classifier"):
        check_model_dir(tmp_path / "lm")
    with pytest.raises(ConfigError, match="does not exist"):
        check_model_dir(tmp_path / "nope")


def test_held_out_split_and_both_label_classes_where_train_rm_holds_out():
    rows = [{"label": 1}] * 5 + [{"label": 0}]
    first, second = np.random.default_rng(7).permutation(len(rows))[:2]
    placed = both_classes_first(rows, 7)
    assert (placed[first]["label"], placed[second]["label"]) == (1, 0)
    with pytest.raises(ConfigError, match="no disliked rating"):
        both_classes_first([{"label": 1}] * 3, 0)
    train, held = split(list(range(10)), 0.2, 0)
    assert len(held) == 2 and sorted(train + held) == list(range(10))
    with pytest.raises(ConfigError, match="too few"):
        split([1], 0.2, 0)
