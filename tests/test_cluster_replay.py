"""`rlhf replay`'s parts that need no cluster: weight digests, the ledger, the up-front refusals, and
the in-flight steps a checkpoint saves (the whole replay runs in tests/test_cluster_loop.py and
tests/test_cluster_e2e.py)."""
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from safetensors.torch import save_file

from cluster.errors import UsageError
from cluster.job.produce import ScoredRollouts
from cluster.job.resume import load_in_flight, save_in_flight
from cluster.launch.replay import check_replayable
from cluster.outputs.run_dir import RunDir
from cluster.outputs.weight_digest import first_difference, model_digest, replay_requirements, tensor_digests

pytestmark = pytest.mark.unit


def export(path, tensors):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    return path


def test_digests_tell_apart_one_flipped_bit_a_dtype_and_a_shape(tmp_path):
    w = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b.bias": torch.ones(3)}
    base = tensor_digests(export(tmp_path / "base", w))
    assert list(base) == ["a.weight", "b.bias"]
    assert tensor_digests(export(tmp_path / "same", {k: v.clone() for k, v in w.items()})) == base
    flipped = w["a.weight"].clone()
    flipped.view(torch.int32)[1, 2] ^= 1  # the last mantissa bit of one element
    assert first_difference(base, tensor_digests(export(tmp_path / "bit", {**w, "a.weight": flipped}))) == "a.weight"
    assert first_difference(base, tensor_digests(export(tmp_path / "dt", {**w, "b.bias": torch.ones(3).double()}))) \
        == "b.bias"
    assert first_difference(base, tensor_digests(export(tmp_path / "sh", {**w, "a.weight": w["a.weight"].reshape(3, 2)
                                                                          .contiguous()}))) == "a.weight"
    assert first_difference(base, {"a.weight": base["a.weight"]}) == "b.bias"  # a tensor missing on one side
    assert model_digest(base) == model_digest(dict(reversed(base.items()))) != model_digest({"a.weight": "x"})
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors export"):
        tensor_digests(tmp_path)


def replayable_run(tmp_path, steps: int = 2):
    cfg = {"model": {"policy": "m"}, "data": {"prompts": "p"}, "reward": {"model_dir": "r"}}
    run = RunDir(tmp_path / "run").create(yaml.safe_dump(cfg))
    from cluster.config import load_config

    reqs = replay_requirements(load_config(run.config_path), "cpu")
    run.record_weights(steps, steps, {"w": "0" * 64}, reqs)
    for s in range(steps):
        run.write_rollouts(s, pa.table({"trained": [True]}))
    return run, reqs


def test_a_run_is_refused_before_anything_starts_when_a_replay_could_not_match(tmp_path):
    run, reqs = replayable_run(tmp_path)
    cfg, ledger = check_replayable(run, "cpu")
    assert [e["step"] for e in ledger] == [2] and cfg.model.policy == "m"
    with pytest.raises(UsageError, match="the learner would run on cuda, whose kernels are not deterministic"):
        check_replayable(run, "cuda")
    ledger[0]["requirements"]["learner.num_ranks"] = 4
    (run.root / "weights.jsonl").write_text(json.dumps(ledger[0]) + "\n")
    with pytest.raises(UsageError, match="^learner.num_ranks was 4 when the run was trained, is 1 here; bit-identical"):
        check_replayable(run, "cpu")
    (run.root / "weights.jsonl").write_text(json.dumps({**ledger[0], "requirements": reqs}) + "\n")
    run.rollout_path(1).unlink()
    with pytest.raises(UsageError, match="step=000001.parquet is missing; every step up to the last checkpoint "
                                         "\\(step 2\\)"):
        check_replayable(run, "cpu")
    (run.root / "weights.jsonl").unlink()
    with pytest.raises(UsageError, match="weights.jsonl records no checkpoint"):
        check_replayable(run, "cpu")
    with pytest.raises(UsageError, match="not a run directory"):
        check_replayable(RunDir(tmp_path), "cpu")


def test_a_resume_forgets_the_ledger_lines_past_its_checkpoint(tmp_path):
    run, reqs = replayable_run(tmp_path)
    run.record_weights(4, 4, {"w": "1" * 64}, reqs)
    run.record_weights(4, 4, {"w": "2" * 64}, reqs)  # a checkpoint redone: its line replaced, not doubled
    assert [(e["step"], e["tensors"]["w"][0]) for e in run.read_weight_ledger()] == [(2, "0"), (4, "2")]
    run.truncate(after_step=1)  # resumed from the checkpoint at step 2
    assert [e["step"] for e in run.read_weight_ledger()] == [2]


def test_in_flight_steps_come_back_as_they_were_saved(tmp_path):
    table = pa.table({"prompt_id": ["a", "a", "b"], "reward": pa.array([1.0, 0.0, 0.5], pa.float32()),
                      "token_versions": pa.array([[3, 3, 4], [3], None], pa.list_(pa.int64()))})
    made = [ScoredRollouts(step=7, table=table, keep=np.array([True, True, False]), gen_s=1.5, reward_s=0.25,
                           num_workers=2, draws=2, groups_uniform=1),
            ScoredRollouts(step=8, table=table.slice(0, 1), keep=np.array([False]), gen_s=2.0, reward_s=0.5,
                           num_workers=1)]
    save_in_flight(tmp_path, made)
    back = load_in_flight(tmp_path)
    assert [p.step for p in back] == [7, 8]
    for want, got in zip(made, back):
        assert got.table.equals(want.table) and got.keep.tolist() == want.keep.tolist()
        assert (got.gen_s, got.reward_s, got.num_workers, got.draws, got.groups_uniform) == \
            (want.gen_s, want.reward_s, want.num_workers, want.draws, want.groups_uniform)
    assert load_in_flight(tmp_path / "none") == []
