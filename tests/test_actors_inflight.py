"""In-flight weight updates on a real pool of vLLM workers (tiny model, CPU): a new policy version loads
between two engine steps while responses are mid-generation, and every token records the version
that sampled it (`token_versions`).

What must hold, checked against a transformers forward of each version's weights: every token's
logprob is the logprob of the version recorded for it. A token sampled under new weights over KV
computed by the old ones (vLLM's prefix cache, or a running sequence's own KV), or weights loaded
while a forward runs, gives a logprob that matches no version, and fails these tests.
"""
import threading
import time

import pytest
import ray
import torch

from actors.config import EngineConfig, SamplingConfig
from actors.pool import RolloutPool
from contract.devices import DeviceProfile
from support_rollout import hf_state, keys, prompts, put_state, rollout_cfg

pytestmark = pytest.mark.component

LONG = SamplingConfig(max_new_tokens=160, n=4, seed=0, temperature=1.0)
VERSIONS = {1: 11, 2: 12, 3: 13, 4: 14}  # policy version -> perturb seed of its weights (0: the checkpoint)


@pytest.fixture(scope="module")
def published():
    return {"current": None}


@pytest.fixture(scope="module")
def pool(ray_local, tiny_models, published):
    cfg = rollout_cfg(num_workers=2, inflight_updates=True,
                      engine=EngineConfig(max_model_len=256, kv_cache_bytes=32 << 20))
    p = RolloutPool(cfg, str(tiny_models["policy"]), DeviceProfile("cpu"), weights_source=lambda: published["current"],
                    name_prefix="inflight-test", namespace="rlhf-tests")
    yield p
    p.shutdown()


@pytest.fixture(scope="module")
def scorer(tiny_models):
    """version -> that version's per-position log-softmax for a sequence (a transformers forward)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["policy"], dtype=torch.float32).eval()
    states = {0: hf_state(tiny_models["policy"])} | {v: hf_state(tiny_models["policy"], s) for v, s in VERSIONS.items()}

    def logprobs(version: int, ids: list[int]) -> torch.Tensor:
        model.load_state_dict(states[version])
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return logprobs


def publish(pool, published, tiny_models, version: int) -> None:
    published["current"] = (version, put_state(tiny_models["policy"], VERSIONS[version]))
    pool.update_weights(*published["current"])


def engine_steps(pool) -> list[int]:
    return [ray.get(h.metrics.remote(), timeout=60)["engine_steps"] for _, h in pool.workers()]


def generate_with_updates(pool, table, sampling, updates, one_version=False):
    """`pool.generate` in a thread; each update runs once every worker has stepped its engine 10 more
    times (so it lands mid-response). Returns the table and, per update, whether the generate was
    still running when the update returned."""
    out, during = [], []
    th = threading.Thread(target=lambda: out.append(pool.generate(table, sampling, one_version)))
    th.start()
    for update in updates:
        start = engine_steps(pool)
        deadline = time.monotonic() + 120
        while any(now < s + 10 for now, s in zip(engine_steps(pool), start)) and th.is_alive():
            assert time.monotonic() < deadline, "the engines did not step"
            time.sleep(0.05)
        update()
        during.append(th.is_alive())
    th.join(300)
    assert out, "generate did not return"
    return out[0], during


def check_each_token_is_its_versions(table, scorer) -> int:
    """Each token's logprob equals its recorded version's (1e-3; fp32 vLLM vs transformers measured
    7e-5) and, where a response spans versions, differs from the other versions' (the test can
    tell them apart). Returns how many responses spanned versions."""
    spanning = 0
    for row in table.to_pylist():
        tags, resp, P = row["token_versions"], row["response_ids"], len(row["prompt_ids"])
        assert len(tags) == len(resp) and tags == sorted(tags) and row["policy_version"] == tags[0], row["prompt_id"]
        ids = row["prompt_ids"] + resp
        for v in sorted(set(tags)):
            lp = scorer(v, ids)[P - 1:-1].gather(1, torch.tensor(resp)[:, None])[:, 0]
            mine = torch.tensor([t == v for t in tags])
            gap = (lp - torch.tensor(row["logprobs"])).abs()
            assert gap[mine].max().item() < 1e-3, (row["prompt_id"], row["sample_idx"], v, gap[mine].max().item())
            if not mine.all():
                assert gap[~mine].median().item() > 0.05  # the versions are told apart
        spanning += len(set(tags)) > 1
    return spanning


def test_versions_loaded_mid_generation_tag_each_token_and_each_logprob_is_its_versions(pool, published,
                                                                                        tiny_models, scorer):
    table, during = generate_with_updates(pool, prompts(8, prefix="a"), LONG,
                                          [lambda: publish(pool, published, tiny_models, 1),
                                           lambda: publish(pool, published, tiny_models, 2)])
    assert during == [True, True]  # each update returned while the generate was still running
    assert keys(table) == [(f"a{i}", s) for i in range(8) for s in range(4)]
    assert check_each_token_is_its_versions(table, scorer) > 0
    assert {v for tags in table.column("token_versions").to_pylist() for v in tags} == {0, 1, 2}
    assert [ray.get(h.ping.remote(), timeout=60)["version"] for _, h in pool.workers()] == [2, 2]


def test_a_worker_killed_after_an_update_mid_generation_loses_and_repeats_nothing(pool, published, tiny_models,
                                                                                  scorer):
    """Its chunk is redone by the survivor or the replacement (which loads the current version first):
    every (prompt, sample) once, every token still exactly its version's."""
    victim = sorted(pool.worker_ids())[0]

    def kill():
        ray.kill(ray.get_actor(victim, namespace="rlhf-tests"))

    table, _ = generate_with_updates(pool, prompts(8, prefix="k"), LONG,
                                     [lambda: publish(pool, published, tiny_models, 3), kill])
    assert keys(table) == [(f"k{i}", s) for i in range(8) for s in range(4)]
    check_each_token_is_its_versions(table, scorer)
    assert victim not in pool.worker_ids()


def test_one_version_calls_keep_one_version_and_load_the_update_after(pool, published, tiny_models):
    """A held-out eval's generate: an update arriving mid-call waits for the call to return."""
    before = max(ray.get(h.ping.remote(), timeout=60)["version"] for _, h in pool.workers())
    table, during = generate_with_updates(pool, prompts(4, prefix="e"), LONG,
                                          [lambda: publish(pool, published, tiny_models, 4)], one_version=True)
    assert during == [True]
    assert {v for tags in table.column("token_versions").to_pylist() for v in tags} == {before}
    assert set(table.column("policy_version").to_pylist()) == {before}
    assert [ray.get(h.ping.remote(), timeout=60)["version"] for _, h in pool.workers()] == [4] * pool.num_workers
