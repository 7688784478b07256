"""One `RolloutPool.generate` call: chunks handed to free workers, each result accepted once.

A chunk whose worker dies, or hangs past `rollout.request_timeout_s`, goes back in the queue (the
worker is killed and replaced by the pool); a late result of a killed worker is never read, so
every row is counted once. Workers that join while the call runs take queued chunks too.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
from ray.exceptions import RayActorError

from actors.config import SamplingConfig

POLL_S = 0.2  # how often a waiting generate looks for new/freed workers


@dataclass
class Chunk:
    rows: list[int]
    attempts: int = 0


class ChunkRun:
    def __init__(self, pool, table: pa.Table, chunks: list[list[int]], sampling: SamplingConfig):
        # A chunk ships its own slice of the table. (Putting the table in the object store once per call
        # and sending row numbers cut this process's dispatch time but tripled each chunk's round trip,
        # a fetch per worker: the pool's overhead grew; benchmarks/RESULTS_scale.md.)
        self.pool, self.cfg, self.table, self.sampling = pool, pool.cfg, table, sampling
        self.queue: deque[Chunk] = deque(Chunk(c) for c in chunks)
        self.inflight: dict[Any, tuple[str, Chunk, float]] = {}
        self.results: list[pa.RecordBatch] = []
        self.accepted: list[tuple[float, float]] = []  # (dispatched, result in hand) per result, monotonic

    def engine_s(self) -> list[float]:
        """Engine time of each accepted chunk (its rows' gen_s), aligned with `accepted`."""
        return [b.column("gen_s")[0].as_py() if b.num_rows else 0.0 for b in self.results]

    def run(self) -> list[pa.RecordBatch]:
        pool, inflight = self.pool, self.inflight
        try:
            while self.queue or inflight:
                self._dispatch()
                if not inflight:
                    with pool._lock:
                        if not pool._members and not pool._starting:
                            raise RuntimeError("rollout pool: no live workers left to generate "
                                               f"{sum(len(c.rows) for c in self.queue)} prompt(s)")
                    time.sleep(POLL_S)
                    continue
                ready, rest = ray.wait(list(inflight), num_returns=1, timeout=POLL_S)
                if ready and rest:  # everything else already done, in one pass rather than one wait each
                    ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
                for ref in ready:
                    wid, chunk, sent = inflight.pop(ref)
                    try:
                        self.results.append(ray.get(ref, timeout=self.cfg.request_timeout_s))
                        self.accepted.append((sent, time.monotonic()))
                    except RayActorError as err:
                        self._retry(wid, chunk, err)
                    finally:
                        pool._release(wid)
                now = time.monotonic()
                for ref, (wid, chunk, t) in list(inflight.items()):
                    if now - t > self.cfg.request_timeout_s:  # hung, not dead: treated as dead
                        del inflight[ref]
                        pool._release(wid)
                        self._retry(wid, chunk, TimeoutError(
                            f"rollout worker {wid}: no result within rollout.request_timeout_s="
                            f"{self.cfg.request_timeout_s}"))
        finally:
            for wid, _, _ in inflight.values():
                pool._release(wid)
        return self.results

    def _retry(self, wid: str, chunk: Chunk, err: Exception) -> None:
        """The worker failed this chunk (died, or hung past the request timeout): the pool kills and
        replaces it, and the chunk goes back in the queue."""
        self.pool._on_death(wid, err)
        if chunk.attempts >= self.cfg.max_retries:
            raise RuntimeError(f"rollout pool: {len(chunk.rows)} prompt(s) failed on a worker {chunk.attempts + 1} "
                               f"time(s) (rollout.max_retries={self.cfg.max_retries}); last: {err}") from err
        self.queue.append(Chunk(chunk.rows, chunk.attempts + 1))

    def _dispatch(self) -> None:
        pool = self.pool
        with pool._lock:
            for wid, m in pool._members.items():
                if not self.queue:
                    return
                if not m.busy:
                    chunk = self.queue.popleft()
                    m.busy = True
                    ref = m.handle.generate.remote(self.table.take(chunk.rows), self.sampling)
                    self.inflight[ref] = (wid, chunk, time.monotonic())
