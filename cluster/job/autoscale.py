"""Ask Ray's autoscaler for room for the rollout fleet when `rlhf scale` asks for more than fits.

`ray.autoscaler.sdk.request_resources(bundles=[...])` is Ray's documented way to ask for capacity
ahead of demand: a standing request (each call replaces the last) that the autoscaler satisfies
at once, with nodes of whichever type offers the bundle's resources. One bundle per rollout
worker, with `rollout.resources`, so only rollout nodes are grown. Without an autoscaler (a fixed
cluster, the embedded demo) the request is recorded and nothing happens; the pool's pending
workers then wait for a node (`rollout.placement_timeout_s` names them) without stalling the loop.
"""
from __future__ import annotations

import math

import ray

from actors.config import RolloutConfig
from actors.worker_placement import worker_bundle
from contract.devices import DeviceProfile

_requested = False  # whether this process (the job's controller) holds a standing request


def room_for(bundle: dict[str, float]) -> int:
    """How many such bundles the alive nodes hold in total (used or not): the fleet size that fits."""
    total = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        total += min((math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0), default=0)
    return total


def request_rollout_capacity(cfg: RolloutConfig, device: DeviceProfile, workers: int) -> str | None:
    """Record a standing request for `workers` rollout bundles; a line to tell the user when the
    cluster holds fewer now (None when it fits)."""
    from ray.autoscaler.sdk import request_resources

    global _requested
    bundle = worker_bundle(cfg, device)
    request_resources(bundles=[bundle] * workers)
    _requested = True
    fits = room_for(bundle)
    if workers <= fits:
        return None
    return (f"rollout workers: the cluster holds {fits} x {bundle} now; asked the autoscaler for {workers} "
            f"(request_resources); the others start as nodes join, the loop goes on meanwhile")


def release_rollout_capacity() -> None:
    """Drop this job's standing request, if it made one (the job is over): idle nodes may then go."""
    from ray.autoscaler.sdk import request_resources

    if not _requested:
        return
    try:
        request_resources(bundles=[])
    except Exception:  # noqa: BLE001 - best effort at shutdown
        pass
