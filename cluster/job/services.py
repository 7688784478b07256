"""Starts (and stops) the services a job drives: reward app, learner group, weight sync, rollout pool.

Order matters for failing fast: the reward service is deployed and probed with one request before
anything heavy starts, so a reward that cannot score stops the job in seconds, not after the
learner has compiled and the engines have loaded.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cluster.config import JobConfig
from cluster.errors import JobFailed, one_line
from cluster.job.weight_sync import WeightSync
from contract.devices import DeviceProfile


def learner_context(cfg: JobConfig) -> dict:
    """What the learner must know of the rollouts and the loop, which its own config does not hold
    (LearnerGroup's keyword arguments): the sampler's temperature (every pass scores at it), whether
    the loop is async (rollout correction's auto mode), the sampler's max_new_tokens (seq_sum_norm's
    constant, the overlong penalty's L_max), and the oldest policy lag a step accepts: exactly what the
    loop lets through (loop.max_staleness when async; 0 when sync)."""
    s = cfg.rollout.sampling
    return dict(sampling_temperature=s.temperature, async_rollouts=cfg.loop.mode == "async",
                max_new_tokens=s.max_new_tokens, max_staleness=cfg.loop.max_staleness if cfg.loop.mode == "async" else 0)


def start_reward(cfg: JobConfig, store_dir: str, device: DeviceProfile, review: dict | None = None):
    from reward_service import app
    from reward_service.client import reward_errors

    client = app.deploy(cfg.reward, store_dir, name="reward", device=device, **(review or {}))
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


@dataclass
class Services:
    """The job's running services, started in dependency order by `start_services`: the reward app,
    the learner group, the weight sync (which owns what the learner has published), the pool."""

    reward: object = None    # reward_service.client.RewardClient
    learner: object = None   # learner.group.LearnerGroup
    sync: object = None      # cluster.job.weight_sync.WeightSync
    pool: object = None      # actors.pool.RolloutPool

    def current_weights(self):
        """What a new or replacement rollout worker loads first: the sync's latest publish (None
        before the learner is up, or while the weights are the initial checkpoint)."""
        return self.sync.current_weights() if self.sync is not None else None

    def publish_weights(self) -> float:
        """Bring every rollout worker to the learner's version; seconds it took."""
        return self.sync.publish(self.pool)


def start_services(cfg: JobConfig, device: DeviceProfile, store_dir: str, log=print,
                   review: dict | None = None) -> Services:
    """Reward first (cheap, and the likeliest to be misconfigured), then the learner and the pool
    together (both spend their start on process spawns and imports, which overlap well; the pool
    asks `Services.current_weights` only for workers it adds later), then the weight sync."""
    from actors.pool import RolloutPool
    from learner.group import LearnerGroup

    ns = cfg.ray.namespace
    services = Services()

    def learner():
        t0 = time.perf_counter()
        services.learner = LearnerGroup(cfg.learner, cfg.model.policy, device, critic_dir=cfg.learner.critic_model,
                                        seed=cfg.seed, namespace=ns, **learner_context(cfg))
        log(f"learner group up: {cfg.learner.num_ranks} rank(s), ZeRO-{cfg.learner.zero_stage} "
            f"({time.perf_counter() - t0:.1f}s)")

    def pool():
        t0 = time.perf_counter()
        services.pool = RolloutPool(cfg.rollout, cfg.model.policy, device, weights_source=services.current_weights,
                                    namespace=ns, log=log)
        log(f"rollout pool up: {services.pool.num_workers} worker(s) ({time.perf_counter() - t0:.1f}s)")

    try:
        t0 = time.perf_counter()
        services.reward = start_reward(cfg, store_dir, device, review)  # review: what the review page reads
        log(f"reward service up ({time.perf_counter() - t0:.1f}s) at {services.reward.http_url}")
        with ThreadPoolExecutor(2, thread_name_prefix="start") as ex:
            futures = [ex.submit(learner), ex.submit(pool)]
        for f in futures:
            f.result()
        services.sync = WeightSync(services.learner, cfg.learner.weight_sync, device.collective_backend,
                                   cfg.learner.sync_timeout_s, log=log)
    except BaseException:
        stop_services(services)
        raise
    return services


def stop_services(services: Services) -> None:
    """Best effort, in reverse start order; never raises (it runs on failure paths)."""
    if services.sync is not None and services.pool is not None:
        _quietly(lambda: services.sync.leave(services.pool))
    if services.pool is not None:
        _quietly(services.pool.shutdown)
    if services.learner is not None:
        _quietly(services.learner.shutdown)
    if services.reward is not None:
        from reward_service import app

        _quietly(lambda: app.shutdown("reward"))


def _quietly(fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001
        pass

