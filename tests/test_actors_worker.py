"""One real RolloutWorker actor (vLLM on CPU, tiny model): rows, logprobs, both weight transports."""
import os

import pyarrow as pa
import pytest
import ray
import torch

from actors.config import SamplingConfig
from actors.prompts import PromptError
from actors.worker import RolloutWorker
from contract.devices import DeviceProfile
from contract.experience import ROLLOUT_SCHEMA, check_lengths
from contract.weights import GroupAddress, StaleVersionError
from support_rollout import GREEDY, keys, prompts, put_state, rollout_cfg, start_sender
from contract.net import free_port


TIMEOUT = 120


@pytest.fixture(scope="module")
def worker(ray_local, tiny_models):
    cfg = rollout_cfg()
    w = RolloutWorker.options(num_cpus=1, runtime_env={"env_vars": DeviceProfile("cpu").actor_env(1)}).remote(
        "w-test", str(tiny_models["policy"]), cfg, "cpu")
    ping = ray.get(w.ping.remote(), timeout=TIMEOUT)
    assert ping == {"worker_id": "w-test", "version": 0, "alive": True, "pid": ping["pid"]} and ping["pid"] != os.getpid()
    yield w
    ray.kill(w)


def gen(worker, table, sampling=None):
    return pa.Table.from_batches([ray.get(worker.generate.remote(table, sampling), timeout=TIMEOUT)])


def greedy(worker, table):
    return gen(worker, table, GREEDY)["response_ids"].to_pylist()


def test_rows_are_one_per_sample_in_the_rollout_schema(worker):
    t = gen(worker, prompts(3), SamplingConfig(max_new_tokens=6, n=3, seed=1))
    assert t.schema == ROLLOUT_SCHEMA
    assert sorted(keys(t)) == [(f"p{i}", s) for i in range(3) for s in range(3)]
    check_lengths(t)
    assert all(1 <= len(r) <= 6 for r in t["response_ids"].to_pylist())
    assert set(t["policy_version"].to_pylist()) == {0} and set(t["worker_id"].to_pylist()) == {"w-test"}
    assert set(t["finish_reason"].to_pylist()) <= {"length", "stop"}
    m = ray.get(worker.metrics.remote(), timeout=TIMEOUT)
    assert m["samples"] >= 9 and m["tokens"] >= 9 and m["tokens_per_s"] > 0


def test_same_seed_same_samples(worker):
    s = SamplingConfig(max_new_tokens=8, n=2, seed=7)
    assert gen(worker, prompts(2), s)["response_ids"].to_pylist() == gen(worker, prompts(2), s)["response_ids"].to_pylist()


def test_ping_answers_while_a_long_generate_runs(worker):
    running = worker.generate.remote(prompts(16), SamplingConfig(max_new_tokens=100, n=8, seed=0))
    assert ray.get(worker.ping.remote(), timeout=TIMEOUT)["alive"]
    ready, _ = ray.wait([running], timeout=0)
    assert not ready  # the health call overtook the generate queued before it
    assert ray.get(running, timeout=TIMEOUT).num_rows == 16 * 8


def test_logprobs_match_a_transformers_forward(worker, tiny_models):
    from transformers import AutoModelForCausalLM

    t = gen(worker, prompts(4), SamplingConfig(max_new_tokens=10, n=2, seed=3, temperature=1.0))
    model = AutoModelForCausalLM.from_pretrained(tiny_models["policy"], dtype=torch.float32).eval()
    worst = 0.0
    for row in t.to_pylist():
        ids = torch.tensor([row["prompt_ids"] + row["response_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        p = len(row["prompt_ids"])
        ref = logp[p - 1:-1].gather(1, torch.tensor(row["response_ids"])[:, None])[:, 0]
        worst = max(worst, (ref - torch.tensor(row["logprobs"])).abs().max().item())
    assert worst < 1e-4


def test_object_store_update_changes_outputs_and_restore_reproduces_them(worker, tiny_models):
    table = prompts(4)
    before = greedy(worker, table)
    assert ray.get(worker.update_weights.remote(1, put_state(tiny_models["policy"], perturb_seed=1)),
                   timeout=TIMEOUT) == 1
    perturbed = gen(worker, table, GREEDY)
    assert perturbed["response_ids"].to_pylist() != before
    assert set(perturbed["policy_version"].to_pylist()) == {1}
    with pytest.raises(StaleVersionError, match="older than the current version 1"):
        ray.get(worker.update_weights.remote(0, put_state(tiny_models["policy"])), timeout=TIMEOUT)
    assert ray.get(worker.update_weights.remote(2, put_state(tiny_models["policy"])), timeout=TIMEOUT) == 2
    assert greedy(worker, table) == before


def test_broadcast_from_a_real_sender_matches_the_object_store_path(worker, tiny_models):
    """A sender process joins the side gloo group as rank 0 and broadcasts; the group is then re-formed
    under a new name (as after a membership change) and used again."""
    policy = str(tiny_models["policy"])
    table = prompts(4)
    version = ray.get(worker.ping.remote(), timeout=TIMEOUT)["version"]
    ray.get(worker.update_weights.remote(version + 1, put_state(policy, perturb_seed=5)), timeout=TIMEOUT)
    want_perturbed = greedy(worker, table)
    ray.get(worker.update_weights.remote(version + 2, put_state(policy)), timeout=TIMEOUT)
    want_original = greedy(worker, table)
    assert want_perturbed != want_original

    sender = start_sender(policy)
    try:
        for i, (seed, want) in enumerate([(5, want_perturbed), (None, want_original)]):
            v = version + 3 + i
            manifest = ray.get(sender.manifest.remote(seed), timeout=TIMEOUT)
            assert len(manifest.buckets) > 1  # several flat buckets, not one per tensor
            addr = GroupAddress("127.0.0.1", free_port(), 2, f"rollout-test-wsync-{i}", timeout_s=60)
            sent = sender.send.remote(addr, manifest, seed)
            ray.get(worker.join_weight_group.remote(addr, 1), timeout=TIMEOUT)
            assert ray.get(worker.receive_weights.remote(v, manifest), timeout=TIMEOUT) == v
            assert ray.get(sent, timeout=TIMEOUT)
            ray.get(sender.leave.remote(), timeout=TIMEOUT)
            ray.get(worker.leave_weight_group.remote(), timeout=TIMEOUT)
            out = gen(worker, table, GREEDY)
            assert out["response_ids"].to_pylist() == want
            assert set(out["policy_version"].to_pylist()) == {v}
    finally:
        ray.kill(sender)


def test_receive_without_a_group_is_a_clear_error(worker, tiny_models):
    with pytest.raises(RuntimeError, match="receive_weights before join_weight_group"):
        ray.get(worker.receive_weights.remote(99, None), timeout=TIMEOUT)


@pytest.mark.parametrize("table, match", [
    (pa.table({"prompt_id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}), "empty batch"),
    (pa.table({"prompt_id": ["a"], "prompt": [7]}), "prompts.prompt: expected string values"),
    (pa.table({"prompt_id": ["long"], "prompt": [" ".join(["red"] * 400)]}), "prompt 'long': 400 tokens.*max_model_len=128"),
])
def test_bad_input_is_a_clear_error_from_the_worker(worker, table, match):
    with pytest.raises(PromptError, match=match):
        ray.get(worker.generate.remote(table), timeout=TIMEOUT)
    assert ray.get(worker.ping.remote(), timeout=TIMEOUT)["alive"]
