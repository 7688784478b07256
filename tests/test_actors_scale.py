"""Placement by role and a pool that grows without blocking: the settings, the Ray options they
become, the autoscaler request, and a real `RolloutPool` of stand-in engines (no vLLM: the worker
is built with `engine_factory`) whose new worker has no room, then gets it."""
from __future__ import annotations

import time

import pyarrow as pa
import pytest
import ray

from actors.config import RolloutConfig, SamplingConfig
from actors.worker_placement import worker_bundle, worker_options
from contract.devices import DeviceProfile
from contract.experience import rollout_batch
from learner.config import LearnerConfig
from reward_service.config import RewardConfig
from support_rollout import keys, prompts


CPU, CUDA = DeviceProfile("cpu"), DeviceProfile("cuda")


def stand_in_engine():
    """An engine that answers at once with well-formed rows (tests only; benchmarks/scale.py has a
    timed one). Made in a function so Ray ships the class by value: workers cannot import tests/."""

    class StandInEngine:
        def __init__(self, model_dir, cfg, device):
            pass

        def generate(self, table, sampling, version, worker_id, between_steps=None):
            return rollout_batch([{"prompt_id": pid, "sample_idx": s, "prompt": p, "prompt_ids": ids,
                                   "response": "x", "response_ids": [5], "logprobs": [-1.0], "finish_reason": "length",
                                   "policy_version": version, "worker_id": worker_id, "gen_s": 0.0}
                                  for pid, p, ids in zip(table["prompt_id"].to_pylist(), table["prompt"].to_pylist(),
                                                         table["prompt_ids"].to_pylist()) for s in range(sampling.n)])

        def load_weights(self, named):
            for _ in named:
                pass

    return StandInEngine


def test_each_role_has_one_placement_setting_defaulting_to_anywhere():
    assert RolloutConfig().resources == LearnerConfig().resources == RewardConfig(functions=[
        {"path": "m:f"}]).resources == {}
    assert RolloutConfig(resources={"rollout": 1}).resources == {"rollout": 1.0}
    for bad, why in (({"CPU": 1}, "is not a custom resource"), ({"GPU": 1}, "is not a custom resource"),
                     ({"node:10.0.0.1": 1}, "is not a custom resource"), ({"rollout": 0}, "expected an amount > 0")):
        with pytest.raises(ValueError, match=why):
            RolloutConfig(resources=bad)
        with pytest.raises(ValueError, match=why):
            LearnerConfig(resources=bad)


def test_worker_options_add_the_role_resources_and_spread():
    plain = worker_options("rollout-0", RolloutConfig(), CPU, "ns")
    assert "resources" not in plain and plain["num_cpus"] == 1.0 and plain["scheduling_strategy"] == "SPREAD"
    placed = worker_options("rollout-0", RolloutConfig(resources={"rollout": 1}, gpus_per_worker=1), CUDA, None)
    assert placed["resources"] == {"rollout": 1.0} and placed["num_gpus"] == 1.0 and "namespace" not in placed
    assert worker_bundle(RolloutConfig(resources={"rollout": 1}), CUDA) == {"CPU": 1.0, "GPU": 1.0, "rollout": 1.0}
    assert worker_bundle(RolloutConfig(resources={"rollout": 1}), CPU) == {"CPU": 1.0, "rollout": 1.0}


def test_scaling_past_capacity_asks_the_autoscaler_once_for_the_whole_fleet(monkeypatch):
    import ray.autoscaler.sdk as sdk

    from cluster.job import autoscale

    asked = []
    monkeypatch.setattr(sdk, "request_resources", lambda bundles: asked.append(bundles))
    nodes = [{"Alive": True, "Resources": {"CPU": 0.0}},                       # head
             {"Alive": True, "Resources": {"CPU": 16.0, "rollout": 4.0}},      # a rollout node
             {"Alive": False, "Resources": {"CPU": 16.0, "rollout": 4.0}},     # gone
             {"Alive": True, "Resources": {"CPU": 48.0, "learner": 8.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    cfg = RolloutConfig(resources={"rollout": 1})
    assert autoscale.room_for(worker_bundle(cfg, CPU)) == 4
    assert autoscale.request_rollout_capacity(cfg, CPU, 4) is None
    msg = autoscale.request_rollout_capacity(cfg, CPU, 6)
    assert asked == [[{"CPU": 1.0, "rollout": 1.0}] * 4, [{"CPU": 1.0, "rollout": 1.0}] * 6]
    assert "holds 4 x" in msg and "asked the autoscaler for 6" in msg
    autoscale.release_rollout_capacity()
    assert asked[-1] == []


def test_the_run_dir_check_probes_the_nodes_a_learner_rank_may_use_and_never_its_own(monkeypatch, tmp_path):
    """cluster/job/storage_check.py: which nodes are probed before anything starts (a single-node job
    sends no probe at all); the probe itself runs on a simulated cluster in test_cluster_multinode."""
    from cluster.job import storage_check

    nodes = [{"NodeID": "head", "Alive": True, "Resources": {"CPU": 0.0}},
             {"NodeID": "roll", "Alive": True, "Resources": {"CPU": 8.0, "rollout": 4.0}},
             {"NodeID": "lrn", "Alive": True, "Resources": {"CPU": 8.0, "learner": 8.0}},
             {"NodeID": "gone", "Alive": False, "Resources": {"CPU": 8.0, "learner": 8.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    assert storage_check.learner_node_candidates({"CPU": 1.0, "learner": 1.0}) == ["lrn"]
    assert storage_check.learner_node_candidates({"CPU": 1.0}) == ["roll", "lrn"]

    class Here:
        @staticmethod
        def get_node_id():
            return "lrn"

    monkeypatch.setattr(ray, "get_runtime_context", lambda: Here)
    assert storage_check.check_shared_run_dir(tmp_path, ["lrn", "lrn"]) == ["lrn"]  # its own node: nothing sent
    assert list(tmp_path.iterdir()) == []


def test_a_worker_with_no_room_does_not_block_and_joins_when_room_appears(ray_local, tiny_models):
    """The session cluster has 8 CPUs: a blocker holds some, so the pool's second worker has no room.
    scale_to returns at once, generate runs on the first worker, the waiting worker is named after
    rollout.placement_timeout_s, and it serves once the blocker goes."""
    from actors.pool import RolloutPool

    free = ray.available_resources().get("CPU", 0)
    per = 3.0
    assert free >= 2 * per, f"the session cluster is busy ({free} CPUs free)"

    @ray.remote
    class Blocker:
        def ready(self):
            return True

    blocker = Blocker.options(num_cpus=free - 2 * per + 1).remote()  # leaves room for one worker, not two
    ray.get(blocker.ready.remote(), timeout=120)
    messages: list[str] = []
    cfg = RolloutConfig(num_workers=1, cpus_per_worker=per, placement_timeout_s=1.0, request_timeout_s=60,
                        start_timeout_s=120, sampling=SamplingConfig(n=2, max_new_tokens=4))
    pool = RolloutPool(cfg, str(tiny_models["policy"]), CPU, name_prefix="scale-test", namespace="rlhf-tests",
                       log=messages.append, engine_factory=stand_in_engine())
    try:
        t0 = time.monotonic()
        pool.scale_to(2)
        assert time.monotonic() - t0 < 5 and pool.num_workers == 1 and pool.num_starting == 1
        out = pool.generate(prompts(6))
        assert keys(out) == [(f"p{i}", s) for i in range(6) for s in range(2)]
        deadline = time.monotonic() + 60
        while not any("scale-test-1: not running after 1s" in m for m in messages):
            assert time.monotonic() < deadline, messages
            time.sleep(0.2)
        assert pool.num_workers == 1  # still waiting, still serving with one
        ray.kill(blocker)
        deadline = time.monotonic() + 120
        while pool.num_workers < 2:
            assert time.monotonic() < deadline, messages
            time.sleep(0.2)
        assert any("scale-test-1 (scale-up) serving: 2 serving" in m for m in messages), messages
        out = pool.generate(prompts(8))
        assert set(out["worker_id"].to_pylist()) == {"scale-test-0", "scale-test-1"}
        # shrinking cancels a worker still waiting first, and never blocks
        blocker = Blocker.options(num_cpus=ray.available_resources().get("CPU", 0)).remote()
        ray.get(blocker.ready.remote(), timeout=120)
        pool.scale_to(3)
        assert pool.num_starting == 1
        pool.scale_to(2)
        assert pool.num_starting == 0 and pool.num_workers == 2
        assert not [m for m in messages if "failed to start" in m], messages
    finally:
        pool.shutdown()
        ray.kill(blocker)


def test_a_stand_in_engine_passes_through_the_real_pool_exactly_once(ray_local, tiny_models):
    from actors.pool import RolloutPool

    cfg = RolloutConfig(num_workers=3, cpus_per_worker=0.1, chunks_per_worker=2, request_timeout_s=60,
                        sampling=SamplingConfig(n=3, max_new_tokens=4))
    pool = RolloutPool(cfg, str(tiny_models["policy"]), CPU, name_prefix="standin", namespace="rlhf-tests",
                       engine_factory=stand_in_engine())
    try:
        table = pool.generate(pa.table({"prompt_id": [f"q{i}" for i in range(20)],
                                        "prompt": [f"red cat {i}" for i in range(20)]}))
        assert keys(table) == [(f"q{i}", s) for i in range(20) for s in range(3)]
        assert len(pool.last_run.accepted) == 6 and len(pool.last_run.engine_s()) == 6
    finally:
        pool.shutdown()
