"""Verifiable tasks: answers right by construction, train and held-out disjoint, reproducible from a seed."""
from __future__ import annotations

import json
import re

import pytest

from cluster.tasks import make_task, split_of
from contract.datasets import DatasetError, load_prompts, require_answers


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_arithmetic_answers_are_right_and_splits_disjoint(tmp_path):
    paths = make_task("arithmetic", tmp_path, n_train=400, n_heldout=100, seed=3)
    train, held = _rows(paths["train"]), _rows(paths["heldout"])
    assert len(train) == 400 and len(held) == 100
    assert not {r["key"] for r in train} & {r["key"] for r in held}
    assert not {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in held}
    assert all(split_of(r["key"], 0.2) == "heldout" for r in held)
    for r in train + held:  # recompute each answer from the key's numbers
        op, *nums = r["key"].split(":")
        n = list(map(int, nums))
        want = {"add": lambda: n[0] + n[1], "sub": lambda: n[0] - n[1], "mul": lambda: n[0] * n[1],
                "div": lambda: n[0] // n[1], "two": lambda: n[0] + n[1] - n[2]}[op]()
        assert r["answer"] == str(want) and want > 0, r
        if op == "div":
            assert n[0] % n[1] == 0
        for x in nums:  # the numbers in the question are the key's
            assert re.search(rf"\b{x}\b", r["messages"][0]["content"]), r
    assert len({r["key"].split(":")[0] for r in train}) == 5  # every template drawn
    again = make_task("arithmetic", tmp_path / "again", n_train=400, n_heldout=100, seed=3)
    assert paths["train"].read_text() == again["train"].read_text()  # the seed decides everything
    other = make_task("arithmetic", tmp_path / "other", n_train=400, n_heldout=100, seed=4)
    assert paths["train"].read_text() != other["train"].read_text()


def test_reverse_text_and_prompt_loading(tmp_path, tiny_chat_models):
    from transformers import AutoTokenizer

    paths = make_task("reverse_text", tmp_path, n_train=50, n_heldout=20, seed=0)
    held = _rows(paths["heldout"])
    for r in held:
        text = r["key"]
        assert r["answer"] == text[::-1] and r["messages"][0]["content"].endswith(text)
    table = load_prompts(paths["heldout"], tokenizer=AutoTokenizer.from_pretrained(tiny_chat_models["policy"]))
    assert "<|im_start|>user" in table.column("prompt")[0].as_py()
    assert table.column("reference").to_pylist() == [r["answer"] for r in held]
    assert table.column("prompt_id").to_pylist() == [r["id"] for r in held]


def test_prompts_without_answers_are_one_line(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "2+2?"}) + "\n")
    with pytest.raises(DatasetError, match=r"p.jsonl: no 'answer' column; reward.verifier checks each response"):
        require_answers(load_prompts(p), p, "answer")
    p.write_text(json.dumps({"prompt": "2+2?", "answer": None}) + "\n" + json.dumps({"prompt": "x", "answer": 4}) + "\n")
    with pytest.raises(DatasetError, match=r"row 0: field 'answer' must be a reference answer"):
        load_prompts(p)
    p.write_text(json.dumps({"prompt": "2+2?", "answer": 4.0}) + "\n")
    assert load_prompts(p).column("reference").to_pylist() == ["4"]


def test_unknown_task_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="make-task: unknown task 'gsm8k'"):
        make_task("gsm8k", tmp_path)


def test_a_verifier_job_without_answers_or_with_an_unknown_verifier_is_one_line(tmp_path, tiny_chat_models):
    """`rlhf train`'s checks before anything starts: the prompt file must carry the answers the
    verifier checks against, and the verifier must be one that exists."""
    from cluster.config import load_config
    from cluster.launch.preflight import check_prompts
    from contract.config_base import ConfigError

    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "2+2?"}]}) + "\n")
    base = {"model": {"policy": str(tiny_chat_models["policy"])}, "data": {"prompts": str(p)},
            "reward": {"verifier": {"name": "math"}}, "rollout": {"engine": {"max_model_len": 256}}}
    cfg = load_config(None, base=base)
    problems: list[str] = []
    check_prompts(cfg, True, problems)
    assert problems == [f"data.prompts: {p}: no 'answer' column; reward.verifier checks each response against the "
                        f"prompt's reference answer (name its column with data.columns.answer)"]
    with pytest.raises(ConfigError) as e:
        load_config(None, ["reward.verifier.name=regex"], base=base)
    assert len(e.value.lines) == 1 and e.value.lines[0].startswith("config: reward.verifier.name:"), e.value.lines
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"messages": [{"role": "user", "content": "2+2?"}], "answer": 4}) + "\n")
    problems = []
    check_prompts(load_config(None, [f"data.prompts={ok}"], base=base), True, problems)
    assert problems == []
