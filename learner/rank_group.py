"""DeepSpeed ranks as Ray actors, started, called and stopped together: the RL learner's ranks
(learner/group.py) and the SFT stage's (learner/sft.py) are both a `Ranks`.

`start_ranks` reserves one bundle per rank in a PACK placement group (the ranks stay on one node
when it fits: every micro-batch has a collective), starts the actors in it, lets rank 0 pick the
rendezvous address (127.0.0.1 for one rank, else its node's address and a free port) and calls
`setup(host, port)` on every rank at once. Every call waits with a timeout and watches all ranks
together (`wait_all`): a rank that dies or raises becomes a RuntimeError naming the operation,
never a hang on the survivors.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


# ---- inside one rank's process: written once for the RL ranks (rank.py) and SFT's (sft.py) -----

def rank_endpoint(local_only: bool) -> tuple[str, int]:
    """(address peers reach this rank's node at, a free port there), for a rendezvous store the rank
    hosts: its DeepSpeed group's, and (RL rank 0) the weight-sync group's, whose peers may be
    rollout workers on other nodes."""
    from contract.net import free_port

    return ("127.0.0.1" if local_only else ray.util.get_node_ip_address()), free_port("")


def join_deepspeed_group(rank: int, world: int, master_addr: str, master_port: int, device_kind: str,
                         dist_timeout_s: float, seed: int) -> None:
    """This process becomes rank `rank` of `world` in torch.distributed through DeepSpeed (the device
    profile's collective backend, `dist_timeout_s` on every collective), with torch's thread count
    from OMP_NUM_THREADS (the actor's env) and `seed` set before any model is built."""
    import datetime as dt
    import os

    import deepspeed
    import torch

    from contract.devices import DeviceProfile
    from learner.ops import skip_shm_op

    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK="0")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    skip_shm_op()  # learner/ops.py: no g++ compile of an op training never uses
    device = DeviceProfile(kind=device_kind)  # type: ignore[arg-type]
    deepspeed.init_distributed(dist_backend=device.collective_backend, timeout=dt.timedelta(seconds=dist_timeout_s))
    torch.manual_seed(seed)

DEATH_GRACE_S = 10.0  # how long a collective error may wait for the rank death that caused it


def wait_all(refs: list, timeout_s: float, what: str) -> list:
    """ray.get on every ref (refs[i] from rank i), failing fast on the first error instead of waiting
    on a blocked peer. A rank's death usually surfaces first as a broken collective on a surviving
    rank; the message names the dead rank when its death shows up within DEATH_GRACE_S."""
    rank_of = {ref: i for i, ref in enumerate(refs)}
    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise RuntimeError(f"learner {what}: {len(pending)} rank(s) did not answer within {timeout_s:.0f}s")
        try:
            ray.get(ready[0], timeout=0)
        except RayActorError as e:
            raise _rank_died(what, rank_of[ready[0]], e) from e
        except RayTaskError as e:
            dead = _first_death(pending, rank_of)
            if dead is not None:
                raise _rank_died(what, *dead) from e
            raise RuntimeError(f"learner {what} failed on rank {rank_of[ready[0]]}: {type(e.cause).__name__}: "
                               f"{str(e.cause).splitlines()[0] if str(e.cause) else ''}") from e
    return ray.get(refs, timeout=0)


def _first_death(pending: list, rank_of: dict) -> tuple[int, RayActorError] | None:
    ready, _ = ray.wait(pending, num_returns=len(pending), timeout=DEATH_GRACE_S) if pending else ([], [])
    for ref in ready:
        try:
            ray.get(ref, timeout=0)
        except RayActorError as e:
            return rank_of[ref], e
        except Exception:  # noqa: BLE001 - another rank's collective error: not the cause
            continue
    return None


def _rank_died(what: str, rank: int, e: RayActorError) -> RuntimeError:
    return RuntimeError(f"learner {what}: learner rank {rank} died ({type(e).__name__})")


class Ranks:
    """Handles on started ranks (rank order) and their placement group."""

    def __init__(self, handles: list, pg):
        self.handles, self._pg = handles, pg

    def all(self, call: Callable[[Any], Any], timeout_s: float, what: str) -> list:
        """`call(handle)` -> ObjectRef on every rank at once (collective), awaited with `wait_all`."""
        return wait_all([call(h) for h in self.handles], timeout_s, what)

    def first(self, call: Callable[[Any], Any], timeout_s: float, what: str):
        """`call` on rank 0 only (what it alone holds or hosts)."""
        return wait_all([call(self.handles[0])], timeout_s, what)[0]

    def node_ids(self) -> list[str]:
        """Ray node ids the ranks' bundles are reserved on (rank order)."""
        on = placement_group_table(self._pg)["bundles_to_node_id"]
        return [on[r] for r in range(len(self.handles))]

    def kill(self) -> None:
        for h in self.handles:
            ray.kill(h, no_restart=True)
        self.handles = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None


def start_ranks(actor_cls: type, args_of: Callable[[int], tuple], num_ranks: int, device, cpus_per_rank: float,
                gpus_per_rank: float, resources: dict, init_timeout_s: float, namespace: str | None,
                name: str) -> Ranks:
    """`num_ranks` actors `actor_cls(*args_of(r))` named f"{name}-{r}", each in its own bundle of
    CPUs/GPUs (the device profile's) plus `resources` (a role's custom resources: contract.placement),
    rendezvoused and set up. Raises RuntimeError (nothing left running) if the bundles cannot be
    reserved or a rank fails to start within `init_timeout_s`."""
    res = device.ray_resources(cpus_per_rank, gpus_per_rank)
    bundle = {"CPU": res["num_cpus"], **({"GPU": res["num_gpus"]} if "num_gpus" in res else {}), **resources}
    pg = placement_group([bundle] * num_ranks, strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=init_timeout_s)
    except GetTimeoutError as e:
        remove_placement_group(pg)
        raise RuntimeError(f"{name}: {num_ranks} x {bundle} could not be reserved within {init_timeout_s:.0f}s") from e
    env = device.actor_env(max(1, int(cpus_per_rank)))
    cls = ray.remote(actor_cls)
    ranks = Ranks([cls.options(name=f"{name}-{r}", namespace=namespace, max_restarts=0, **res,
                               scheduling_strategy=PlacementGroupSchedulingStrategy(pg, r),
                               runtime_env={"env_vars": env}).remote(*args_of(r))
                   for r in range(num_ranks)], pg)
    try:
        host, port = ranks.first(lambda h: h.endpoint.remote(num_ranks == 1), init_timeout_s, "start")
        ranks.all(lambda h: h.setup.remote(host, port), init_timeout_s, "DeepSpeed init")
    except BaseException:
        ranks.kill()
        raise
    return ranks
