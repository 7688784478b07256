"""`RolloutPool`: N rollout workers behind one `generate`, elastic and tolerant of worker death.

A generate call is cut into token-balanced chunks handed to workers as they free up. A chunk
whose worker dies goes back to the queue (survivors or the replacement take it); a worker removed
while busy finishes its chunk and is killed after. Each chunk's result is accepted once, so the
table holds every (prompt_id, sample_idx) exactly once. Thread-safe: scaling and weight updates
may come from other threads while a generate runs.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
from ray.exceptions import GetTimeoutError, RayActorError

from actors.balance import expected_tokens, split_balanced
from actors.config import RolloutConfig, SamplingConfig
from actors.prompts import check_prompt_lengths, check_prompt_table
from actors.worker import RolloutWorker
from contract.devices import DeviceProfile
from contract.chat import encode_prompts
from contract.experience import attach_messages, concat, ordered_exactly_once

log = logging.getLogger(__name__)
POLL_S = 0.2  # how often a waiting generate looks for new/freed workers


@dataclass
class _Member:
    handle: Any
    busy: bool = False


@dataclass
class _Chunk:
    rows: list[int]
    attempts: int = 0


class RolloutPool:
    def __init__(self, cfg: RolloutConfig, model_dir: str, device: DeviceProfile,
                 weights_source: Callable[[], tuple[int, Any] | None] | None = None, name_prefix: str = "rollout",
                 namespace: str | None = None):
        from transformers import AutoTokenizer

        self.cfg, self.model_dir, self.device = cfg, str(model_dir), device
        self.weights_source, self.name_prefix, self.namespace = weights_source, name_prefix, namespace
        # Same tokenizer files as the engines: used to check lengths and balance before dispatch.
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self._lock = threading.RLock()
        self._members: dict[str, _Member] = {}
        self._retiring: dict[str, Any] = {}  # removed while busy: killed once their chunk returns
        self._next_index = 0
        self._replacing = 0
        self.membership_epoch = 0
        self.add_workers(cfg.num_workers)

    # ---- membership -------------------------------------------------------------------------
    @property
    def num_workers(self) -> int:
        with self._lock:
            return len(self._members)

    def worker_ids(self) -> list[str]:
        with self._lock:
            return list(self._members)

    def workers(self) -> list[tuple[str, Any]]:
        with self._lock:
            return [(wid, m.handle) for wid, m in self._members.items()]

    def add_workers(self, k: int) -> list[str]:
        """Start k workers, load the current weights into each, and only then let them serve."""
        if k < 0:
            raise ValueError(f"add_workers: k must be >= 0 (got {k})")
        if k == 0:
            return []
        started = [self._spawn() for _ in range(k)]
        try:
            self._get([h.ping.remote() for _, h in started], "start", "start_timeout_s")
            loaded = None
            while True:
                with self._lock:
                    current = self._current_weights()
                    if current is None or (loaded is not None and current[0] == loaded):
                        for wid, h in started:
                            self._members[wid] = _Member(h)
                        self.membership_epoch += 1
                        return [wid for wid, _ in started]
                # Outside the lock: a load may take seconds; re-check in case a newer version was published.
                self._get([h.update_weights.remote(current[0], current[1]) for _, h in started], "initial weights",
                          "request_timeout_s")
                loaded = current[0]
        except BaseException:
            for _, h in started:
                ray.kill(h, no_restart=True)
            raise

    def remove_workers(self, k: int) -> list[str]:
        """Idle workers go first; a busy one finishes its current chunk, then is killed."""
        with self._lock:
            if not 0 <= k <= len(self._members):
                raise ValueError(f"remove_workers: k must be in 0..{len(self._members)} (got {k})")
            order = sorted(self._members, key=lambda w: (self._members[w].busy, -self._index(w)))[:k]
            for wid in order:
                m = self._members.pop(wid)
                if m.busy:
                    self._retiring[wid] = m.handle
                else:
                    ray.kill(m.handle, no_restart=True)
            if order:
                self.membership_epoch += 1
            return order

    def scale_to(self, n: int) -> None:
        have = self.num_workers
        if n > have:
            self.add_workers(n - have)
        elif n < have:
            self.remove_workers(have - n)

    # ---- generation -------------------------------------------------------------------------
    def generate(self, prompts: pa.Table, sampling: SamplingConfig | None = None) -> pa.Table:
        """ROLLOUT_SCHEMA rows, ordered by prompt (input order) then sample_idx; each
        (prompt_id, sample_idx) exactly once."""
        sampling = sampling or self.cfg.sampling
        check_prompt_table(prompts)
        ids = prompts.column("prompt_id").to_pylist()
        texts = prompts.column("prompt").to_pylist()
        messages = prompts.column("messages").to_pylist() if "messages" in prompts.column_names else None
        token_ids = encode_prompts(self._tokenizer, texts, messages)  # chat-rendered text: no second BOS
        check_prompt_lengths(ids, token_ids, self.cfg.engine.max_model_len)
        table = pa.table({"prompt_id": pa.array(ids, pa.string()), "prompt": pa.array(texts, pa.string()),
                          "prompt_ids": pa.array(token_ids, pa.list_(pa.int32()))})
        costs = expected_tokens([len(t) for t in token_ids], sampling.max_new_tokens, sampling.n)
        chunks = split_balanced(costs, max(1, self.num_workers) * self.cfg.chunks_per_worker)
        batches = self._run(table, deque(_Chunk(c) for c in chunks), sampling)
        # a chat prompt's conversation rejoins its samples (the Parquet and the reward model use it)
        return attach_messages(ordered_exactly_once(concat(batches), ids, sampling.n), prompts)

    def _run(self, table: pa.Table, queue: deque[_Chunk], sampling: SamplingConfig) -> list[pa.RecordBatch]:
        inflight: dict[Any, tuple[str, _Chunk, float]] = {}
        results: list[pa.RecordBatch] = []
        try:
            while queue or inflight:
                self._dispatch(table, queue, inflight, sampling)
                if not inflight:
                    with self._lock:
                        if not self._members and not self._replacing:
                            raise RuntimeError("rollout pool: no live workers left to generate "
                                               f"{sum(len(c.rows) for c in queue)} prompt(s)")
                    time.sleep(POLL_S)
                    continue
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=POLL_S)
                for ref in ready:
                    wid, chunk, _ = inflight.pop(ref)
                    try:
                        results.append(ray.get(ref, timeout=self.cfg.request_timeout_s))
                    except RayActorError as err:
                        self._retry(wid, chunk, err, queue)
                    finally:
                        self._release(wid)
                now = time.monotonic()
                for ref, (wid, chunk, t) in list(inflight.items()):
                    if now - t > self.cfg.request_timeout_s:  # hung, not dead: treated as dead
                        del inflight[ref]
                        self._release(wid)
                        self._retry(wid, chunk, TimeoutError(
                            f"rollout worker {wid}: no result within rollout.request_timeout_s="
                            f"{self.cfg.request_timeout_s}"), queue)
        finally:
            for wid, _, _ in inflight.values():
                self._release(wid)
        return results

    def _retry(self, wid: str, chunk: _Chunk, err: Exception, queue: deque[_Chunk]) -> None:
        """The worker failed this chunk (died, or hung past the request timeout): it is killed and
        replaced, and the chunk goes back in the queue. A late result of the killed worker is never
        read, so every row is still counted once."""
        self._on_death(wid, err)
        if chunk.attempts >= self.cfg.max_retries:
            raise RuntimeError(f"rollout pool: {len(chunk.rows)} prompt(s) failed on a worker {chunk.attempts + 1} "
                               f"time(s) (rollout.max_retries={self.cfg.max_retries}); last: {err}") from err
        queue.append(_Chunk(chunk.rows, chunk.attempts + 1))

    def _dispatch(self, table, queue, inflight, sampling) -> None:
        with self._lock:
            for wid, m in self._members.items():
                if not queue:
                    return
                if not m.busy:
                    chunk = queue.popleft()
                    m.busy = True
                    ref = m.handle.generate.remote(table.take(chunk.rows), sampling)
                    inflight[ref] = (wid, chunk, time.monotonic())

    def _release(self, wid: str) -> None:
        with self._lock:
            if wid in self._members:
                self._members[wid].busy = False
            elif wid in self._retiring:
                ray.kill(self._retiring.pop(wid), no_restart=True)

    def _on_death(self, wid: str, err: Exception) -> None:
        """Drop a dead (or hung) worker; if it was serving (not retiring), kill it and start a
        replacement in the background."""
        with self._lock:
            m = self._members.pop(wid, None)
            self._retiring.pop(wid, None)
            if m is None:
                return
            ray.kill(m.handle, no_restart=True)
            self.membership_epoch += 1
            self._replacing += 1
        log.warning("rollout worker %s failed (%s); starting a replacement", wid, err)
        threading.Thread(target=self._replace, name=f"replace-{wid}", daemon=True).start()

    def _replace(self) -> None:
        try:
            self.add_workers(1)
        except Exception:  # noqa: BLE001 - surfaced through the log; generate fails if nobody is left
            log.exception("rollout pool: replacement worker failed to start")
        finally:
            with self._lock:
                self._replacing -= 1

    # ---- weights, health, teardown ----------------------------------------------------------
    def update_weights(self, version: int, ref) -> None:
        """Object-store transport to every worker. Workers started later load what `weights_source`
        names (the publisher's latest), so the pool keeps no copy of its own."""
        members = self.workers()
        refs = [h.update_weights.remote(version, ref) for _, h in members]
        for (wid, _), r in zip(members, refs):
            try:
                ray.get(r, timeout=self.cfg.request_timeout_s)
            except RayActorError as err:
                self._on_death(wid, err)  # its replacement loads the current version before serving

    # ---- the broadcast weight group (formed by the publisher, joined by every current member) ------
    def weight_group_members(self) -> tuple[int, int]:
        """(membership epoch, number of workers): a group formed for this epoch has 1 + n ranks."""
        with self._lock:
            return self.membership_epoch, len(self._members)

    def join_weight_group(self, addr, epoch: int) -> list:
        """Every member joins `addr` as ranks 1..n (refs to await beside the sender's join)."""
        with self._lock:
            if epoch != self.membership_epoch:
                raise RuntimeError(f"rollout pool: membership changed (epoch {self.membership_epoch}, group formed "
                                   f"for {epoch})")
            handles = [m.handle for m in self._members.values()]
        return [h.join_weight_group.remote(addr, rank) for rank, h in enumerate(handles, start=1)]

    def receive_weights(self, version: int, manifest) -> list:
        """Every member receives one broadcast of `version` (refs to await beside the sender's)."""
        return [h.receive_weights.remote(version, manifest) for _, h in self.workers()]

    def leave_weight_group(self) -> None:
        """Best effort on every live member (a dead worker has nothing to leave); never raises."""
        for r in [h.leave_weight_group.remote() for _, h in self.workers()]:
            try:
                ray.get(r, timeout=10)
            except Exception:  # noqa: BLE001
                pass

    def metrics(self) -> dict:
        members = self.workers()
        per = {}
        for wid, h in members:
            try:
                per[wid] = ray.get(h.metrics.remote(), timeout=self.cfg.request_timeout_s)
            except (RayActorError, GetTimeoutError) as err:
                per[wid] = {"error": type(err).__name__}
        ok = [m for m in per.values() if "error" not in m]
        return {"num_workers": len(members), "membership_epoch": self.membership_epoch,
                "samples": sum(m["samples"] for m in ok), "tokens": sum(m["tokens"] for m in ok),
                "tokens_per_s": sum(m["tokens_per_s"] for m in ok), "workers": per}

    def shutdown(self) -> None:
        with self._lock:
            handles = [m.handle for m in self._members.values()] + list(self._retiring.values())
            self._members.clear()
            self._retiring.clear()
            self.membership_epoch += 1
        for h in handles:
            ray.kill(h, no_restart=True)

    # ---- helpers ----------------------------------------------------------------------------
    def _current_weights(self) -> tuple[int, Any] | None:
        return self.weights_source() if self.weights_source else None

    def _index(self, wid: str) -> int:
        return int(wid.rsplit("-", 1)[1])

    def _spawn(self) -> tuple[str, Any]:
        with self._lock:
            while True:
                wid = f"{self.name_prefix}-{self._next_index}"
                self._next_index += 1
                if not _name_taken(wid, self.namespace):
                    break
        opts = dict(name=wid, runtime_env={"env_vars": self.device.actor_env(self.cfg.threads_per_worker)},
                    **self.device.ray_resources(self.cfg.cpus_per_worker, self.cfg.gpus_per_worker))
        if self.namespace is not None:
            opts["namespace"] = self.namespace
        return wid, RolloutWorker.options(**opts).remote(wid, self.model_dir, self.cfg, self.device.kind)

    def _get(self, refs: list, what: str, limit: str):
        timeout_s = getattr(self.cfg, limit)
        try:
            return ray.get(refs, timeout=timeout_s)
        except GetTimeoutError as err:
            raise TimeoutError(f"rollout pool: worker {what} took longer than rollout.{limit}={timeout_s}") from err


def _name_taken(name: str, namespace: str | None) -> bool:
    try:
        ray.get_actor(name, namespace=namespace)
        return True
    except ValueError:
        return False
