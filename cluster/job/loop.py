"""The training loop: prompts -> rollout pool -> reward service -> learner step -> weight publish.

sync:  each step generates with the current policy, trains, then publishes (fully on-policy).
async: one-step-off. The rollouts of step t+1 are generated (and scored) in a background thread
       while the learner trains on step t, so the learner waits only for what is not hidden behind
       its own step. Every sample keeps the version that produced it; a sample more than
       `loop.max_staleness` versions behind the learner is not trained on and is counted.

Scaling requests from other processes are applied between steps, never inside a generate call.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from cluster.config import JobConfig
from cluster.errors import JobFailed, failing_as
from cluster.job.rollout_table import provenance, rollout_stats, staleness, trainable_mask, with_rewards
from cluster.job.services import Services
from cluster.outputs.run_dir import RunDir
from contract.datasets import PromptIterator
from contract.functions import load_function

@dataclass
class LoopState:
    """What a checkpoint needs besides the learner: where the loop and the prompt order stand."""

    step: int = 0  # steps completed == index of the next step
    samples: int = 0
    dropped_stale: int = 0
    invalid_rewards: int = 0


@dataclass
class ScoredRollouts:
    """One step's samples, generated and scored, with how long each part took."""

    step: int
    table: pa.Table
    gen_s: float
    reward_s: float
    num_workers: int


class TrainingLoop:
    def __init__(self, cfg: JobConfig, run: RunDir, parts: Services, prompts: PromptIterator, state: LoopState,
                 on_step: Callable[[int, dict], None] = lambda step, m: None, log: Callable[[str], None] = print):
        self.cfg, self.run, self.services, self.prompts, self.state = cfg, run, parts, prompts, state
        self.on_step, self.log = on_step, log
        self.gold = load_function(cfg.loop.gold_function, "loop.gold_function") if cfg.loop.gold_function else None
        self._target_workers: int | None = None
        self._lock = threading.Lock()
        # (step, prompt-iterator state before that step's batch was drawn), oldest first.
        self._drawn: deque[tuple[int, dict]] = deque()
        self.stop = threading.Event()

    # -- requests from other threads ----------------------------------------------------------------
    def request_workers(self, n: int) -> None:
        with self._lock:
            self._target_workers = n

    def _apply_scaling(self) -> None:
        with self._lock:
            target, self._target_workers = self._target_workers, None
        pool = self.services.pool
        if target is not None and target != pool.num_workers:
            before = pool.num_workers
            t0 = time.perf_counter()
            pool.scale_to(target)
            self.log(f"rollout workers {before} -> {pool.num_workers} ({time.perf_counter() - t0:.1f}s)")

    # -- one step's parts ----------------------------------------------------------------------------
    def _draw(self, step: int) -> pa.Table:
        self._drawn.append((step, self.prompts.state_dict()))
        return self.prompts.next_batch(self.cfg.data.prompts_per_step)

    def resume_prompt_state(self) -> dict:
        """Iterator state from which the first not-yet-trained step's batch is redrawn."""
        return self._drawn[0][1] if self._drawn else self.prompts.state_dict()

    def _produce(self, step: int, batch: pa.Table) -> ScoredRollouts:
        t0 = time.perf_counter()
        rollouts = self.services.pool.generate(batch)
        t1 = time.perf_counter()
        with failing_as(f"reward service failed at step {step}"):
            rewards = self.services.reward.score(rollouts.column("prompt").to_pylist(),
                                              rollouts.column("response").to_pylist())
        t2 = time.perf_counter()
        if rewards.num_rows and not any(rewards.column("reward_valid").to_pylist()):
            from reward_service.client import reward_errors

            why = "; ".join(reward_errors(rewards)[:3]) or "no reason given"
            raise JobFailed(f"reward service returned no valid reward at step {step}: {why}"[:400])
        return ScoredRollouts(step, with_rewards(rollouts, rewards), t1 - t0, t2 - t1, self.services.pool.num_workers)

    def _train(self, p: ScoredRollouts, wall_start: float, sync_s: float) -> dict:
        learner = self.services.learner
        version_before = learner.version
        max_stale = self.cfg.loop.max_staleness if self.cfg.loop.mode == "async" else None
        mask = trainable_mask(p.table, version_before, max_stale)
        valid = p.table.column("reward_valid").to_numpy(zero_copy_only=False).astype(bool)
        n_invalid = int((~valid).sum())
        n_stale = int((valid & ~mask).sum())
        t0 = time.perf_counter()
        train_metrics: dict = {}
        if mask.any():
            with failing_as(f"learner failed at step {p.step}"):
                train_metrics = learner.train_step(p.table.filter(pa.array(mask)))
        train_s = time.perf_counter() - t0
        stale = staleness(p.table, version_before)
        gold = self.gold(p.table.column("prompt").to_pylist(), p.table.column("response").to_pylist()) \
            if self.gold else None
        self.run.write_rollouts(p.step, provenance(p.table, p.step, mask, gold))
        self.state.samples += int(mask.sum())
        self.state.dropped_stale += n_stale
        self.state.invalid_rewards += n_invalid
        m = {k: float(v) for k, v in train_metrics.items() if isinstance(v, (int, float))}
        m.update(rollout_stats(p.table, p.gen_s))
        m.update({"gen_s": p.gen_s, "reward_s": p.reward_s, "train_s": train_s, "sync_s": sync_s,
                  "num_workers": p.num_workers, "policy_version": learner.version,
                  "staleness_mean": float(stale.mean()), "staleness_max": int(stale.max()),
                  "dropped_stale": n_stale, "invalid_rewards": n_invalid, "trained_samples": int(mask.sum())})
        if gold is not None:
            m["gold_mean"] = float(np.mean(gold))
        m["wall_s"] = time.perf_counter() - wall_start
        return m

    def _finish_step(self, step: int, m: dict) -> None:
        # Idle: the learner neither trains nor sends weights (it waits for rollouts or the controller).
        busy = m["train_s"] + m["sync_s"]
        m["learner_idle_frac"] = max(0.0, 1.0 - busy / m["wall_s"]) if m["wall_s"] > 0 else 0.0
        self.state.step = step + 1
        self._drawn.popleft()
        self.run.log_metrics(step, m)
        self.on_step(step, m)
        every = self.cfg.loop.checkpoint_every
        if every and self.state.step % every == 0 and self.state.step < self.cfg.loop.steps:
            self.checkpoint()

    # -- the loops ---------------------------------------------------------------------------------------
    def run_loop(self) -> None:
        if self.cfg.loop.mode == "sync":
            self._run_sync()
        else:
            self._run_async()
        self.checkpoint()

    def _run_sync(self) -> None:
        for step in range(self.state.step, self.cfg.loop.steps):
            if self.stop.is_set():
                return
            self._apply_scaling()
            t0 = time.perf_counter()
            produced = self._produce(step, self._draw(step))
            m = self._train(produced, t0, sync_s=0.0)
            m["sync_s"] = self._publish(step)
            m["wall_s"] = time.perf_counter() - t0
            self._finish_step(step, m)

    def _run_async(self) -> None:
        first, last = self.state.step, self.cfg.loop.steps
        with ThreadPoolExecutor(1, thread_name_prefix="rollout") as ex:
            pending: Future | None = ex.submit(self._produce, first, self._draw(first))
            for step in range(first, last):
                t0 = time.perf_counter()
                try:
                    produced = pending.result(timeout=self.cfg.loop.timeout_s)
                except FutureTimeout:
                    raise JobFailed(f"rollouts of step {step} took longer than loop.timeout_s="
                                    f"{self.cfg.loop.timeout_s:.0f}s") from None
                if self.stop.is_set():
                    return
                sync_s = self._publish(step - 1) if step > first else 0.0
                self._apply_scaling()
                pending = ex.submit(self._produce, step + 1, self._draw(step + 1)) if step + 1 < last else None
                m = self._train(produced, t0, sync_s)
                self._finish_step(step, m)

    def _publish(self, step: int) -> float:
        """Send the weights trained at `step` to the rollout workers; seconds it took."""
        with failing_as(f"weight sync failed after step {step}"):
            return self.services.publish_weights()

    # -- checkpoints ---------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        staging = self.run.checkpoint_staging(self.state.step)
        with failing_as(f"checkpoint at step {self.state.step} failed"):
            self.services.learner.save_checkpoint(str(staging / "learner"))
        state = {"loop": asdict(self.state), "policy_version": self.services.learner.version,
                 "prompts": self.resume_prompt_state(), "num_workers": self.services.pool.num_workers}
        path = self.run.commit_checkpoint(staging, self.state.step, state)
        self.run.prune_checkpoints(self.cfg.loop.keep_checkpoints)
        self.log(f"checkpoint {path}")

