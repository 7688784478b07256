"""`RolloutPool`: N rollout workers behind one `generate`, elastic and tolerant of worker death.

A generate call is cut into token-balanced chunks handed to workers as they free up. A chunk
whose worker dies goes back to the queue (survivors or the replacement take it); a worker removed
while busy finishes its chunk and is killed after. Each chunk's result is accepted once, so the
table holds every (prompt_id, sample_idx) exactly once. Thread-safe: scaling and weight updates
may come from other threads while a generate runs.

Workers go only where `rollout.resources` allows, spread over those nodes (`worker_placement.py`). Growing
the pool (`scale_to`, replacements) never blocks the caller: a new worker waits for a node in the
background, loads the current weights and only then serves; one with no node after
`rollout.placement_timeout_s` is named in a warning and keeps waiting, so a node added later is used.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
from ray.exceptions import GetTimeoutError, RayActorError

from actors.balance import expected_tokens, split_balanced
from actors.config import RolloutConfig, SamplingConfig
from actors.dispatch import ChunkRun
from actors.worker_placement import Cancelled, name_taken, wait_placed, worker_options
from actors.prompts import check_prompt_lengths, check_prompt_table
from actors.worker import RolloutWorker
from contract.devices import DeviceProfile
from contract.chat import encode_prompts
from contract.experience import attach_prompt_columns, concat, ordered_exactly_once

log = logging.getLogger(__name__)


@dataclass
class _Member:
    handle: Any
    busy: bool = False


class RolloutPool:
    def __init__(self, cfg: RolloutConfig, model_dir: str, device: DeviceProfile,
                 weights_source: Callable[[], tuple[int, Any] | None] | None = None, name_prefix: str = "rollout",
                 namespace: str | None = None, log: Callable[[str], None] | None = None,
                 engine_factory=None):
        """`log`: also receives the pool's warnings and membership news (the controller relays them to
        the user). `engine_factory`: see `worker.Worker` (benchmarks only)."""
        from transformers import AutoTokenizer

        self.cfg, self.model_dir, self.device = cfg, str(model_dir), device
        self.weights_source, self.name_prefix, self.namespace = weights_source, name_prefix, namespace
        self._log, self._engine_factory = log, engine_factory
        # Same tokenizer files as the engines: used to check lengths and balance before dispatch.
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self._lock = threading.RLock()
        self._members: dict[str, _Member] = {}
        self._starting: dict[str, Any] = {}  # spawned, not serving yet: waiting for a node, or loading
        self._retiring: dict[str, Any] = {}  # removed while busy: killed once their chunk returns
        self._next_index = 0
        self.membership_epoch = 0
        self.last_run: ChunkRun | None = None
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

    @property
    def num_starting(self) -> int:
        """Workers asked for but not serving yet (waiting for a node, or loading)."""
        with self._lock:
            return len(self._starting)

    def add_workers(self, k: int) -> list[str]:
        """Start k workers and wait until they serve: placed (all within rollout.start_timeout_s), engine
        up, current weights loaded. `scale_to` is the non-blocking way."""
        if k < 0:
            raise ValueError(f"add_workers: k must be >= 0 (got {k})")
        if k == 0:
            return []
        return self._bring_up([self._spawn() for _ in range(k)], deadline=time.monotonic() + self.cfg.start_timeout_s)

    def _bring_up(self, started: list[tuple[str, Any]], deadline: float | None) -> list[str]:
        try:
            wait_placed(started, self.cfg, self.device, deadline, self._wanted, self._warn)
            self._get([h.start_engine.remote() for _, h in started], "start", "start_timeout_s")
            loaded = None
            while True:
                with self._lock:
                    current = self._current_weights()
                    if current is None or (loaded is not None and current[0] == loaded):
                        if not all(self._wanted(wid) for wid, _ in started):
                            raise Cancelled(", ".join(wid for wid, _ in started))
                        for wid, h in started:
                            del self._starting[wid]
                            self._members[wid] = _Member(h)
                        self.membership_epoch += 1
                        return [wid for wid, _ in started]
                # Outside the lock: a load may take seconds; re-check in case a newer version was published.
                self._get([h.update_weights.remote(current[0], current[1]) for _, h in started], "initial weights",
                          "request_timeout_s")
                loaded = current[0]
        except BaseException:
            with self._lock:
                for wid, _ in started:
                    self._starting.pop(wid, None)
            for _, h in started:
                ray.kill(h, no_restart=True)
            raise

    def _start_in_background(self, k: int, why: str) -> None:
        for _ in range(k):
            wid, h = self._spawn()
            threading.Thread(target=self._background_start, args=(wid, h, why), name=f"start-{wid}",
                             daemon=True).start()

    def _background_start(self, wid: str, handle, why: str) -> None:
        try:
            self._bring_up([(wid, handle)], deadline=None)  # a node may come much later: no limit to wait for one
        except Exception as e:  # noqa: BLE001 - a start that fails is reported, the pool serves on
            if not isinstance(e, Cancelled) and not self._wanted(wid):
                self._warn(f"rollout worker {wid} ({why}) failed to start: {_line(e)}; "
                           f"{self.num_workers} serving")
            return
        self._note(f"rollout worker {wid} ({why}) serving: {self.num_workers} serving, {self.num_starting} starting")

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
        """Ask for n workers (serving + starting) and return at once. Growth starts workers in the
        background; shrinking cancels starting workers first (newest first), then removes serving ones."""
        if n < 0:
            raise ValueError(f"scale_to: n must be >= 0 (got {n})")
        with self._lock:
            extra = len(self._members) + len(self._starting) - n
            for wid in sorted(self._starting, key=self._index, reverse=True)[:max(0, extra)]:
                ray.kill(self._starting.pop(wid), no_restart=True)
                extra -= 1
            if extra > 0:
                self.remove_workers(extra)
        if extra < 0:
            self._start_in_background(-extra, "scale-up")

    # ---- generation -------------------------------------------------------------------------
    def generate(self, prompts: pa.Table, sampling: SamplingConfig | None = None, one_version: bool = False
                 ) -> pa.Table:
        """ROLLOUT_SCHEMA rows, ordered by prompt (input order) then sample_idx; each
        (prompt_id, sample_idx) exactly once. `one_version`: see `Worker.generate`."""
        sampling = sampling or self.cfg.sampling
        check_prompt_table(prompts)
        ids = prompts.column("prompt_id").to_pylist()
        texts = prompts.column("prompt").to_pylist()
        messages = prompts.column("messages").to_pylist() if "messages" in prompts.column_names else None
        token_ids = encode_prompts(self._tokenizer, texts, messages)  # chat-rendered text: no second BOS
        check_prompt_lengths(ids, token_ids, self.cfg.engine.max_model_len)
        costs = expected_tokens([len(t) for t in token_ids], sampling.max_new_tokens, sampling.n)
        chunks = split_balanced(costs, max(1, self.num_workers) * self.cfg.chunks_per_worker)
        self.last_run = ChunkRun(self, (ids, texts, token_ids), chunks, sampling, one_version)  # kept for its timings
        batches = self.last_run.run()
        # a chat prompt's conversation rejoins its samples (the Parquet and the reward model use it)
        return attach_prompt_columns(ordered_exactly_once(concat(batches), ids, sampling.n), prompts)

    # ---- what a generate call's dispatch (actors/dispatch.py) asks of the membership -------------
    def claim_idle(self, k: int) -> list[tuple[str, Any]]:
        """Up to `k` serving workers with no chunk in hand, each marked busy until `release`d."""
        with self._lock:
            idle = [(wid, m) for wid, m in self._members.items() if not m.busy][:k]
            for _, m in idle:
                m.busy = True
            return [(wid, m.handle) for wid, m in idle]

    def has_workers(self) -> bool:
        """Some worker serves or is starting: a waiting chunk will find one."""
        with self._lock:
            return bool(self._members or self._starting)

    def release(self, wid: str) -> None:
        """`wid` finished (or gave up) its chunk: free for the next, or, if it was retiring, killed now."""
        with self._lock:
            if wid in self._members:
                self._members[wid].busy = False
            elif wid in self._retiring:
                ray.kill(self._retiring.pop(wid), no_restart=True)

    def replace(self, wid: str, err: Exception) -> None:
        """Drop a dead (or hung) worker; if it was serving (not retiring), kill it and start a
        replacement in the background."""
        with self._lock:
            m = self._members.pop(wid, None)
            self._retiring.pop(wid, None)
            if m is None:
                return
            ray.kill(m.handle, no_restart=True)
            self.membership_epoch += 1
        self._warn(f"rollout worker {wid} failed ({_line(err)}); starting a replacement")
        self._start_in_background(1, f"replaces {wid}")

    # ---- weights, health, teardown ----------------------------------------------------------
    def update_weights(self, version: int, ref) -> None:
        """Object-store transport to every worker. Workers started later load what `weights_source`
        names (the publisher's latest), so the pool keeps no copy of its own. A worker that dies
        while loading, or hangs past rollout.request_timeout_s (as a hung generate does), is killed
        and replaced; its replacement loads the current version before it serves."""
        refs = {h.update_weights.remote(version, ref): wid for wid, h in self.workers()}
        if not refs:
            return
        done, hung = ray.wait(list(refs), num_returns=len(refs), timeout=self.cfg.request_timeout_s)
        for r in done:
            try:
                ray.get(r, timeout=self.cfg.request_timeout_s)
            except RayActorError as err:
                self.replace(refs[r], err)
        for r in hung:
            self.replace(refs[r], TimeoutError(f"rollout worker {refs[r]}: weights of version {version} not loaded "
                                               f"within rollout.request_timeout_s={self.cfg.request_timeout_s}"))

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
        refs = [h.leave_weight_group.remote() for _, h in self.workers()]
        if refs:  # one 10 s limit for all (a dead member's error is not read: nothing to undo)
            ray.wait(refs, num_returns=len(refs), timeout=10)

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
            handles = ([m.handle for m in self._members.values()] + list(self._retiring.values())
                       + list(self._starting.values()))
            self._members.clear()
            self._retiring.clear()
            self._starting.clear()
            self.membership_epoch += 1
        for h in handles:
            ray.kill(h, no_restart=True)

    # ---- helpers ----------------------------------------------------------------------------
    def _current_weights(self) -> tuple[int, Any] | None:
        return self.weights_source() if self.weights_source else None

    def _index(self, wid: str) -> int:
        return int(wid.rsplit("-", 1)[1])

    def _spawn(self) -> tuple[str, Any]:
        """A worker actor with its engine deferred, registered as starting."""
        with self._lock:
            while True:
                wid = f"{self.name_prefix}-{self._next_index}"
                self._next_index += 1
                if not name_taken(wid, self.namespace):
                    break
            handle = RolloutWorker.options(**worker_options(wid, self.cfg, self.device, self.namespace)).remote(
                wid, self.model_dir, self.cfg, self.device.kind, defer_engine=True,
                engine_factory=self._engine_factory)
            self._starting[wid] = handle
        return wid, handle

    def _wanted(self, wid: str) -> bool:
        return wid in self._starting

    def _warn(self, msg: str) -> None:
        log.warning(msg)
        if self._log is not None:
            self._log(msg)

    def _note(self, msg: str) -> None:
        log.info(msg)
        if self._log is not None:
            self._log(msg)

    def _get(self, refs: list, what: str, limit: str):
        timeout_s = getattr(self.cfg, limit)
        try:
            return ray.get(refs, timeout=timeout_s)
        except GetTimeoutError as err:
            raise TimeoutError(f"rollout pool: worker {what} took longer than rollout.{limit}={timeout_s}") from err


def _line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__
