"""The `learner` config section: the DeepSpeed group, the RL algorithm and its coefficients."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from contract.config_base import Section


class PPOConfig(Section):
    algorithm: Literal["ppo", "grpo", "rloo", "reinforce_pp"] = "ppo"
    epochs: int = Field(1, ge=1)
    minibatch_size: int = Field(16, ge=1, description="samples per optimizer step (global)")
    micro_batch_size: int = Field(8, ge=1, description="samples per forward/backward per rank")
    clip: float = Field(0.2, gt=0)
    dual_clip: float | None = Field(None, gt=1)
    value_clip: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.5, ge=0)
    entropy_coef: float = Field(0.0, ge=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    kl_coef: float = Field(0.05, ge=0)
    kl_estimator: Literal["k1", "k3"] = "k1"
    kl_in_reward: bool = True
    whiten_advantages: bool = True
    max_grad_norm: float = Field(1.0, gt=0)


class LearnerConfig(Section):
    num_ranks: int = Field(1, ge=1)
    cpus_per_rank: float = Field(1.0, gt=0)
    gpus_per_rank: float = Field(1.0, ge=0)
    zero_stage: int = Field(0, ge=0, le=3)
    dtype: Literal["float32", "bfloat16"] = "float32"
    lr: float = Field(1e-5, gt=0)
    critic_lr: float = Field(1e-5, gt=0)
    critic_model: str | None = Field(None, description="value model init; defaults to the policy")
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    weight_sync: Literal["broadcast", "object_store"] = "broadcast"
    bucket_mb: int = Field(256, ge=1)
    sync_timeout_s: float = Field(300.0, gt=0)
    max_staleness: int = Field(0, ge=0, description="oldest policy lag accepted in a train step")
    init_timeout_s: float = Field(600.0, gt=0, description="rank start + DeepSpeed init (first run JIT-compiles)")
    step_timeout_s: float = Field(1800.0, gt=0, description="one train_step on every rank")
    dist_timeout_s: float = Field(300.0, gt=0, description="torch.distributed collective timeout")

    @model_validator(mode="after")
    def _batch_divides(self) -> "LearnerConfig":
        per_step = self.num_ranks * self.ppo.micro_batch_size
        if self.ppo.minibatch_size % per_step:
            raise ValueError(f"ppo.minibatch_size ({self.ppo.minibatch_size}) must be a multiple of "
                             f"num_ranks x ppo.micro_batch_size ({per_step})")
        return self
