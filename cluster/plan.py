"""The job plan: every value a job derives from its config, derived here once, frozen and typed.

A config says what the user wants; some of what the services need follows from several sections at
once (the learner scores at the temperature the rollouts sample at; an adapter sync needs engines
started with LoRA of the learner's rank). Those values are derived by `make_job_plan` and nowhere
else; each service is handed its own part of the plan:

| part             | derived from                                        | read by                        |
|------------------|-----------------------------------------------------|--------------------------------|
| `learner`        | learner.rl + rollout.sampling.{temperature,          | LearnerGroup -> its ranks      |
|                  | max_new_tokens} + loop.mode (`learner.algorithm`)   | (`Plan.temperature` is what    |
|                  |                                                     | log_softmax divides by)        |
| `max_staleness`  | loop.mode, loop.max_staleness                       | the loop's trainable mask, the |
|                  |                                                     | learner's experience check     |
| `rollout`        | rollout + learner.lora (engine.lora_rank)           | RolloutPool -> workers/engines |
|                  | + loop.mode (inflight_updates)                      |                                |
| `reward_replicas`| reward.num_replicas / reward.autoscaling            | preflight's demand and memory  |

`rlhf train` builds it at preflight (what it cannot resolve is a one-line error before anything
starts); the job's services are started from it (`cluster/job/services.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

from actors.config import RolloutConfig
from cluster.config import JobConfig
from learner.algorithm import Plan, make_plan


@dataclass(frozen=True)
class JobPlan:
    learner: Plan           # what one update needs beyond learner.*: scoring temperature, correction, lengths
    max_staleness: int      # oldest policy lag (versions) a step trains on: loop.max_staleness unless sync, then 0
    rollout: RolloutConfig  # the rollout section as the engines run it (engine.lora_rank from learner.lora,
                            # inflight_updates from loop.mode)
    reward_replicas: int    # scorer replicas the job starts with


def make_job_plan(cfg: JobConfig) -> JobPlan:
    """Raises ValueError naming the key of what cannot be resolved."""
    sampling, asynchronous = cfg.rollout.sampling, cfg.loop.mode != "sync"
    lora = cfg.learner.lora
    engine_lora_rank = lora.r if lora is not None and lora.sync == "adapter" else 0  # actors/adapter.py
    auto = cfg.reward.autoscaling or {}
    return JobPlan(
        learner=make_plan(cfg.learner.rl, temperature=sampling.temperature, async_rollouts=asynchronous,
                          max_new_tokens=sampling.max_new_tokens),
        max_staleness=cfg.loop.max_staleness if asynchronous else 0,
        rollout=cfg.rollout.model_copy(update={"inflight_updates": cfg.loop.mode == "inflight",
                                               "engine": cfg.rollout.engine.model_copy(
                                                   update={"lora_rank": engine_lora_rank})}),
        reward_replicas=int(auto.get("min_replicas", 1) or 1) if auto else cfg.reward.num_replicas)
