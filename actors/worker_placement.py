"""Where a rollout worker may run and how the pool waits for it to be placed (placement by role).

A worker reserves its CPUs/GPUs plus `rollout.resources` (custom resources that only rollout
nodes offer; contract.placement) and is scheduled with Ray's SPREAD strategy, so a fleet spreads
over the rollout nodes instead of piling onto the first. Its constructor does no work (the engine
loads in `start_engine`), so the first answered `ping` means "placed and running"; until then the
worker is waiting for a node, and past `rollout.placement_timeout_s` the pool says so once.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray

from actors.config import RolloutConfig
from contract.devices import DeviceProfile
from contract.placement import actor_resources, bundle

POLL_S = 0.5  # how often a waiting start looks at its pings, cancellation and deadlines


class Cancelled(Exception):
    """The worker was removed (scale-down, shutdown) while it was still starting."""


def worker_options(wid: str, cfg: RolloutConfig, device: DeviceProfile, namespace: str | None) -> dict:
    opts = dict(name=wid, runtime_env={"env_vars": device.actor_env(cfg.threads_per_worker)},
                scheduling_strategy="SPREAD",
                **actor_resources(device, cfg.cpus_per_worker, cfg.gpus_per_worker, cfg.resources))
    if namespace is not None:
        opts["namespace"] = namespace
    return opts


def worker_bundle(cfg: RolloutConfig, device: DeviceProfile) -> dict[str, float]:
    """One worker's reservation as a bundle (for messages and autoscaler requests)."""
    return bundle(device, cfg.cpus_per_worker, cfg.gpus_per_worker, cfg.resources)


def wait_placed(started: list[tuple[str, Any]], cfg: RolloutConfig, device: DeviceProfile,
                deadline: float | None, wanted: Callable[[str], bool], warn: Callable[[str], None]) -> dict:
    """Block until every worker answers `ping` (placed on a node, process up); {wid: ping}.

    A worker not placed after `cfg.placement_timeout_s` is named once through `warn`; then it keeps
    waiting, until `deadline` (monotonic; None: no limit) raises TimeoutError, or `wanted(wid)`
    turns False (removed meanwhile) and raises Cancelled. A worker that dies raises its error."""
    t0 = time.monotonic()
    pending = {h.ping.remote(): wid for wid, h in started}
    answers: dict[str, dict] = {}
    warned = False
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=POLL_S)
        for ref in ready:
            answers[pending.pop(ref)] = ray.get(ref)  # RayActorError: died before it was up
        gone = [wid for wid in pending.values() if not wanted(wid)]
        if gone:
            raise Cancelled(", ".join(gone))
        now = time.monotonic()
        if pending and not warned and now - t0 > cfg.placement_timeout_s:
            warned = True
            warn(f"rollout worker(s) {', '.join(sorted(pending.values()))}: not running after "
                 f"{cfg.placement_timeout_s:.0f}s (rollout.placement_timeout_s): no node with free "
                 f"{worker_bundle(cfg, device)} has taken it yet (or its process is still starting); still waiting, "
                 f"the job goes on without it")
        if pending and deadline is not None and now > deadline:
            raise TimeoutError(f"rollout pool: worker start took longer than rollout.start_timeout_s="
                               f"{cfg.start_timeout_s} (no node for {', '.join(sorted(pending.values()))})")
    return answers


def name_taken(name: str, namespace: str | None) -> bool:
    try:
        ray.get_actor(name, namespace=namespace)
        return True
    except ValueError:
        return False

