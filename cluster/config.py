"""The job config: each package's own section composed into one typed model, from YAML + overrides.

`rlhf train cfg.yaml rollout.num_workers=4 learner.ppo.clip=0.2` — overrides are dotted keys whose
values are parsed as YAML scalars/lists. Every error is one `ConfigError` line naming the key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from actors.config import RolloutConfig
from cluster.job.evaluation import EvalConfig
from cluster.job.produce import DynamicSamplingConfig
from contract.config_base import ConfigError, Section, describe_validation_error
from learner.config import LearnerConfig
from reward_service.config import RewardConfig


class ModelConfig(Section):
    policy: str = Field(..., description="HF directory of the pretrained policy (also the reference)")
    tokenizer: str | None = None


class DataConfig(Section):
    prompts: str = Field(..., description="Parquet or JSONL file with a `prompt` column")
    prompts_per_step: int = Field(8, ge=1)


class LoopConfig(Section):
    steps: int = Field(10, ge=1)
    mode: Literal["sync", "async"] = "sync"
    max_staleness: int = Field(1, ge=0, description="async: drop samples more than k versions old")
    checkpoint_every: int = Field(0, ge=0, description="0: only at the end")
    keep_checkpoints: int = Field(2, ge=0, description="newest checkpoints kept on disk; 0 keeps all")
    gold_function: str | None = Field(None, pattern=r"^[\w.]+:\w+$",
                                      description="module:function of a known gold score, logged beside the reward")
    timeout_s: float = Field(1800.0, gt=0, description="limit of one whole step before the job is declared stuck")
    dynamic_sampling: DynamicSamplingConfig = Field(default_factory=DynamicSamplingConfig,
                                                    description="DAPO dynamic sampling: train only on groups "
                                                                "whose rewards differ")


class RayConfig(Section):
    address: str | None = Field(None, description="attach to this cluster; None: RAY_ADDRESS or embedded")
    num_cpus: int | None = Field(None, ge=1)
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = Field(8265, ge=1, le=65535)
    metrics_export_port: int | None = Field(None, ge=1, le=65535)
    namespace: str = "rlhf"


class JobConfig(Section):
    name: str = Field("rlhf", pattern=r"^[\w.-]+$")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    run_dir: str | None = None
    model: ModelConfig
    data: DataConfig
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig, description="held-out evaluation between steps")
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _loop_owns_staleness(self) -> "JobConfig":
        """The learner accepts exactly the lag the loop lets through (0 when synchronous)."""
        lag = self.loop.max_staleness if self.loop.mode == "async" else 0
        if self.learner.max_staleness != lag:
            self.learner.max_staleness = lag
        return self


def apply_override(tree: dict, override: str) -> None:
    """Set `a.b.c=value` in a nested dict (value parsed as YAML: 3, 0.2, true, [a, b], null)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: malformed key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML") from None
    node = tree
    for i, p in enumerate(parts[:-1]):
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[:i + 1])} is not a section")
        node = nxt
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    return tree


def build(model: type[Section], tree: dict, source: str = "config"):
    try:
        return model.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(f"{source}: {describe_validation_error(e)}") from None


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None,
                model: type[Section] = JobConfig):
    """YAML file (or `base` dict) + dotted overrides -> validated config model."""
    tree = read_yaml(path) if path is not None else dict(base or {})
    for o in overrides:
        apply_override(tree, o)
    return build(model, tree, str(path) if path else "config")


def dump_config(cfg: Section) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
