"""The training loop: prompts -> rollout pool -> reward service -> learner step -> weight publish.

sync:  each step generates with the current policy, trains, then publishes (fully on-policy).
async: the rollouts of the next `loop.max_staleness` steps are generated (and scored) in a
       background thread while the learner trains, so the learner waits only for what is not
       hidden behind its own step. With max_staleness = 1 this is one-step-off; with k, up to k
       batches are in flight and a sample may be k versions behind when it is trained on. Every
       sample keeps the version that produced it; the learner corrects for the lag with the
       engine's own logprobs (learner.rl.rollout_correction), and a sample more than
       `loop.max_staleness` versions behind is not trained on and is counted.
inflight: as async, but each step's weights are published as soon as it is trained, while the next
       rollouts are mid-generation: the engines load them between two engine steps (the workers'
       `rollout.inflight_updates`), so a response can span versions; every token keeps the version
       that sampled it (`token_versions`) and a sample counts as old as its oldest token.

Held-out evaluation (`eval`, cluster/job/evaluation.py) runs on the policy the workers hold at the
start of a step, serialized with generation. Scaling requests from other processes are applied
between steps, never inside a generate call.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict

import numpy as np
import pyarrow as pa

from cluster.config import JobConfig
from cluster.errors import JobFailed, failing_as
from cluster.job.evaluation import Evaluator
from cluster.job.produce import ScoredRollouts, StepProducer
from cluster.job.resume import LoopState, save_in_flight
from cluster.job.rollout_table import provenance, rollout_stats, staleness, trainable_mask, untrained_reasons
from cluster.job.services import Services
from cluster.outputs.run_dir import RunDir
from cluster.outputs.weight_digest import replay_requirements, tensor_digests
from contract.datasets import PromptIterator
from contract.user_code import load_function


class TrainingLoop:
    def __init__(self, cfg: JobConfig, run: RunDir, services: Services, prompts: PromptIterator, state: LoopState,
                 on_step: Callable[[int, dict], None] = lambda step, m: None, log: Callable[[str], None] = print,
                 in_flight: list[ScoredRollouts] | None = None):
        """`in_flight`: a resumed run's steps that its checkpoint saved generated but not yet trained
        (`produce.load_in_flight`), trained before anything new is drawn."""
        self.cfg, self.run, self.services, self.state = cfg, run, services, state
        self._pending: deque[tuple[int, Future]] = deque()  # (step, its production): async/inflight
        for p in in_flight or []:
            done: Future = Future()
            done.set_result(p)
            self._pending.append((p.step, done))
        self.on_step, self.log = on_step, log
        self.gold = load_function(cfg.loop.gold_function, "loop.gold_function") if cfg.loop.gold_function else None
        self.producer = StepProducer(services, prompts, cfg.data.prompts_per_step, cfg.loop.dynamic_sampling)
        self.evaluator = (Evaluator(cfg.eval, cfg.rollout.sampling, services, self.gold, cfg.loop.steps)
                          if cfg.eval.prompts else None)
        self._evals: dict[int, Future] = {}  # step -> its eval, merged into that step's metrics
        self._target_workers: int | None = None
        self._lock = threading.Lock()
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
            self.log(f"rollout workers {before} -> {target} asked ({pool.num_workers} serving, {pool.num_starting} "
                     f"starting; {time.perf_counter() - t0:.1f}s)")  # growth never waits: actors/pool.py scale_to

    # -- one step ------------------------------------------------------------------------------------
    def _train(self, p: ScoredRollouts, wall_start: float, sync_s: float) -> dict:
        learner = self.services.learner
        version_before = learner.version
        fresh = trainable_mask(p.table, version_before, self.services.plan.max_staleness)
        valid = p.table.column("reward_valid").to_numpy(zero_copy_only=False).astype(bool)
        mask = fresh & p.keep
        n_invalid = int((~valid).sum())
        n_stale = int((valid & ~fresh).sum())
        t0 = time.perf_counter()
        train_metrics: dict = {}
        if mask.any():
            with failing_as(f"learner failed at step {p.step}"):
                train_metrics = learner.train_step(p.table.filter(pa.array(mask)))
        train_s = time.perf_counter() - t0
        stale = staleness(p.table, version_before)
        gold = self.gold(p.table.column("prompt").to_pylist(), p.table.column("response").to_pylist()) \
            if self.gold else None
        self.run.write_rollouts(p.step, provenance(p.table, p.step, mask, gold,
                                                   why=untrained_reasons(p.table, fresh, p.keep)))
        self.state.samples += int(mask.sum())
        self.state.dropped_stale += n_stale
        self.state.invalid_rewards += n_invalid
        self.state.uniform_groups += p.groups_uniform
        m = {k: float(v) for k, v in train_metrics.items() if isinstance(v, (int, float))}
        m.update(rollout_stats(p.table, p.gen_s))
        m.update({"gen_s": p.gen_s, "reward_s": p.reward_s, "train_s": train_s, "sync_s": sync_s,
                  # bytes one weight sync sends each worker (learner.lora.sync adapter: the adapter's alone)
                  "sync_bytes": learner.weight_manifest().total_bytes,
                  "num_workers": p.num_workers, "policy_version": learner.version,
                  "staleness_mean": float(stale.mean()), "staleness_max": int(stale.max()),
                  "dropped_stale": n_stale, "invalid_rewards": n_invalid, "trained_samples": int(mask.sum()),
                  "sampling_draws": p.draws, "uniform_groups": p.groups_uniform})
        if gold is not None:
            m["gold_mean"] = float(np.mean(gold))
        if p.table.num_rows:  # the newest reward model version that scored this step (report marks switches)
            m["reward_model_version"] = int(p.table.column("reward_model_version").to_numpy().max())
        m["wall_s"] = time.perf_counter() - wall_start
        return m

    def _finish_step(self, step: int, m: dict) -> None:
        # Idle: the learner neither trains nor sends weights (it waits for rollouts or the controller).
        busy = m["train_s"] + m["sync_s"]
        m["learner_idle_frac"] = max(0.0, 1.0 - busy / m["wall_s"]) if m["wall_s"] > 0 else 0.0
        m.update(self._eval_result(step))
        self.state.step = step + 1
        self.producer.trained(step)
        self.run.log_metrics(step, m)
        self.on_step(step, m)
        every = self.cfg.loop.checkpoint_every
        if every and self.state.step % every == 0 and self.state.step < self.cfg.loop.steps:
            self.checkpoint()

    # -- held-out evaluation ------------------------------------------------------------------------
    def _start_eval(self, ex: ThreadPoolExecutor, step: int) -> None:
        """Queue an eval of the policy the workers hold now, if one is due; it runs on the rollout
        thread (never beside a generate) and lands in step `step`'s metrics."""
        version = self.services.learner.version
        if self.evaluator is not None and self.evaluator.due(version):
            self._evals[step] = ex.submit(self.evaluator.run, step, version)

    def _eval_result(self, step: int) -> dict:
        future = self._evals.pop(step, None)
        if future is None:
            return {}
        try:
            m, table = future.result(timeout=self.cfg.loop.timeout_s)
        except FutureTimeout:
            raise JobFailed(f"the eval at step {step} took longer than loop.timeout_s") from None
        self.run.write_rollouts(step, table, split="eval")
        return m

    def _final_eval(self, ex: ThreadPoolExecutor) -> None:
        """After the last step: the final policy on the held-out prompts, as a metrics row of its own."""
        steps = self.cfg.loop.steps
        if self.evaluator is None or self.stop.is_set() or self.state.step < steps:
            return
        sync_s = self._publish(steps - 1) if self.cfg.loop.mode == "async" else 0.0  # sync: already there
        self._start_eval(ex, steps)
        m = self._eval_result(steps)
        if m:
            m.update({"policy_version": self.services.learner.version, "sync_s": sync_s})
            self.run.log_metrics(steps, m)
            self.on_step(steps, m)

    # -- the loops ---------------------------------------------------------------------------------------
    def run_loop(self) -> None:
        with ThreadPoolExecutor(1, thread_name_prefix="rollout") as ex:
            try:
                self._run_sync(ex) if self.cfg.loop.mode == "sync" else self._run_async(ex)
                self._final_eval(ex)
            finally:
                ex.shutdown(wait=True, cancel_futures=True)
        self.checkpoint()

    def _run_sync(self, ex: ThreadPoolExecutor) -> None:
        for step in range(self.state.step, self.cfg.loop.steps):
            if self.stop.is_set():
                return
            self._apply_scaling()
            t0 = time.perf_counter()
            self._start_eval(ex, step)
            produced = self._wait(ex.submit(self.producer.produce, step), step)
            m = self._train(produced, t0, sync_s=0.0)
            m["sync_s"] = self._publish(step)
            m["wall_s"] = time.perf_counter() - t0
            self._finish_step(step, m)

    def _run_async(self, ex: ThreadPoolExecutor) -> None:
        """Up to `loop.max_staleness` steps' rollouts in flight (at least one) while the learner trains."""
        first, last = self.state.step, self.cfg.loop.steps
        depth = max(1, self.cfg.loop.max_staleness)
        pending = self._pending  # a resume's saved steps first
        nxt = pending[-1][0] + 1 if pending else first

        def fill() -> None:
            nonlocal nxt
            while nxt < last and len(pending) < depth:
                pending.append((nxt, ex.submit(self.producer.produce, nxt)))
                nxt += 1

        inflight = self.cfg.loop.mode == "inflight"
        self._start_eval(ex, first)
        fill()
        for step in range(first, last):
            t0 = time.perf_counter()
            produced = self._wait(pending[0][1], step)
            if self.stop.is_set():
                return  # still pending: the final checkpoint saves it
            pending.popleft()
            # async: the previous step's weights go out once its successor's rollouts are in (nothing
            # generates then); inflight: they went out right after training, into the generation in flight
            sync_s = self._publish(step - 1) if step > first and not inflight else 0.0
            self._apply_scaling()
            if step > first:
                self._start_eval(ex, step)
            fill()
            m = self._train(produced, t0, sync_s)
            if inflight:
                m["sync_s"] = self._publish(step)
                m["wall_s"] = time.perf_counter() - t0
            self._finish_step(step, m)

    def _wait(self, future: Future, step: int) -> ScoredRollouts:
        try:
            return future.result(timeout=self.cfg.loop.timeout_s)
        except FutureTimeout:
            raise JobFailed(f"rollouts of step {step} took longer than loop.timeout_s="
                            f"{self.cfg.loop.timeout_s:.0f}s") from None

    def _publish(self, step: int) -> float:
        """Send the weights trained at `step` to the rollout workers; seconds it took."""
        with failing_as(f"weight sync failed after step {step}"):
            return self.services.publish_weights()

    # -- checkpoints ---------------------------------------------------------------------------------
    def _settled_in_flight(self) -> list[ScoredRollouts]:
        """The productions in flight, waited for, in step order, up to the first that will not come (one
        cancelled when the loop stopped, or one that failed): its prompts are drawn again on resume."""
        out = []
        for step, future in self._pending:
            if future.cancelled() or step != self.state.step + len(out):
                break
            try:
                out.append(future.result(timeout=self.cfg.loop.timeout_s))
            except Exception:  # noqa: BLE001 - a failed production is redone on resume; the loop reports it
                break
        return out

    def checkpoint(self) -> None:
        """Learner state, loop state, prompt order and the steps generated but not trained yet: a
        resumed run goes on exactly as this one would have (async and inflight included)."""
        staging = self.run.checkpoint_staging(self.state.step)
        with failing_as(f"checkpoint at step {self.state.step} failed"):
            self.services.learner.save_checkpoint(str(staging / "learner"))
        in_flight = self._settled_in_flight()
        save_in_flight(staging, in_flight)
        saved_through = in_flight[-1].step if in_flight else None
        state = {"loop": asdict(self.state), "policy_version": self.services.learner.version,
                 "prompts": self.producer.resume_prompt_state(saved_through),
                 "in_flight_steps": [p.step for p in in_flight], "num_workers": self.services.pool.num_workers}
        path = self.run.commit_checkpoint(staging, self.state.step, state)
        self.run.record_weights(self.state.step, self.services.learner.version,
                                tensor_digests(path / "learner" / "policy"),
                                replay_requirements(self.cfg, self.services.learner.device_kind))
        self.run.prune_checkpoints(self.cfg.loop.keep_checkpoints)
        self.log(f"checkpoint {path}")

