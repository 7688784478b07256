import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contract.datasets import (DatasetError, PromptIterator, load_feedback, load_labels, load_preferences,
                               load_prompts, validate_feedback)


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompts_from_jsonl_and_parquet(tmp_path):
    j = jsonl(tmp_path / "p.jsonl", [{"id": 7, "prompt": "a"}, {"id": 9, "prompt": "b", "meta": 1}])
    t = load_prompts(j)
    assert t.column("prompt_id").to_pylist() == ["7", "9"]
    assert t.column("prompt").to_pylist() == ["a", "b"]
    assert t.column("messages").to_pylist() == [None, None]  # plain-text prompts: no conversation
    pq.write_table(pa.table({"prompt": ["x", "y", "z"]}), tmp_path / "p.parquet")
    t = load_prompts(tmp_path / "p.parquet")
    assert t.column("prompt_id").to_pylist() == ["0", "1", "2"]


@pytest.mark.parametrize("content, message", [
    (b"", "file is empty"),
    (b'{"text": "a"}\n', "missing column 'prompt'"),
    (b'{"prompt": "a"}\n{"prompt": null}\n', "column 'prompt' is null in row(s) [1]"),
    (b'{"prompt": 3}\n', "column 'prompt' must be text"),
    (b'{"prompt": "caf\xe9"}\n', "not valid UTF-8"),
    (b'{"prompt": "a"\n', "cannot be parsed"),
    (b'{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', "duplicate values"),
])
def test_prompt_errors_name_file_and_column(tmp_path, content, message):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(DatasetError) as e:
        load_prompts(p)
    assert message in str(e.value) and str(p) in str(e.value)


def test_missing_file_and_extension(tmp_path):
    with pytest.raises(DatasetError, match="file not found"):
        load_prompts(tmp_path / "none.jsonl")
    (tmp_path / "p.csv").write_text("prompt\na\n")
    with pytest.raises(DatasetError, match="unsupported extension"):
        load_prompts(tmp_path / "p.csv")


def test_preferences_labels_feedback(tmp_path):
    pref = load_preferences(jsonl(tmp_path / "pref.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}]))
    assert pref.to_pylist() == [{"prompt": "p", "messages": None, "chosen": "c", "rejected": "r"}]
    with pytest.raises(DatasetError, match="missing column 'rejected'"):
        load_preferences(jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "c"}]))
    lab = load_labels(jsonl(tmp_path / "lab.jsonl", [{"prompt": "p", "response": "r", "label": 1}]))
    assert lab.column("label").to_pylist() == [1.0]
    with pytest.raises(DatasetError, match="'label' must be 0 or 1"):
        load_labels(jsonl(tmp_path / "lab2.jsonl", [{"prompt": "p", "response": "r", "label": 3}]))
    fb = load_feedback(jsonl(tmp_path / "fb.jsonl", [{"prompt": "p", "response": "r", "score": -0.5}]))
    assert fb == [{"prompt": "p", "response": "r", "score": -0.5}]
    with pytest.raises(DatasetError, match=r"fb2.jsonl:2: field 'score' must be a number in \[-1, 1\]"):
        load_feedback(jsonl(tmp_path / "fb2.jsonl", [{"prompt": "p", "response": "r", "score": 0},
                                                      {"prompt": "p", "response": "r", "score": 2}]))
    for bad in [{"prompt": "p", "response": "r", "score": float("nan")}, {"prompt": 1, "response": "r", "score": 0},
                {"prompt": "p", "response": "r", "score": True}, "not a dict"]:
        with pytest.raises(DatasetError):
            validate_feedback(bad)


def test_iterator_is_seeded_covers_epochs_and_resumes():
    table = pa.table({"prompt_id": [str(i) for i in range(10)], "prompt": [f"p{i}" for i in range(10)]})
    a = PromptIterator(table, seed=3)
    first = [a.next_batch(4).column("prompt_id").to_pylist() for _ in range(2)]
    assert len(set(first[0] + first[1])) == 8
    state = a.state_dict()
    rest = [a.next_batch(4).column("prompt_id").to_pylist() for _ in range(3)]
    # epoch 0 ends inside the 3rd batch: every prompt seen exactly once in the first 10 draws
    assert sorted(first[0] + first[1] + rest[0][:2], key=int) == [str(i) for i in range(10)]
    b = PromptIterator(table, seed=3)
    b.load_state_dict(state)
    assert [b.next_batch(4).column("prompt_id").to_pylist() for _ in range(3)] == rest
    c = PromptIterator(table, seed=4)
    assert [c.next_batch(4).column("prompt_id").to_pylist() for _ in range(2)] != first
    with pytest.raises(DatasetError, match="does not match"):
        PromptIterator(table.slice(0, 5), seed=3).load_state_dict(state)
