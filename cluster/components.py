"""Starts (and stops) the three services a job drives: reward app, learner group, rollout pool.

Order matters for failing fast: the reward service is deployed and probed with one request before
anything heavy starts, so a reward that cannot score stops the job in seconds, not after the
learner has compiled and the engines have loaded.
"""
from __future__ import annotations

import time

from cluster.config import JobConfig
from cluster.errors import JobFailed, one_line
from cluster.loop import Parts
from cluster.weight_sync import WeightSync
from contract.devices import DeviceProfile


def start_reward(cfg: JobConfig, store_dir: str):
    from reward_service import app

    client = app.deploy(cfg.reward, store_dir, name="reward")
    try:
        probe = client.score(["probe"], ["probe response"])
    except Exception as e:  # noqa: BLE001 - the client already retried
        app.shutdown("reward")
        raise JobFailed(f"reward service cannot score (probe request failed): {one_line(e)}") from None
    if probe.num_rows != 1:
        app.shutdown("reward")
        raise JobFailed(f"reward service returned {probe.num_rows} rows for 1 probe request")
    return client


def start_parts(cfg: JobConfig, device: DeviceProfile, store_dir: str, log=print) -> Parts:
    from actors.pool import RolloutPool
    from learner.group import LearnerGroup

    ns = cfg.ray.namespace
    parts = Parts(pool=None, learner=None, reward=None, sync=None)
    try:
        t0 = time.perf_counter()
        parts.reward = start_reward(cfg, store_dir)
        log(f"reward service up ({time.perf_counter() - t0:.1f}s) at {parts.reward.http_url}")
        t0 = time.perf_counter()
        parts.learner = LearnerGroup(cfg.learner, cfg.model.policy, device, critic_dir=cfg.learner.critic_model,
                                     seed=cfg.seed, namespace=ns)
        log(f"learner group up: {cfg.learner.num_ranks} rank(s), ZeRO-{cfg.learner.zero_stage} "
            f"({time.perf_counter() - t0:.1f}s)")
        sync = WeightSync(parts.learner, None, cfg.learner.weight_sync, device.collective_backend,
                          cfg.learner.sync_timeout_s, log=log)
        t0 = time.perf_counter()
        parts.pool = RolloutPool(cfg.rollout, cfg.model.policy, device, weights_source=sync.weights_source,
                                 namespace=ns)
        sync.pool = parts.pool
        parts.sync = sync
        log(f"rollout pool up: {parts.pool.num_workers} worker(s) ({time.perf_counter() - t0:.1f}s)")
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

