"""One step's experience: draw prompts, generate, score, and (optionally) keep only groups that teach.

Dynamic sampling (DAPO, Yu et al. 2025, sec. 3.2 "Dynamic Sampling"): a group of samples of one
prompt whose rewards are all equal has zero group-relative advantage, so it contributes no
gradient and only dilutes the batch. With `loop.dynamic_sampling.enabled`, such groups are not
trained on, and more prompts are drawn until the step has `data.prompts_per_step` groups with
signal, or `max_draws` generate calls were made (bounded: a task the policy always solves, or
never does, cannot loop forever). Groups beyond the target are not trained on either (DAPO fills
the batch, then stops). Every sample drawn is still returned: the Parquet accounts for all.

A step never holds a prompt twice: a draw that crosses an epoch boundary, or an extra draw, skips
prompts the step already has (it may then train on slightly fewer prompts). Prompts are drawn only
here, by one thread at a time, and the iterator state before each step's
first draw is recorded: a resumed run redraws the first untrained step from exactly there, so the
extra draws of dynamic sampling never skip or repeat a prompt across a resume.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from actors.config import SamplingConfig
from cluster.config import DynamicSamplingConfig
from cluster.errors import JobFailed, failing_as
from cluster.job.rollout_table import scored
from contract.datasets import PromptIterator


@dataclass
class ScoredRollouts:
    """One step's samples, generated and scored, with how long each part took."""

    step: int
    table: pa.Table          # every sample drawn this step, EXPERIENCE_SCHEMA
    keep: np.ndarray         # [rows] bool: False for groups dynamic sampling set aside
    gen_s: float
    reward_s: float
    num_workers: int
    draws: int = 1           # generate calls made for this step
    groups_uniform: int = 0  # groups whose rewards were all equal


def uniform_groups(table: pa.Table, min_std: float) -> np.ndarray:
    """[rows] bool: the row's group (same prompt_id) has reward std <= min_std over its valid rows."""
    pids = np.asarray(table.column("prompt_id").to_pylist(), dtype=object)
    reward = table.column("reward").to_numpy(zero_copy_only=False).astype(np.float64)
    valid = table.column("reward_valid").to_numpy(zero_copy_only=False).astype(bool)
    out = np.zeros(table.num_rows, dtype=bool)
    for pid in dict.fromkeys(pids.tolist()):
        rows = pids == pid
        r = reward[rows & valid]
        out[rows] = len(r) < 2 or float(r.std()) <= min_std
    return out


class StepProducer:
    def __init__(self, services, prompts: PromptIterator, prompts_per_step: int, dynamic: DynamicSamplingConfig):
        self.services, self.prompts = services, prompts
        self.prompts_per_step, self.dynamic = prompts_per_step, dynamic
        self._lock = threading.Lock()
        self._drawn: deque[tuple[int, dict]] = deque()  # (step, iterator state before its first draw)

    # -- prompt order and resume ------------------------------------------------------------------
    def _draw(self, step: int, size: int, first: bool) -> pa.Table:
        with self._lock:
            if first:
                self._drawn.append((step, self.prompts.state_dict()))
            return self.prompts.next_batch(size)

    def resume_prompt_state(self, saved_through: int | None = None) -> dict:
        """Iterator state from which a resumed run draws: that before the first step not trained nor
        saved with the checkpoint (`saved_through`: the last step whose rollouts were saved)."""
        with self._lock:
            for step, state in self._drawn:
                if saved_through is None or step > saved_through:
                    return state
            return self.prompts.state_dict()

    def trained(self, step: int) -> None:
        """Step `step` is done: its prompts are no longer redrawn on resume."""
        with self._lock:
            if self._drawn and self._drawn[0][0] == step:
                self._drawn.popleft()

    # -- one step -----------------------------------------------------------------------------------
    def produce(self, step: int) -> ScoredRollouts:
        target = self.prompts_per_step
        t_gen = t_rew = 0.0
        tables, keeps, uniform = [], [], 0
        have = draws = 0
        seen: set[str] = set()
        while draws == 0 or (self.dynamic.enabled and have < target and draws < self.dynamic.max_draws):
            batch = distinct_new_prompts(self._draw(step, target - have if draws else target, first=draws == 0), seen)
            if batch.num_rows == 0:
                break
            seen.update(batch.column("prompt_id").to_pylist())
            table, g_s, r_s = generate_and_score(self.services, batch, None, f"at step {step}")
            t_gen, t_rew, draws = t_gen + g_s, t_rew + r_s, draws + 1
            keep = np.ones(table.num_rows, dtype=bool)
            if self.dynamic.enabled:
                flat = uniform_groups(table, self.dynamic.min_std)
                uniform += len(set(np.asarray(table.column("prompt_id").to_pylist(), dtype=object)[flat].tolist()))
                keep = ~flat
                keep &= _first_groups(table, keep, target - have)
                have += len(set(np.asarray(table.column("prompt_id").to_pylist(), dtype=object)[keep].tolist()))
            tables.append(table)
            keeps.append(keep)
        return ScoredRollouts(step, pa.concat_tables(tables), np.concatenate(keeps), t_gen, t_rew,
                              self.services.pool.num_workers, draws, uniform)


def generate_and_score(services, batch: pa.Table, sampling: SamplingConfig | None,
                       where: str, one_version: bool = False) -> tuple[pa.Table, float, float]:
    """The pool's samples of `batch` (`sampling`: None, the rollout section's) scored by the reward
    service, with the seconds each took: a training step's path, and the held-out eval's
    (evaluation.py: `one_version`, no in-flight update inside it). No valid reward at all fails the
    job, naming `where` and the reward's reasons."""
    t0 = time.perf_counter()
    rollouts = services.pool.generate(batch, sampling, one_version)
    t1 = time.perf_counter()
    with failing_as(f"reward service failed {where}"):
        table = scored(services.reward, rollouts)
    t2 = time.perf_counter()
    if table.num_rows and not any(table.column("reward_valid").to_pylist()):
        from reward_service.client import reward_errors

        why = "; ".join(reward_errors(table)[:3]) or "no reason given"
        raise JobFailed(f"reward service returned no valid reward {where}: {why}"[:400])
    return table, t1 - t0, t2 - t1


def distinct_new_prompts(batch: pa.Table, seen: set[str]) -> pa.Table:
    """The batch without prompts already drawn this step or repeated within it (first kept). A draw
    that crosses an epoch boundary, or an extra draw of dynamic sampling, can meet a prompt twice;
    a step holds each prompt once, so its (prompt_id, sample_idx) keys stay unique."""
    keep, here = [], set()
    for pid in batch.column("prompt_id").to_pylist():
        keep.append(pid not in seen and pid not in here)
        here.add(pid)
    return batch if all(keep) else batch.filter(pa.array(keep))


def _first_groups(table: pa.Table, keep: np.ndarray, k: int) -> np.ndarray:
    """[rows] bool: rows of the first k groups (in table order) among those `keep` marks."""
    pids = np.asarray(table.column("prompt_id").to_pylist(), dtype=object)
    chosen = list(dict.fromkeys(pids[keep].tolist()))[:max(k, 0)]
    return np.isin(pids, np.asarray(chosen, dtype=object)) if chosen else np.zeros(len(pids), dtype=bool)
