"""The `reward` config section: what scores a (prompt, response) and how the Serve app runs."""
from __future__ import annotations

from pydantic import Field, model_validator

from contract.config_base import Section


class RewardFunctionConfig(Section):
    path: str = Field(..., pattern=r"^[\w.]+:\w+$", description="package.module:function, batched signature")
    weight: float = 1.0


class FeedbackConfig(Section):
    alpha: float = Field(0.0, ge=0.0, le=1.0, description="r = alpha*r_feedback + (1-alpha)*r_model")
    ngram: int = Field(2, ge=1)
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="min n-gram overlap for a record to match")
    seed_file: str | None = None


class RewardConfig(Section):
    model_dir: str | None = None
    model_weight: float = 1.0
    functions: list[RewardFunctionConfig] = Field(default_factory=list)
    python_path: list[str] = Field(default_factory=list,
                                   description="dirs put on the replicas' PYTHONPATH, for functions not installed")
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    max_length: int = Field(512, ge=8, description="reward model input tokens (cut from the left)")
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)
    num_replicas: int = Field(1, ge=1)
    autoscaling: dict | None = None
    cpus_per_replica: float = Field(1.0, gt=0)
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=1, le=65535)
    token_env: str = "RLHF_REWARD_TOKEN"
    request_timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(5, ge=0)

    @model_validator(mode="after")
    def _something_scores(self):
        if self.model_dir is None and not self.functions:
            raise ValueError("set reward.model_dir or at least one reward.functions entry")
        return self


class RewardModelTrainConfig(Section):
    """`rlhf train-rm`: Bradley-Terry on pairs or BCE on like/dislike labels."""

    base_model: str
    data: str
    output_dir: str
    objective: str = Field("bradley_terry", pattern="^(bradley_terry|bce)$")
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    max_length: int = Field(128, ge=8)
    seed: int = 0
    num_ranks: int = Field(1, ge=1)
