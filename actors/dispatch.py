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


def prompt_batch(ids: list[str], texts: list[str], token_ids: list[list[int]]) -> pa.RecordBatch:
    """The prompt RecordBatch a worker generates from: prompt_id, prompt, prompt_ids (tokenized)."""
    return pa.record_batch({"prompt_id": pa.array(ids, pa.string()), "prompt": pa.array(texts, pa.string()),
                            "prompt_ids": pa.array(token_ids, pa.list_(pa.int32()))})


class PromptSlice:
    """A chunk's prompts on the wire: pickled as three plain lists, unpickled (in the worker) as the
    `prompt_batch` RecordBatch the worker takes. The dispatching process serializes one of these per
    chunk, serially, so its cost is paid once per worker per step: plain lists pickle in ~50 us, an
    Arrow slice takes ~0.4 ms to cut and ~0.3-1.4 ms for Ray to serialize (benchmarks/RESULTS_scale.md).
    (Putting the whole table in the object store once and sending row numbers instead cut this
    process's time but added a fetch to every chunk's round trip: the pool's overhead grew.)"""

    def __init__(self, ids: list[str], texts: list[str], token_ids: list[list[int]]):
        self.columns = (ids, texts, token_ids)

    def __reduce__(self):
        return prompt_batch, self.columns


class Pickled:
    """An argument pickled once and sent many times: each chunk's task pickles only these bytes (the
    sampling config alone costs ~90 us per pickle), the worker unpickles the object itself."""

    def __init__(self, obj):
        import pickle

        self.data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)

    def __reduce__(self):
        import pickle

        return pickle.loads, (self.data,)


class ChunkRun:
    def __init__(self, pool, columns: tuple[list, list, list], chunks: list[list[int]], sampling: SamplingConfig,
                 one_version: bool = False):
        """`columns`: prompt ids, texts and token ids of the whole call; `chunks`: row numbers of each;
        `one_version`: see `Worker.generate`."""
        self.pool, self.cfg, self.columns, self.sampling = pool, pool.cfg, columns, Pickled(sampling)
        self.one_version = one_version
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
                    if not pool.has_workers():
                        raise RuntimeError("rollout pool: no live workers left to generate "
                                           f"{sum(len(c.rows) for c in self.queue)} prompt(s)")
                    time.sleep(POLL_S)
                    continue
                ready, rest = ray.wait(list(inflight), num_returns=1, timeout=POLL_S)
                if ready and rest:  # everything else already done, in one pass rather than one wait each
                    ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
                self._accept(ready)
                now = time.monotonic()
                for ref, (wid, chunk, t) in list(inflight.items()):
                    if now - t > self.cfg.request_timeout_s:  # hung, not dead: treated as dead
                        del inflight[ref]
                        pool.release(wid)
                        self._retry(wid, chunk, TimeoutError(
                            f"rollout worker {wid}: no result within rollout.request_timeout_s="
                            f"{self.cfg.request_timeout_s}"))
        finally:
            for wid, _, _ in inflight.values():
                pool.release(wid)
        return self.results

    def _accept(self, ready: list) -> None:
        """Read the finished chunks' results: in one `ray.get` rather than one each, or one by one when
        any of them failed (its worker is then replaced and its chunk queued again)."""
        try:
            got = ray.get(ready, timeout=self.cfg.request_timeout_s)
        except RayActorError:
            got = None
        now = time.monotonic()
        for i, ref in enumerate(ready):
            wid, chunk, sent = self.inflight.pop(ref)
            try:
                self.results.append(got[i] if got is not None else ray.get(ref, timeout=self.cfg.request_timeout_s))
                self.accepted.append((sent, now if got is not None else time.monotonic()))
            except RayActorError as err:
                self._retry(wid, chunk, err)
            finally:
                self.pool.release(wid)

    def _retry(self, wid: str, chunk: Chunk, err: Exception) -> None:
        """The worker failed this chunk (died, or hung past the request timeout): the pool kills and
        replaces it, and the chunk goes back in the queue."""
        self.pool.replace(wid, err)
        if chunk.attempts >= self.cfg.max_retries:
            raise RuntimeError(f"rollout pool: {len(chunk.rows)} prompt(s) failed on a worker {chunk.attempts + 1} "
                               f"time(s) (rollout.max_retries={self.cfg.max_retries}); last: {err}") from err
        self.queue.append(Chunk(chunk.rows, chunk.attempts + 1))

    def _dispatch(self) -> None:
        for wid, handle in self.pool.claim_idle(len(self.queue)):
            chunk = self.queue.popleft()
            ref = handle.generate.remote(self._slice(chunk.rows), self.sampling, self.one_version)
            self.inflight[ref] = (wid, chunk, time.monotonic())

    def _slice(self, rows: list[int]) -> PromptSlice:
        return PromptSlice(*([col[r] for r in rows] for col in self.columns))
