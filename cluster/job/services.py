"""Starts (and stops) the services a job drives: reward app, learner group, weight sync, rollout pool.

All three start at once: each spends its start on process spawns and imports, which overlap (about
a quarter off a job's start on a 2-core box). Failing fast is kept: the first of the three to fail
stops the job then, without waiting for the learner or the engines, which are shut down as soon as
their start returns (the reward service is probed with one request as soon as it is up, so a reward
that cannot score is such a failure). Only a reward app still starting is waited for (bounded), since
Serve's actors outlive the job: it stops itself when its start returns.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster.config import JobConfig
from cluster.errors import JobFailed, one_line
from cluster.job.dtypes import resolve_job_dtypes
from cluster.job.weight_sync import WeightSync
from cluster.plan import JobPlan, make_job_plan
from contract.devices import DeviceProfile

if TYPE_CHECKING:  # imported where they start: each pulls in a heavy stack (Serve, DeepSpeed, vLLM)
    from actors.pool import RolloutPool
    from learner.group import LearnerGroup
    from reward_service.client import RewardClient


# Seconds a failed start waits for a reward app still starting to return and stop itself: a deploy that
# places its replicas takes ~10-40 s (2-core box, tiny reward model); a cluster's model load takes longer.
REWARD_STOP_WAIT_S = 180.0


def start_reward(cfg: JobConfig, store_dir: str, device: DeviceProfile, review: dict | None = None):
    from reward_service import app
    from reward_service.client import reward_errors

    client = app.deploy(cfg.reward, store_dir, name="reward", device=device, **(review or {}))
    try:
        # with a verifier, a probe it can check: a reference and a response every verifier accepts
        probe = (client.score(["probe"], ["1"], references=["1"]) if cfg.reward.verifier
                 else client.score(["probe"], ["probe response"]))
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
    """The job's running services, started by `start_services` from the job's plan: the reward app,
    the learner group, the pool, and the weight sync (which owns what the learner has published)."""

    plan: JobPlan  # what they are started from (cluster/plan.py)
    reward: RewardClient | None = None  # each None until it has started
    learner: LearnerGroup | None = None
    sync: WeightSync | None = None
    pool: RolloutPool | None = None

    def current_weights(self):
        """What a new or replacement rollout worker loads first: the sync's latest publish (None
        before the learner is up, or while the weights are the initial checkpoint)."""
        return self.sync.current_weights() if self.sync is not None else None

    def publish_weights(self) -> float:
        """Bring every rollout worker to the learner's version; seconds it took."""
        return self.sync.publish(self.pool)


def start_services(cfg: JobConfig, device: DeviceProfile, store_dir: str, log=print,
                   review: dict | None = None, plan: JobPlan | None = None) -> Services:
    """The reward app, the learner group and the pool start together (none needs another to start:
    `Services.current_weights` is None until the weight sync exists, and the pool's first workers load
    the initial checkpoint), then the weight sync, which joins the learner to the pool. The first start
    to fail ends it: what did start is stopped, a start still running stops its service itself when it
    returns (`abandoned`), and a reward app still starting is waited for (REWARD_STOP_WAIT_S).
    Caller's duty: transformers' lazy imports race in threads, so its tokenizer classes must be
    resolved before this is called (the controller reads the prompts first)."""
    # Imported here, before the threads, for the same reason.
    import reward_service.app  # start_reward's, and the reward's shutdown
    from actors.pool import RolloutPool
    from learner.group import LearnerGroup

    resolved, line = resolve_job_dtypes(cfg, device)  # rlhf train resolved `auto` already; this is for direct callers
    if resolved is not cfg:
        cfg = resolved
        log(line)
    ns = cfg.ray.namespace
    plan = plan or make_job_plan(cfg)  # rlhf train's preflight made it; this is for direct callers
    services = Services(plan=plan)
    lock, abandoned = threading.Lock(), threading.Event()

    def keep(field: str, service, stop) -> bool:
        with lock:
            if not abandoned.is_set():
                setattr(services, field, service)
                return True
        _quietly(stop)
        return False

    def reward():
        t0 = time.perf_counter()
        client = start_reward(cfg, store_dir, device, review)  # review: what the review page reads
        if keep("reward", client, lambda: reward_service.app.shutdown("reward")):
            log(f"reward service up ({time.perf_counter() - t0:.1f}s) at {client.http_url}")

    def learner():
        t0 = time.perf_counter()
        group = LearnerGroup(cfg.learner, cfg.model.policy, device, critic_dir=cfg.learner.critic_model,
                             seed=cfg.seed, namespace=ns, plan=plan.learner, max_staleness=plan.max_staleness)
        if keep("learner", group, group.shutdown):
            log(f"learner group up: {cfg.learner.num_ranks} rank(s), ZeRO-{cfg.learner.zero_stage} "
                f"({time.perf_counter() - t0:.1f}s)")

    def pool():
        t0 = time.perf_counter()
        rollout = RolloutPool(plan.rollout, cfg.model.policy, device, weights_source=services.current_weights,
                              namespace=ns, log=log)
        if keep("pool", rollout, rollout.shutdown):
            log(f"rollout pool up: {rollout.num_workers} worker(s) ({time.perf_counter() - t0:.1f}s)")

    def log_if_abandoned(start):
        if abandoned.is_set() and start.exception() is not None:
            log(f"after the failed start, a service's own start failed too: {one_line(start.exception())}")

    starting = ThreadPoolExecutor(3, thread_name_prefix="start")
    futures = [starting.submit(start) for start in (reward, learner, pool)]
    starting.shutdown(wait=False)
    failed = None  # the start whose failure ended it (the others' own failures are logged below)
    try:
        # The first failure ends the start; the order of `futures` decides which is named if several failed.
        wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f.done() and f.exception() is not None), None)
        if failed is not None:
            raise failed.exception()
        services.sync = WeightSync(services.learner, cfg.learner.weight_sync, device.collective_backend,
                                   cfg.learner.sync_timeout_s, log=log)
    except BaseException:
        with lock:
            abandoned.set()
        for f in futures:
            if f is not failed:
                f.add_done_callback(log_if_abandoned)
        stop_services(services)
        # Serve's actors are detached: a reward app still starting would outlive this process (the driver
        # kills the controller once the start has failed). Its start stops it when it returns.
        if not wait(futures[:1], timeout=REWARD_STOP_WAIT_S).done:  # futures[0]: the reward's start
            log(f"the reward app was still starting {REWARD_STOP_WAIT_S:.0f}s after the failure; stopping it")
            _quietly(lambda: reward_service.app.shutdown("reward"))
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

