"""Starts (and stops) the three services a job drives: reward app, learner group, rollout pool.

Order matters for failing fast: the reward service is deployed and probed with one request before
anything heavy starts, so a reward that cannot score stops the job in seconds, not after the
learner has compiled and the engines have loaded.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from cluster.config import JobConfig
from cluster.errors import JobFailed, one_line
from cluster.loop import Parts
from cluster.weight_sync import WeightSync
from contract.devices import DeviceProfile


def start_reward(cfg: JobConfig, store_dir: str):
    from reward_service import app
    from reward_service.client import reward_errors

    client = app.deploy(cfg.reward, store_dir, name="reward")
    try:
        probe = client.score(["probe"], ["probe response"])
    except Exception as e:  # noqa: BLE001 - the client already retried
        app.shutdown("reward")
        raise JobFailed(f"reward service cannot score (probe request failed): {one_line(e)}") from None
    if probe.num_rows != 1 or not probe.column("reward_valid")[0].as_py():
        app.shutdown("reward")
        why = "; ".join(reward_errors(probe)) or f"{probe.num_rows} rows, valid={probe.column('reward_valid')}"
        raise JobFailed(f"reward service cannot score (probe request invalid): {why}"[:400])
    return client


def start_parts(cfg: JobConfig, device: DeviceProfile, store_dir: str, log=print) -> Parts:
    """Reward first (cheap, and the likeliest to be misconfigured), then learner and pool together:
    both spend most of their start waiting on process spawns and imports, which overlap well."""
    from actors.pool import RolloutPool
    from learner.group import LearnerGroup

    ns = cfg.ray.namespace
    parts = Parts(pool=None, learner=None, reward=None, sync=None)
    parts.sync = WeightSync(None, None, cfg.learner.weight_sync, device.collective_backend,
                            cfg.learner.sync_timeout_s, log=log)

    def learner():
        t0 = time.perf_counter()
        parts.learner = parts.sync.learner = LearnerGroup(
            cfg.learner, cfg.model.policy, device, critic_dir=cfg.learner.critic_model, seed=cfg.seed, namespace=ns)
        log(f"learner group up: {cfg.learner.num_ranks} rank(s), ZeRO-{cfg.learner.zero_stage} "
            f"({time.perf_counter() - t0:.1f}s)")

    def pool():
        t0 = time.perf_counter()
        parts.pool = parts.sync.pool = RolloutPool(cfg.rollout, cfg.model.policy, device,
                                                   weights_source=parts.sync.weights_source, namespace=ns)
        log(f"rollout pool up: {parts.pool.num_workers} worker(s) ({time.perf_counter() - t0:.1f}s)")

    try:
        t0 = time.perf_counter()
        parts.reward = start_reward(cfg, store_dir)
        log(f"reward service up ({time.perf_counter() - t0:.1f}s) at {parts.reward.http_url}")
        with ThreadPoolExecutor(2, thread_name_prefix="start") as ex:
            futures = [ex.submit(learner), ex.submit(pool)]
        for f in futures:
            f.result()
    except BaseException:
        stop_parts(parts)
        raise
    return parts


def stop_parts(parts: Parts) -> None:
    """Best effort, in reverse start order; never raises (it runs on failure paths)."""
    if parts.sync is not None:
        _quietly(parts.sync.leave)
    if parts.pool is not None:
        _quietly(parts.pool.shutdown)
    if parts.learner is not None:
        _quietly(parts.learner.shutdown)
    if parts.reward is not None:
        from reward_service import app

        _quietly(lambda: app.shutdown("reward"))


def _quietly(fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001
        pass

