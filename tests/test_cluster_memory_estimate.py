"""The host-memory floor an embedded cluster is checked against before anything starts
(cluster/launch/memory_estimate.py): the one-line refusal, what it counts, and that jobs that fit pass."""
from __future__ import annotations

import json
import shutil

import pytest

from cluster.config import load_config
from cluster.launch import memory_estimate
from cluster.launch.memory_estimate import BASE, FIXED, GiB, parameters
from cluster.plan import make_job_plan
from contract.devices import DeviceProfile

CPU, CUDA = DeviceProfile("cpu"), DeviceProfile("cuda")


def roles(cfg, device):
    return memory_estimate.roles(cfg, make_job_plan(cfg), device)


def check_memory(cfg, device, available):
    return memory_estimate.check_memory(cfg, make_job_plan(cfg), device, available)


@pytest.fixture
def job(tmp_path, tiny_models):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "red cat"}) + "\n")
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps({"model": {"policy": str(tiny_models["policy"])}, "data": {"prompts": str(prompts)},
                                "reward": {"model_dir": str(tiny_models["reward"])},
                                "rollout": {"engine": {"dtype": "float32"}}, "learner": {"dtype": "float32"}}))
    return lambda *overrides: load_config(str(path), list(overrides))


def test_forty_workers_on_a_24_gib_box_are_refused_in_one_line_and_one_worker_fits(job):
    lines = check_memory(job("rollout.num_workers=40"), CPU, 24 * GiB)
    assert len(lines) == 1 and lines[0].startswith("rollout.num_workers=40: the job needs at least "), lines
    assert "rollout 40 x 0.7" in lines[0] and "but this machine has 24.0 GiB available" in lines[0], lines[0]
    assert check_memory(job(), CPU, 24 * GiB) == []


def test_the_floor_counts_each_process_and_its_weights_kv_cache_and_optimizer_on_the_host(job, tiny_models):
    cfg = job("rollout.num_workers=3", "learner.num_ranks=2", "learner.rl.algorithm=grpo", "rollout.sampling.n=2")
    p = parameters(tiny_models["policy"])
    assert p > 0
    (_, workers, worker), (_, ranks, rank), (_, replicas, replica) = roles(cfg, CPU)
    assert (workers, ranks, replicas) == (3, 2, 1)
    assert worker > BASE["rollout"] + 4 * p  # + the KV cache
    # fp32 weights and gradients, AdamW's two moments (ZeRO-0: not sharded), the frozen reference (kl_coef > 0)
    assert rank == pytest.approx(BASE["learner"] + p * (4 + 4 + 8 + 4))
    assert replica == pytest.approx(BASE["reward"] + 4 * parameters(tiny_models["reward"]))
    # PPO adds the critic (from the policy here): weights, gradients and moments
    assert roles(job("learner.rl.algorithm=ppo"), CPU)[1][2] == pytest.approx(rank + p * (4 + 4 + 8))
    need = FIXED + 3 * worker + 2 * rank + replica
    assert check_memory(cfg, CPU, need) == [] and check_memory(cfg, CPU, need - 1) != []
    # on a GPU profile the weights, KV cache and optimizer are in GPU memory: the processes remain
    assert [each for _, _, each in roles(cfg, CUDA)] == [BASE["rollout"], BASE["learner"], BASE["reward"]]


def test_weights_are_counted_from_the_files_at_their_stored_dtype(tmp_path, tiny_models):
    model = tmp_path / "m"
    shutil.copytree(tiny_models["policy"], model)
    for f in model.glob("*.safetensors"):
        f.unlink()
    with open(model / "model.safetensors", "wb") as f:
        f.truncate(2 * GiB)  # sparse: 2 GiB apparent, nothing written
    hf = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**hf, "torch_dtype": "bfloat16"}))
    assert parameters(str(model)) == GiB  # 2 bytes each
