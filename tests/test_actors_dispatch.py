"""`actors.dispatch.ChunkRun` reading finished chunks, on real Ray actors: one `ray.get` for all that
finished, and when one of them died, each result still accepted exactly once and the dead worker's
chunk queued again. The workers are STAND-INS (`ChunkWorkerStandIn`: returns one row, or dies), and
so is the pool around them (`PoolStandIn`: the membership ChunkRun reads); a real pool with vLLM
workers meets the same deaths in tests/test_actors_pool.py, where which results finish together is
left to timing.
"""
from __future__ import annotations

from types import SimpleNamespace

import pyarrow as pa
import pytest


@pytest.fixture(scope="module")
def stand_in_worker(ray_local):
    @ray_local.remote(num_cpus=0)
    class ChunkWorkerStandIn:
        def generate(self, prompts, sampling, die: bool = False):
            import os

            if die:
                os._exit(1)
            return pa.record_batch({"prompt_id": prompts.column("prompt_id")})

    return ChunkWorkerStandIn


class PoolStandIn:
    """What ChunkRun calls on its pool (RolloutPool's dispatch API), recording releases and deaths."""

    def __init__(self, handles: dict):
        self.cfg = SimpleNamespace(request_timeout_s=30, max_retries=2)
        self.handles, self.released, self.deaths = handles, [], []

    def claim_idle(self, k):
        return list(self.handles.items())[:k]

    def has_workers(self):
        return True

    def release(self, wid):
        self.released.append(wid)

    def replace(self, wid, err):
        self.deaths.append((wid, type(err).__name__))


def test_one_dead_among_finished_chunks_each_result_once_and_the_dead_ones_chunk_queued_again(
        ray_local, stand_in_worker):
    from actors.config import SamplingConfig
    from actors.dispatch import Chunk, ChunkRun, PromptSlice

    handles = {w: stand_in_worker.remote() for w in ("w0", "w1", "w2")}
    pool = PoolStandIn(handles)
    columns = (["p0", "p1", "p2", "p3"], ["a", "b", "c", "d"], [[5], [6], [7], [8]])
    run = ChunkRun(pool, columns, [], SamplingConfig())
    chunks = {"w0": Chunk([0, 1]), "w1": Chunk([2]), "w2": Chunk([3])}
    refs = {}
    for wid, chunk in chunks.items():
        part = PromptSlice(*([col[r] for r in chunk.rows] for col in columns))
        refs[wid] = handles[wid].generate.remote(part, None, die=wid == "w1")
        run.inflight[refs[wid]] = (wid, chunk, 0.0)
    try:
        ready, _ = ray_local.wait(list(refs.values()), num_returns=3, timeout=60)
        assert len(ready) == 3  # all finished (one by dying) before they are read: one ready list
        run._accept(ready)
    finally:
        for h in handles.values():
            ray_local.kill(h)

    assert sorted(b.column("prompt_id").to_pylist()[0] for b in run.results) == ["p0", "p3"]
    assert [b.num_rows for b in run.results if b.column("prompt_id")[0].as_py() == "p0"] == [2]
    assert len(run.accepted) == 2 and not run.inflight
    assert pool.deaths == [("w1", "ActorDiedError")] and sorted(pool.released) == ["w0", "w1", "w2"]
    assert [(c.rows, c.attempts) for c in run.queue] == [([2], 1)]  # redone once, by another worker
