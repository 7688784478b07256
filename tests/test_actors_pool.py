"""A real pool of vLLM workers: exactly-once tables under scaling, worker death and weight updates."""
import os
import signal
import threading
import time

import pyarrow as pa
import pytest
import ray

from actors.config import SamplingConfig
from actors.pool import RolloutPool
from actors.prompts import PromptError
from contract.devices import DeviceProfile
from contract.experience import check_lengths
from support_rollout import keys, prompts, put_state, rollout_cfg


LONG = SamplingConfig(max_new_tokens=48, n=4, seed=0)  # enough work (~12k tokens) to act mid-run


@pytest.fixture(scope="module")
def published():
    """What the controller would hand out as the current policy: (version, ObjectRef) or None."""
    return {"current": None}


@pytest.fixture(scope="module")
def pool(ray_local, tiny_models, published):
    p = RolloutPool(rollout_cfg(num_workers=2, chunks_per_worker=4), str(tiny_models["policy"]), DeviceProfile("cpu"),
                    weights_source=lambda: published["current"], name_prefix="rollout-test", namespace="rlhf-tests")
    yield p
    p.shutdown()


def wait_for(cond, timeout=120):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def assert_exactly_once(table, n_prompts, n, prefix="p"):
    assert keys(table) == [(f"{prefix}{i}", s) for i in range(n_prompts) for s in range(n)]
    check_lengths(table)


def test_two_workers_share_a_batch_exactly_once(pool):
    assert pool.worker_ids() == ["rollout-test-0", "rollout-test-1"]
    assert ray.get_actor("rollout-test-0", namespace="rlhf-tests") is not None  # named, visible in the dashboard
    t = pool.generate(prompts(24), SamplingConfig(max_new_tokens=8, n=3, seed=0))
    assert_exactly_once(t, 24, 3)
    assert set(t["worker_id"].to_pylist()) == {"rollout-test-0", "rollout-test-1"}
    m = pool.metrics()
    assert m["num_workers"] == 2 and m["samples"] >= 72 and set(m["workers"]) == set(pool.worker_ids())


def test_bad_input_fails_fast_through_the_pool(pool):
    with pytest.raises(PromptError, match="empty batch"):
        pool.generate(pa.table({"prompt_id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}))
    with pytest.raises(PromptError, match="expected string values"):
        pool.generate(pa.table({"prompt_id": ["a"], "prompt": [1.5]}))
    with pytest.raises(PromptError, match="prompt 'big': .*max_model_len=128"):
        pool.generate(pa.table({"prompt_id": ["ok", "big"], "prompt": ["red", " ".join(["cat"] * 300)]}))


def test_add_and_remove_workers_while_generating(pool, tiny_models, published):
    """Generations keep running in a thread while a third worker joins and one leaves; each table is
    exactly once, and the new worker starts on the current published version."""
    published["current"] = (3, put_state(tiny_models["policy"]))
    pool.update_weights(3, published["current"][1])
    epoch0 = pool.membership_epoch
    tables, errors, stop = [], [], threading.Event()

    def loop():
        try:
            while not stop.is_set() or len(tables) < 2:
                tables.append(pool.generate(prompts(32), LONG))
        except Exception as e:  # noqa: BLE001 - re-raised below in the test thread
            errors.append(e)

    th = threading.Thread(target=loop)
    th.start()
    added = pool.add_workers(1)
    assert ray.get(ray.get_actor(added[0], namespace="rlhf-tests").ping.remote(), timeout=60)["version"] == 3
    n_before = len(tables)
    wait_for(lambda: len(tables) >= n_before + 2 or errors)  # a whole call started after the add
    removed = pool.remove_workers(1)
    stop.set()
    th.join(300)
    assert not errors, errors
    assert not th.is_alive()
    assert pool.num_workers == 2 and removed[0] not in pool.worker_ids()
    assert pool.membership_epoch == epoch0 + 2
    for t in tables:
        assert_exactly_once(t, 32, 4)
        assert set(t["policy_version"].to_pylist()) == {3}
    assert any(added[0] in t["worker_id"].to_pylist() for t in tables)


def test_killed_worker_mid_generate_is_replaced_and_rows_stay_exactly_once(pool):
    before = set(pool.worker_ids())
    epoch0 = pool.membership_epoch
    out = []
    th = threading.Thread(target=lambda: out.append(pool.generate(prompts(64, prefix="k"), LONG)))
    th.start()
    time.sleep(0.3)  # dispatched (or about to be): either way the pool meets the death inside generate
    victim = sorted(before)[0]
    ray.kill(ray.get_actor(victim, namespace="rlhf-tests"))
    th.join(300)
    assert out, "generate did not return"
    assert_exactly_once(out[0], 64, 4, prefix="k")
    wait_for(lambda: pool.num_workers == 2)
    assert victim not in pool.worker_ids()
    assert pool.membership_epoch == epoch0 + 2  # death noticed by generate, then the replacement joined
    replacement = (set(pool.worker_ids()) - before).pop()
    assert int(replacement.rsplit("-", 1)[1]) > max(int(w.rsplit("-", 1)[1]) for w in before)  # never reused
    assert ray.get(ray.get_actor(replacement, namespace="rlhf-tests").ping.remote(), timeout=60)["version"] == 3
    assert_exactly_once(pool.generate(prompts(8), SamplingConfig(max_new_tokens=4, n=2)), 8, 2)


def test_a_hung_worker_is_replaced_and_its_chunk_redone_exactly_once(pool):
    """SIGSTOP freezes a worker's process mid-generate (alive to Ray, never answering): past
    rollout.request_timeout_s the pool kills it, re-dispatches its chunk and starts a replacement."""
    before = set(pool.worker_ids())
    victim = sorted(before)[0]
    pid = ray.get(ray.get_actor(victim, namespace="rlhf-tests").ping.remote(), timeout=60)["pid"]
    out = []
    pool.cfg.request_timeout_s = 8.0  # a legit chunk here takes well under a second
    try:
        th = threading.Thread(target=lambda: out.append(pool.generate(prompts(64, prefix="h"), LONG)))
        th.start()
        time.sleep(0.3)
        os.kill(pid, signal.SIGSTOP)
        th.join(300)
    finally:
        pool.cfg.request_timeout_s = 120.0
    assert out, "generate did not return"
    assert_exactly_once(out[0], 64, 4, prefix="h")
    wait_for(lambda: pool.num_workers == 2)
    assert victim not in pool.worker_ids()
    wait_for(lambda: not running(pid), timeout=60)  # killed, not left frozen


def test_a_worker_hung_while_loading_weights_is_replaced_and_the_version_re_sent(pool, tiny_models, published):
    """A hang during a weight load is met as a hang in generate is: past rollout.request_timeout_s the
    worker is killed and replaced, the update returns instead of failing the job, and the replacement
    serves the version that was being loaded (it reads the publisher's current weights first)."""
    wait_for(lambda: pool.num_workers == 2)
    victim = sorted(pool.worker_ids())[0]
    pid = ray.get(ray.get_actor(victim, namespace="rlhf-tests").ping.remote(), timeout=60)["pid"]
    published["current"] = (4, put_state(tiny_models["policy"]))
    os.kill(pid, signal.SIGSTOP)
    pool.cfg.request_timeout_s = 8.0
    try:
        pool.update_weights(4, published["current"][1])
    finally:
        pool.cfg.request_timeout_s = 120.0
    assert victim not in pool.worker_ids()
    wait_for(lambda: pool.num_workers == 2)
    versions = [ray.get(h.ping.remote(), timeout=60)["version"] for _, h in pool.workers()]
    assert versions == [4, 4]
    assert set(pool.generate(prompts(8, prefix="v"), LONG)["policy_version"].to_pylist()) == {4}
    wait_for(lambda: not running(pid), timeout=60)  # killed, not left frozen


def running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_chunk_that_keeps_timing_out_is_a_clear_error(pool):
    heavy = SamplingConfig(max_new_tokens=100, n=8, seed=0)  # every chunk: thousands of tokens, far over 50 ms
    pool.cfg.request_timeout_s, pool.cfg.max_retries = 0.05, 0
    try:
        with pytest.raises(RuntimeError, match=r"failed on a worker 1 time\(s\) \(rollout.max_retries=0\); last: "
                                               r"rollout worker rollout-test-\d+: no result within "
                                               r"rollout.request_timeout_s=0.05"):
            pool.generate(prompts(64, prefix="t"), heavy)
    finally:
        pool.cfg.request_timeout_s, pool.cfg.max_retries = 120.0, 3
    wait_for(lambda: pool.num_workers == 2)  # the late workers were replaced


def test_a_pool_scaled_to_zero_refuses_work_instead_of_waiting(pool):
    """Last in the module: it empties the shared pool."""
    with pytest.raises(ValueError, match=r"remove_workers: k must be in 0\.\.2"):
        pool.remove_workers(3)
    pool.scale_to(0)
    assert pool.num_workers == 0 and pool.workers() == []
    with pytest.raises(RuntimeError, match="no live workers left to generate 2 prompt"):
        pool.generate(prompts(2))
