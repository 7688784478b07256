"""Moves the learner's new weights into every rollout worker, and tells new workers where to start.

Broadcast transport: learner rank 0 and the workers form a side group (rank 0 = learner). It is
re-formed under a fresh name and port whenever the pool's membership epoch changes (a worker
added, removed or replaced), then each publish is one `broadcast_weights` on the learner running
concurrently with `receive_weights` on every worker. If a broadcast fails (a worker died mid-sync),
the group is dropped and that version goes through the object store instead, which the pool
delivers to whoever is alive; the next publish re-forms the group.

Object-store transport: `publish_object_store()` once, then `pool.update_weights`.

`weights_source` is what the pool calls to load a new or replacement worker before it serves:
the learner's current object-store publish, cached per version.
"""
from __future__ import annotations

import threading
import time
import uuid

import ray

from contract.weights import GroupAddress
from cluster.errors import one_line


class WeightSync:
    def __init__(self, learner, pool, transport: str, backend: str, timeout_s: float, log=print):
        self.learner, self.pool = learner, pool
        self.transport, self.backend, self.timeout_s = transport, backend, timeout_s
        self._epoch: int | None = None  # membership epoch the current group was formed for
        self._manifest = None
        self._published: tuple[int, object] | None = None
        self._lock = threading.Lock()
        self.fallbacks = 0
        self.log = log

    # -- what new workers load --------------------------------------------------------------------
    def weights_source(self):
        """(version, ObjectRef) of the learner's current weights, or None while they are version 0
        (the model_dir every worker loads anyway)."""
        if self.learner is None or self.learner.version == 0:
            return None
        return self._object_store_publish()

    def _object_store_publish(self):
        with self._lock:
            if self._published is None or self._published[0] != self.learner.version:
                self._published = self.learner.publish_object_store()
            return self._published

    # -- one publish ------------------------------------------------------------------------------
    def publish(self) -> float:
        """Bring every worker to the learner's current version; returns seconds taken."""
        t0 = time.perf_counter()
        version = self.learner.version
        if self.transport == "object_store":
            self.pool.update_weights(*self._object_store_publish())
            return time.perf_counter() - t0
        try:
            self._broadcast(version)
        except Exception as e:  # noqa: BLE001 - a worker died mid-sync: deliver by object store
            self.log(f"weight broadcast of version {version} failed ({one_line(e)}); using the object store")
            self.fallbacks += 1
            self.leave()
            self.pool.update_weights(*self._object_store_publish())
        return time.perf_counter() - t0

    def _broadcast(self, version: int) -> None:
        epoch = self.pool.membership_epoch
        handles = [h for _, h in self.pool.workers()]
        if epoch != self._epoch or self._manifest is None:
            self.leave()
            self._form_group(handles)
            self._epoch = epoch
        futures = [self.learner.broadcast_weights()]
        futures += [h.receive_weights.remote(version, self._manifest) for h in handles]
        ray.get(futures, timeout=self.timeout_s)

    def _form_group(self, handles: list) -> None:
        host, port = self.learner.weight_group_endpoint()
        addr = GroupAddress(host=host, port=port, world_size=1 + len(handles),
                            name=f"wsync-{uuid.uuid4().hex[:12]}", backend=self.backend,
                            timeout_s=self.timeout_s)
        futures = [self.learner.join_weight_group(addr)]
        futures += [h.join_weight_group.remote(addr, rank) for rank, h in enumerate(handles, start=1)]
        ray.get(futures, timeout=self.timeout_s + 10)
        self._manifest = self.learner.weight_manifest()

    def leave(self) -> None:
        """Dissolve the current group on every side that is still alive (never raises)."""
        if self._epoch is None and self._manifest is None:
            return
        self._epoch, self._manifest = None, None
        futures = []
        try:
            self.learner.leave_weight_group()
        except Exception:  # noqa: BLE001
            pass
        for _, h in self.pool.workers():
            futures.append(h.leave_weight_group.remote())
        for f in futures:
            try:
                ray.get(f, timeout=10)
            except Exception:  # noqa: BLE001 - a dead worker has nothing to leave
                pass
