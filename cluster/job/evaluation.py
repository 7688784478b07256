"""Held-out evaluation: the current policy on prompts it is never trained on.

Between steps the rollout pool samples every held-out prompt `eval.n` times with the eval's own
sampling settings, the reward service scores them (and the gold function, when the task has one),
and the step's metrics gain `eval_reward_mean`, `eval_gold_mean`, `eval_policy_version`. The
samples are written to `rollouts/eval_step=NNNNNN.parquet` with `split = "eval"` and
`trained = false`; they never reach the learner. The eval of a step is written with that step,
so a resume that redoes the step redoes its eval (the run directory truncates both).
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from actors.config import SamplingConfig
from cluster.config import EvalConfig
from cluster.job.produce import generate_and_score
from cluster.job.rollout_table import provenance, verifier_stats
from contract.datasets import load_prompts


class Evaluator:
    def __init__(self, cfg: EvalConfig, rollout_sampling: SamplingConfig, services, gold, steps: int):
        self.cfg, self.services, self.gold, self.steps = cfg, services, gold, steps
        from transformers import AutoTokenizer

        self.prompts = load_prompts(cfg.prompts, cfg.columns, AutoTokenizer.from_pretrained(services.pool.model_dir))
        self.sampling = SamplingConfig(n=cfg.n, temperature=cfg.temperature, seed=cfg.seed,
                                       max_new_tokens=cfg.max_new_tokens or rollout_sampling.max_new_tokens,
                                       stop=rollout_sampling.stop)

    def due(self, steps_done: int) -> bool:
        """Whether to evaluate once `steps_done` steps are trained (0: the starting policy)."""
        return steps_done % self.cfg.every_steps == 0 or steps_done == self.steps

    def run(self, step: int, version: int) -> tuple[dict, pa.Table]:
        """Metrics and the provenance table of one eval of the policy at `version`."""
        t0 = time.perf_counter()
        table, _, _ = generate_and_score(self.services, self.prompts, self.sampling, f"in the eval at step {step}",
                                         one_version=True)
        valid = table.column("reward_valid").to_numpy(zero_copy_only=False).astype(bool)
        gold = None
        if self.gold is not None:
            gold = self.gold(table.column("prompt").to_pylist(), table.column("response").to_pylist())
        reward = table.column("reward").to_numpy(zero_copy_only=False)[valid]
        versions = table.column("policy_version").to_numpy()
        m = {"eval_reward_mean": float(np.mean(reward)), "eval_samples": table.num_rows,
             "eval_policy_version": int(versions.min()), "eval_s": time.perf_counter() - t0}
        if int(versions.max()) != int(versions.min()) or int(versions.min()) != version:
            m["eval_policy_version_max"] = int(versions.max())
        if gold is not None:
            m["eval_gold_mean"] = float(np.mean(gold))
        m.update(verifier_stats(table, prefix="eval_"))
        return m, provenance(table, step, np.zeros(table.num_rows, dtype=bool), gold, split="eval")
