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


def loop_config(tiny_models, tmp_path, loop: dict, eval_prompts: Path | None = None):
    from cluster.config import load_config

    prompts = tmp_path / "prompts.jsonl"  # every other prompt is "flat": the reward ignores the response
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"{'flat' if i % 2 else 'red'} cat {i}"}) + "\n"
                               for i in range(12)))
    return load_config(None, [], base={
        "name": "loop-modes", "model": {"policy": str(tiny_models["policy"])},
        "data": {"prompts": str(prompts), "prompts_per_step": 4},
        "rollout": {"num_workers": 1, "sampling": {"n": 2, "max_new_tokens": 6, "temperature": 0.7, "seed": 5}},
        "reward": {"functions": [{"path": "support_rewards:flat_or_colour"}], "python_path": [str(HERE)],
                   "http_port": free_port(), "max_retries": 1},
        "learner": {"num_ranks": 1, "lr": 1e-3,
                    "rl": {"algorithm": "grpo", "kl_coef": 0.0, "minibatch_size": 8, "micro_batch_size": 8}},
        "loop": {"gold_function": "support_rewards:colour_only", **loop},
        **({"eval": {"prompts": str(eval_prompts), "every_steps": 2, "n": 1, "max_new_tokens": 4}}
           if eval_prompts else {}),
    })


@pytest.fixture(scope="module")
def stack(tiny_models, ray_local, tmp_path_factory):
    """One job's services (reward app, learner rank, pool) for the module, and the learner's starting
    state: `fresh(stack)` brings them back to version 0 for a run of its own."""
    import sys

    from cluster.job.services import start_services, stop_services
    from contract.devices import DeviceProfile

    tmp = tmp_path_factory.mktemp("stack")
    cfg = loop_config(tiny_models, tmp, {"mode": "async", "max_staleness": 2})
    sys.path.insert(0, str(HERE))  # the gold function runs in this process
    services = start_services(cfg, DeviceProfile("cpu"), str(tmp / "store"), log=lambda m: None)
    try:
        services.learner.save_checkpoint(str(tmp / "initial"))
        yield {"services": services, "cfg": cfg, "initial": tmp / "initial"}
    finally:
        stop_services(services)
        sys.path.remove(str(HERE))


def fresh(stack):
    """The learner back to its initial state (version 0) and new rollout workers (a worker refuses to
    go back to an older version): a new run's start, or a resume's, on the same services."""
    from actors.pool import RolloutPool
    from cluster.job.weight_sync import WeightSync
    from contract.devices import DeviceProfile

    services, cfg = stack["services"], stack["cfg"]
    if services.learner.version == 0:
        return services  # nothing trained since the start
    services.learner.load_checkpoint(str(stack["initial"]))
    services.sync.leave(services.pool)
    services.pool.shutdown()
    device = DeviceProfile("cpu")
    services.sync = WeightSync(services.learner, cfg.learner.weight_sync, device.collective_backend,
                               cfg.learner.sync_timeout_s, log=lambda m: None)
    services.pool = RolloutPool(services.plan.rollout, cfg.model.policy, device,
                                weights_source=services.current_weights, namespace=cfg.ray.namespace)
    return services


@pytest.mark.slow
def test_async_k2_dynamic_sampling_and_eval_on_the_real_stack(stack, tiny_models, tmp_path):
    from cluster.job.loop import LoopState, TrainingLoop
    from cluster.outputs.run_dir import RunDir
    from contract.datasets import PromptIterator, load_prompts

    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("".join(json.dumps({"id": f"e{i}", "prompt": f"blue dog {i}"}) + "\n" for i in range(3)))
    steps, per_step = 4, 4
    cfg = loop_config(tiny_models, tmp_path, {"steps": steps, "mode": "async", "max_staleness": 2,
                                              "dynamic_sampling": {"enabled": True, "max_draws": 3}}, held_out)
    prompts = Path(cfg.data.prompts)
    run = RunDir(tmp_path / "run").create("")
    services = fresh(stack)
    TrainingLoop(cfg, run, services, PromptIterator(load_prompts(prompts)), LoopState(), log=lambda m: None).run_loop()

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
        assert set(np.array(rows_s.column("not_trained").to_pylist(), dtype=object)[~trained]) <= {"uniform_group"}
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


class Crash(Exception):
    """Stands in for a driver killed mid-run: the loop ends without its final checkpoint."""


@pytest.mark.slow
def test_a_crashed_async_run_resumes_sample_for_sample_and_replays_to_the_same_weights(stack, tiny_models, tmp_path):
    """One async run uninterrupted (A); the same run (B) crashed after step 3, its steps past the step-2
    checkpoint lost, and resumed. B's experience equals A's sample for sample (the step the checkpoint
    had generated but not trained included: saved with it, not drawn again under newer weights), and
    its weights at every checkpoint are A's bit for bit. Then `replay` retrains B from its Parquet
    files and finds the same weights, until a checkpoint whose recorded digest was changed: it names
    that step and tensor."""
    from cluster.errors import JobFailed
    from cluster.job.loop import LoopState, TrainingLoop
    from cluster.job.resume import restore
    from cluster.launch.replay import replay
    from cluster.outputs.run_dir import RunDir
    from contract.datasets import PromptIterator, load_prompts

    steps = 6
    cfg = loop_config(tiny_models, tmp_path, {"steps": steps, "mode": "async", "max_staleness": 1,
                                              "checkpoint_every": 2, "keep_checkpoints": 0,
                                              "dynamic_sampling": {"enabled": True, "max_draws": 2}})
    from cluster.config import dump_config

    def prompts():
        return PromptIterator(load_prompts(cfg.data.prompts), seed=cfg.seed)

    a = RunDir(tmp_path / "a").create(dump_config(cfg))
    TrainingLoop(cfg, a, fresh(stack), prompts(), LoopState(), log=lambda m: None).run_loop()

    b = RunDir(tmp_path / "b").create(dump_config(cfg))

    def crash_after_3(step, m):
        if step == 3:
            raise Crash
    with pytest.raises(Crash):
        TrainingLoop(cfg, b, fresh(stack), prompts(), LoopState(), on_step=crash_after_3, log=lambda m: None).run_loop()
    assert b.latest_checkpoint().name == "step=000002" and len(b.read_metrics()) == 4
    saved = json.loads((b.latest_checkpoint() / "controller.json").read_text())
    assert saved["in_flight_steps"] == [2]  # generated under version 1, not trained before the crash
    services, it = fresh(stack), prompts()
    state, in_flight = restore(b, services, it, log=lambda m: None)
    assert (state.step, [p.step for p in in_flight], services.learner.version) == (2, [2], 2)
    TrainingLoop(cfg, b, services, it, state, log=lambda m: None, in_flight=in_flight).run_loop()

    def samples(run):
        t = run.read_rollouts()
        return sorted(zip(t.column("step").to_pylist(), t.column("prompt_id").to_pylist(),
                          t.column("sample_idx").to_pylist(), t.column("policy_version").to_pylist(),
                          map(tuple, t.column("response_ids").to_pylist()), t.column("reward").to_pylist(),
                          t.column("trained").to_pylist()))
    got, want = samples(b), samples(a)
    assert len(want) >= steps * 4 * 2 and {s[3] for s in want} == set(range(steps - 1))  # one step off: 0, 0, 1, .., 4
    assert got == want
    digests = [(e["step"], e["sha256"]) for e in a.read_weight_ledger()]
    assert [s for s, _ in digests] == [2, 4, 6]
    assert [(e["step"], e["sha256"]) for e in b.read_weight_ledger()] == digests

    # replay B; the ledger's last line is changed in one tensor, as a run that trained differently would be
    ledger = b.read_weight_ledger()
    name = sorted(ledger[-1]["tensors"])[3]
    ledger[-1]["tensors"][name] = "0" * 64
    (b.root / "weights.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ledger))
    said = []
    with pytest.raises(JobFailed) as failed:
        replay(str(b.root), connect_ray=False, log=said.append)
    assert said == ["step 2: policy version 2, every tensor bit-identical",
                    "step 4: policy version 4, every tensor bit-identical"]  # across the resume at step 2
    assert str(failed.value) == f"weights differ at the checkpoint of step 6 (policy version 6): first tensor {name}"
