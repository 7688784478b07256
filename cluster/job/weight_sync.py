"""Moves the learner's new weights into every rollout worker: the one owner of published weights.

Arrows: `WeightSync` drives the learner group and the rollout pool; neither knows it. The pool is
handed `current_weights` (a plain function) at construction, and calls it to load a new or
replacement worker before that worker serves.

Broadcast transport: learner rank 0 and the workers form a side group (rank 0 = learner). It is
re-formed under a fresh name and port whenever the pool's membership epoch changes (a worker
added, removed or replaced), then each publish is one `broadcast_weights` on the learner running
concurrently with `receive_weights` on every worker. If a broadcast fails (a worker died mid-sync),
the group is dropped and that version goes through the object store instead, which the pool
delivers to whoever is alive; the next publish re-forms the group.

Object-store transport: one `publish_object_store()` per version, then `pool.update_weights`.
"""
from __future__ import annotations

import threading
import time
import uuid

import ray

from cluster.errors import one_line
from contract.weights import GroupAddress


class WeightSync:
    def __init__(self, learner, transport: str, backend: str, timeout_s: float, log=print):
        self.learner = learner
        self.transport, self.backend, self.timeout_s = transport, backend, timeout_s
        self._epoch: int | None = None  # membership epoch the current group was formed for
        self._manifest = None
        self._published: tuple[int, object] | None = None  # (version, ObjectRef): the one copy
        self._lock = threading.Lock()
        self.fallbacks = 0
        self.log = log

    # -- what new workers load --------------------------------------------------------------------
    def current_weights(self):
        """(version, ObjectRef) of the learner's current weights, or None while they are version 0
        (the model directory every worker loads anyway). Put in the object store once per version."""
        if self.learner.version == 0:
            return None
        with self._lock:
            if self._published is None or self._published[0] != self.learner.version:
                self._published = self.learner.publish_object_store()
            return self._published

    # -- one publish ------------------------------------------------------------------------------
    def publish(self, pool) -> float:
        """Bring every worker of `pool` to the learner's current version; returns seconds taken."""
        t0 = time.perf_counter()
        version = self.learner.version
        if self.transport == "object_store":
            pool.update_weights(*self.current_weights())
            return time.perf_counter() - t0
        try:
            self._broadcast(pool, version)
        except Exception as e:  # noqa: BLE001 - a worker died mid-sync: deliver by object store
            self.log(f"weight broadcast of version {version} failed ({one_line(e)}); using the object store")
            self.fallbacks += 1
            self.leave(pool)
            pool.update_weights(*self.current_weights())
        return time.perf_counter() - t0

    def _broadcast(self, pool, version: int) -> None:
        epoch, n = pool.weight_group_members()
        if epoch != self._epoch or self._manifest is None:
            self.leave(pool)
            self._form_group(pool, epoch, n)
            self._epoch = epoch
        futures = [self.learner.broadcast_weights(), *pool.receive_weights(version, self._manifest)]
        ray.get(futures, timeout=self.timeout_s)

    def _form_group(self, pool, epoch: int, n: int) -> None:
        host, port = self.learner.weight_group_endpoint()
        addr = GroupAddress(host=host, port=port, world_size=1 + n, name=f"wsync-{uuid.uuid4().hex[:12]}",
                            backend=self.backend, timeout_s=self.timeout_s)
        futures = [self.learner.join_weight_group(addr), *pool.join_weight_group(addr, epoch)]
        ray.get(futures, timeout=self.timeout_s + 10)
        self._manifest = self.learner.weight_manifest()

    def leave(self, pool) -> None:
        """Dissolve the current group on every side that is still alive (never raises)."""
        if self._epoch is None and self._manifest is None:
            return
        self._epoch, self._manifest = None, None
        try:
            self.learner.leave_weight_group()
        except Exception:  # noqa: BLE001
            pass
        pool.leave_weight_group()
