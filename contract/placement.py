"""Placement by role: which nodes a rollout worker, a learner rank or a reward replica may use.

Each role's config section has one setting, `resources`: Ray custom resources that one worker /
rank / replica reserves, e.g. `rollout.resources: {rollout: 1}`. A node offers them when it is
started with `ray start --resources='{"rollout": 4}'` (or a node type's `resources:` in a cluster
launcher YAML, or `rayStartParams.resources` in a KubeRay worker group), so work of a role runs
only on nodes of that role, and an autoscaler asked for such a bundle starts a node of that type.

Why custom resources and not node labels (`label_selector`, Ray >= 2.49): labels are beta in Ray
2.60, and only autoscaler v2 scales on them; the cluster launcher's autoscaler (v1) and
`ray.autoscaler.sdk.request_resources` without v2 see resource shapes only. A custom resource is
understood by every scheduler and autoscaler Ray ships, and it is a count: `rollout: 4` on a
4-GPU node also says how many engines it takes.

Default `{}`: no constraint, today's single-node behaviour. CPU/GPU are not set here (they have
their own keys, `*_cpus_per_*` / `*_gpus_per_*`, and the device profile decides whether GPUs
are asked for).
"""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator

RESERVED = ("CPU", "GPU", "memory", "object_store_memory")


def _check(resources: dict[str, float]) -> dict[str, float]:
    for name, amount in resources.items():
        if name in RESERVED or name.startswith("node:"):
            raise ValueError(f"{name!r} is not a custom resource (CPU/GPU have their own keys; node:* is Ray's)")
        if not amount > 0:
            raise ValueError(f"{name}: expected an amount > 0 (got {amount})")
    return resources


CustomResources = Annotated[dict[str, float], AfterValidator(_check)]


def actor_resources(device, cpus: float, gpus: float, resources: dict[str, float]) -> dict:
    """Ray actor options for one worker/rank/replica: the device profile's CPU/GPU plus the role's
    custom resources (omitted when empty, so options stay exactly as before)."""
    opts = device.ray_resources(cpus, gpus)
    if resources:
        opts["resources"] = dict(resources)
    return opts


def bundle(device, cpus: float, gpus: float, resources: dict[str, float]) -> dict[str, float]:
    """The same reservation as a placement-group / autoscaler bundle ({"CPU": .., "GPU": .., custom})."""
    opts = actor_resources(device, cpus, gpus, resources)
    out = {"CPU": opts["num_cpus"]}
    if opts.get("num_gpus"):
        out["GPU"] = opts["num_gpus"]
    return {**out, **opts.get("resources", {})}
