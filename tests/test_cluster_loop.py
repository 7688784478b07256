"""The training loop's modes on the real stack (local Ray, a vLLM worker, the reward Serve app, a
DeepSpeed rank): async with up to k batches in flight, DAPO dynamic sampling, held-out eval."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from cluster.job.produce import _first_groups, distinct_new_prompts, uniform_groups
from contract.datasets import PromptIterator
from contract.net import free_port

HERE = Path(__file__).parent


def scored(pids: list[str], rewards: list[float], valid: list[bool] | None = None) -> pa.Table:
    return pa.table({"prompt_id": pids, "reward": pa.array(rewards, pa.float32()),
                     "reward_valid": valid or [True] * len(pids)})


def test_uniform_groups_are_those_whose_valid_rewards_are_all_equal():
    t = scored(["a", "a", "b", "b", "c", "c", "d"], [1.0, 1.0, 0.2, 0.7, 3.0, 9.0, 5.0],
               [True, True, True, True, True, False, True])
    # a: equal; b: differ; c: one valid reward left (no baseline); d: a group of one.
    assert uniform_groups(t, 0.0).tolist() == [True, True, False, False, True, True, True]
    assert uniform_groups(t, 0.3).tolist() == [True, True, True, True, True, True, True]  # b's std is 0.25


def test_first_groups_takes_the_first_k_kept_groups_in_table_order():
    t = scored(["a", "a", "b", "b", "c", "c"], [0.0] * 6)
    keep = np.array([True, True, False, False, True, True])
    assert _first_groups(t, keep, 1).tolist() == [True, True, False, False, False, False]
    assert _first_groups(t, keep, 5).tolist() == [True, True, False, False, True, True]
    assert not _first_groups(t, keep, 0).any()


def test_a_step_never_holds_a_prompt_twice_across_an_epoch_boundary_or_extra_draws():
    it = PromptIterator(pa.table({"prompt_id": [f"q{i}" for i in range(5)], "prompt": ["p"] * 5}), seed=0)
    it.next_batch(3)
    crossing = it.next_batch(4)  # 2 from epoch 0's tail, 2 from epoch 1's head
    ids = crossing.column("prompt_id").to_pylist()
    assert ids == ["q0", "q1", "q1", "q4"]  # the pool refuses such a batch (duplicate prompt_id)
    got = distinct_new_prompts(crossing, set()).column("prompt_id").to_pylist()
    assert got == list(dict.fromkeys(ids))  # first occurrences, in order
    assert distinct_new_prompts(crossing, {ids[0]}).column("prompt_id").to_pylist() == [
        p for p in dict.fromkeys(ids) if p != ids[0]]
    assert distinct_new_prompts(crossing, set(ids)).num_rows == 0


@pytest.mark.slow
def test_async_k2_dynamic_sampling_and_eval_on_the_real_stack(tiny_models, ray_local, tmp_path):
    from cluster.config import load_config
    from cluster.job.loop import LoopState, TrainingLoop
    from cluster.job.services import start_services, stop_services
    from cluster.outputs.run_dir import RunDir
    from contract.datasets import PromptIterator, load_prompts
    from contract.devices import DeviceProfile

    prompts = tmp_path / "prompts.jsonl"  # every other prompt is "flat": the reward ignores the response
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"{'flat' if i % 2 else 'red'} cat {i}"}) + "\n"
                               for i in range(12)))
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("".join(json.dumps({"id": f"e{i}", "prompt": f"blue dog {i}"}) + "\n" for i in range(3)))
    steps, per_step, n = 4, 4, 2
    cfg = load_config(None, [], base={
        "name": "loop-modes", "model": {"policy": str(tiny_models["policy"])},
        "data": {"prompts": str(prompts), "prompts_per_step": per_step},
        "rollout": {"num_workers": 1, "sampling": {"n": n, "max_new_tokens": 6, "temperature": 0.7}},
        "reward": {"functions": [{"path": "support_rewards:flat_or_colour"}], "python_path": [str(HERE)],
                   "http_port": free_port(), "max_retries": 1},
        "learner": {"num_ranks": 1, "lr": 1e-3,
                    "rl": {"algorithm": "grpo", "kl_coef": 0.0, "minibatch_size": 8, "micro_batch_size": 8}},
        "loop": {"steps": steps, "mode": "async", "max_staleness": 2, "gold_function": "support_rewards:colour_only",
                 "dynamic_sampling": {"enabled": True, "max_draws": 3}},
        "eval": {"prompts": str(held_out), "every_steps": 2, "n": 1, "max_new_tokens": 4},
    })
    import sys

    sys.path.insert(0, str(HERE))  # the gold function runs in this process
    run = RunDir(tmp_path / "run").create("")
    services = start_services(cfg, DeviceProfile("cpu"), str(tmp_path / "store"), log=lambda m: None)
    try:
        TrainingLoop(cfg, run, services, PromptIterator(load_prompts(prompts)), LoopState(), log=lambda m: None).run_loop()
    finally:
        stop_services(services)
        sys.path.remove(str(HERE))

    rows = run.read_metrics()
    train_rows = [r for r in rows if "train_s" in r]
    assert [r["step"] for r in train_rows] == list(range(steps))
    # k = 2 batches in flight: samples up to two versions behind, never more.
    assert max(r["staleness_max"] for r in train_rows) == 2
    # Step 0 trains on version-0 samples with version-0 weights: the engine's logprobs (of the
    # tempered distribution it sampled from) equal the learner's, which the job scores at T = 0.7.
    # Both fp32 on the same weights: measured 1.3e-7 here; 1e-4 as the learner's and LoRA's same-weights
    # checks hold (tests/test_learner.py, test_learner_lora.py). Later steps train on older samples: not equal.
    assert train_rows[0]["staleness_max"] == 0 and train_rows[0]["logprob_gap"] < 1e-4
    assert all(r["dropped_stale"] == 0 for r in train_rows)

    table = run.read_rollouts()
    assert set(table.column("split").to_pylist()) == {"train"}
    for r in train_rows:
        rows_s = table.filter(pc.equal(table.column("step"), r["step"]))
        keys = list(zip(rows_s.column("prompt_id").to_pylist(), rows_s.column("sample_idx").to_pylist()))
        assert len(keys) == len(set(keys))  # every drawn sample exactly once, extra draws included
        flat = np.array(["flat" in p for p in rows_s.column("prompt").to_pylist()])
        trained = np.array(rows_s.column("trained").to_pylist())
        assert not trained[flat].any()  # uniform groups carry no signal: never trained on
        assert r["uniform_groups"] == len(set(np.array(rows_s.column("prompt_id").to_pylist())[flat]))
        n_trained_groups = len(set(np.array(rows_s.column("prompt_id").to_pylist())[trained]))
        assert n_trained_groups <= per_step and r["trained_samples"] == int(trained.sum())
        assert 1 <= r["sampling_draws"] <= 3
    assert any(r["sampling_draws"] > 1 for r in train_rows)  # half the prompts are flat: more were drawn

    # eval before step 0, after step 2 (at step 2) and after the last step, each at the version it names
    evals = {r["step"]: r for r in rows if "eval_reward_mean" in r}
    assert sorted(evals) == [0, 2, steps]
    assert [evals[s]["eval_policy_version"] for s in (0, 2, steps)] == [0, 2, steps]
    assert all(np.isfinite(evals[s]["eval_gold_mean"]) for s in evals)
    ev = run.read_rollouts(split="eval")
    assert sorted(set(ev.column("step").to_pylist())) == [0, 2, steps]
    assert ev.num_rows == 3 * 3 and set(ev.column("split").to_pylist()) == {"eval"}
    assert not any(ev.column("trained").to_pylist())
    assert set(ev.column("prompt_id").to_pylist()) == {"e0", "e1", "e2"}
