"""The job config: each package's own section composed into one typed model, from YAML + overrides.

`rlhf train cfg.yaml rollout.num_workers=4 learner.rl.clip=0.2` — overrides are dotted keys whose
values are parsed as YAML scalars/lists. A bad config raises one `ConfigError` listing every
problem, one line each, naming the key. `rlhf config [SECTION]` prints the defaults as commented
YAML, rendered from the models themselves (`cluster/config_yaml.py`).
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from actors.config import RolloutConfig
from contract.config_base import ConfigError, Section, describe_validation_errors
from contract.datasets import Columns
from learner.config import LearnerConfig
from reward_service.config import RewardConfig

CONFIGS_DIR = Path(__file__).parent / "configs"  # the shipped job YAMLs
PLACEHOLDER = re.compile(r"^<[^<>]+>$")  # `<required>` and the like: a value the user must fill in


class EvalConfig(Section):
    prompts: str | None = Field(None, description="held-out prompt file (same formats as data.prompts); None: no "
                                                  "evaluation")
    every_steps: int = Field(10, ge=1, description="evaluate before the first step and after every this many steps "
                                                   "(and after the last); each eval costs one generate call")
    n: int = Field(1, ge=1, description="samples per held-out prompt")
    temperature: float = Field(0.0, ge=0.0, description="eval sampling temperature; 0 = greedy, the policy's "
                                                        "most likely answer, so evals are comparable across steps")
    max_new_tokens: int | None = Field(None, ge=1, description="None: rollout.sampling.max_new_tokens")
    seed: int = Field(0, description="per-prompt sampling seed base, so evals at different steps draw alike")
    columns: Columns = Field(default_factory=Columns, description="column names of eval.prompts (chat "
                                                                  "`messages` are rendered with the policy's chat "
                                                                  "template), as data.columns for data.prompts")


class DynamicSamplingConfig(Section):
    enabled: bool = Field(False, description="drop groups whose rewards are all equal (no GRPO/RLOO signal) and "
                                             "draw more prompts until the step has data.prompts_per_step groups with "
                                             "signal (DAPO); off by default: it costs extra generation")
    max_draws: int = Field(3, ge=1, description="generate calls per step at most (the first included); bounds the "
                                                "cost when most groups are uniform")
    min_std: float = Field(0.0, ge=0.0, description="a group counts as uniform when the std of its rewards is <= "
                                                    "this (0: exactly equal)")


class ModelConfig(Section):
    policy: str = Field(..., description="HF causal-LM directory of the pretrained (SFT) policy; also the frozen "
                                         "KL reference and, by default, the critic's init")


class DataConfig(Section):
    prompts: str = Field(..., description="Parquet, JSONL or datasets save_to_disk directory with a `prompt` "
                                          "or chat `messages` column (and an optional unique `id`)")
    prompts_per_step: int = Field(8, ge=1, description="prompts drawn per step (each sampled rollout.sampling.n "
                                                       "times); seeded, reshuffled every epoch")
    columns: Columns = Field(default_factory=Columns, description="column names of data.prompts: a plain `prompt`, "
                                                                  "or chat `messages` rendered with the policy's "
                                                                  "chat template; a DatasetDict directory's split")


class LoopConfig(Section):
    steps: int = Field(10, ge=1, description="training steps (one generate + score + learner update each)")
    mode: Literal["sync", "async", "inflight"] = Field("sync", description=(
        "sync: fully on-policy; async: the next step's rollouts are generated while the learner trains "
        "(faster, samples one version old); inflight: as async, and each new version is loaded into the "
        "engines as soon as it is trained, between two engine steps of the responses in flight (they carry "
        "on under it: per-token versions in the Parquet's token_versions)"))
    max_staleness: int = Field(1, ge=0, description=(
        "async/inflight only: a sample whose oldest token is more than this many policy versions behind the "
        "learner is not trained on (kept in the Parquet with trained=false, counted as dropped_stale); 1 fits "
        "one-step-off"))
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0: only at the end")
    keep_checkpoints: int = Field(2, ge=0, description="newest checkpoints kept on disk; 0 keeps all; 2 survives "
                                                       "a crash during a save")
    gold_function: str | None = Field(None, pattern=r"^[\w.]+:\w+$",
                                      description="package.module:function of a known gold score, logged beside "
                                                  "the reward (not trained on); null: none")
    timeout_s: float = Field(1800.0, gt=0, description="seconds; limit of one whole step before the job is "
                                                       "declared stuck")
    dynamic_sampling: DynamicSamplingConfig = Field(default_factory=DynamicSamplingConfig,
                                                    description="DAPO dynamic sampling: train only on groups "
                                                                "whose rewards differ")


class RayConfig(Section):
    address: str | None = Field(None, description="attach to this cluster (HOST:6379, auto, ray://...); null: "
                                                  "RAY_ADDRESS, else an embedded local cluster")
    num_cpus: int | None = Field(None, ge=1, description="embedded cluster only: logical CPUs; null: the machine's "
                                                         "cores, at least what the job asks + 4 to scale")
    dashboard_host: str = Field("127.0.0.1", description="embedded cluster only: dashboard bind address; loopback "
                                                         "keeps it private")
    dashboard_port: int = Field(8265, ge=1, le=65535, description="embedded cluster only: dashboard port (Ray's "
                                                                  "default)")
    metrics_export_port: int | None = Field(None, ge=1, le=65535, description="embedded cluster only: Prometheus "
                                                                              "port; null: Ray picks a free one")
    namespace: str = Field("rlhf", description="Ray namespace of the job's named actors; two jobs on one cluster "
                                               "need two namespaces")
    check_resources: bool = Field(True, description="before anything starts, compare the CPUs/GPUs the job asks "
                                                    "with what the cluster has; false on an autoscaling cluster "
                                                    "that adds nodes on demand")


class JobConfig(Section):
    name: str = Field("rlhf", pattern=r"^[\w.-]+$", description="run name: runs/<name>-<timestamp>, metric tags")
    seed: int = Field(0, description="prompt order and learner init seed; a resumed run replays the same order")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto | cpu | cuda: picks gloo/NCCL, the "
                                                                       "vLLM build and GPU placement; auto: cuda "
                                                                       "when this machine sees a GPU")
    run_dir: str | None = Field(None, description="run directory; null: runs/<name>-<timestamp>")
    model: ModelConfig = Field(..., description="the policy")
    data: DataConfig = Field(..., description="the training prompts")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="vLLM rollout workers")
    reward: RewardConfig = Field(..., description="the reward service: a reward model and/or functions")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="the DeepSpeed learner group and "
                                                                              "the RL algorithm")
    loop: LoopConfig = Field(default_factory=LoopConfig, description="the training loop")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="held-out evaluation between steps")
    ray: RayConfig = Field(default_factory=RayConfig, description="the Ray cluster")

    @model_validator(mode="after")
    def _consistent(self) -> "JobConfig":
        """Settings that contradict each other, all listed."""
        problems = []
        algorithm = getattr(getattr(self.learner, "rl", None), "algorithm", None)
        if algorithm in ("grpo", "rloo") and self.rollout.sampling.n < 2:
            problems.append(f"rollout.sampling.n: {algorithm} compares the samples of a prompt with each other and "
                            f"needs n >= 2 (got {self.rollout.sampling.n}); with 1 every advantage is 0")
        if self.reward.model_dir and self.reward.max_length <= self.rollout.sampling.max_new_tokens:
            problems.append(f"reward.max_length: {self.reward.max_length} must exceed "
                            f"rollout.sampling.max_new_tokens ({self.rollout.sampling.max_new_tokens}), or the "
                            f"reward model scores responses cut short")
        if self.rollout.engine.lora_rank:
            problems.append(f"rollout.engine.lora_rank: a job derives it from learner.lora (r when lora.sync is "
                            f"adapter, else 0; cluster/plan.py); remove it (got {self.rollout.engine.lora_rank})")
        if self.rollout.inflight_updates:
            problems.append("rollout.inflight_updates: a job derives it from loop.mode (on for inflight; "
                            "cluster/plan.py); remove it and set loop.mode: inflight")
        lora = getattr(self.learner, "lora", None)
        if self.loop.mode == "inflight" and lora is not None and lora.sync == "adapter":
            problems.append("loop.mode: inflight loads full weights mid-generation; a LoRA adapter sync would "
                            "swap the adapter under requests in flight: set learner.lora.sync: merged")
        if problems:
            raise ValueError("\n".join(problems))
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


def placeholders(tree, path: str = "") -> list[str]:
    """Values still `<like this>` (a shipped YAML's or `rlhf config`'s blanks), one line each."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    out = []
    for k, v in items:
        key = f"{path}[{k}]" if isinstance(k, int) else f"{path}.{k}" if path else str(k)
        if isinstance(v, str) and PLACEHOLDER.match(v):
            out.append(f"{key}: fill in {v} (e.g. {key}=VALUE)")
        out += placeholders(v, key)
    return out


def build(model: type[Section], tree: dict, source: str = "config"):
    """Validate `tree`; every problem (blanks, unknown keys, bad values, contradictions) in one ConfigError."""
    problems = placeholders(tree)
    try:
        cfg = model.model_validate(tree)
    except ValidationError as e:
        problems += [p for p in describe_validation_errors(e, model) if p.split(":")[0] not in
                     {b.split(":")[0] for b in problems}]
    if problems:
        raise ConfigError(*(f"{source}: {p}" for p in problems))
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None,
                model: type[Section] = JobConfig, source: str | None = None):
    """YAML file (or `base` dict) + dotted overrides -> validated config model."""
    tree = read_yaml(path) if path is not None else copy.deepcopy(base or {})
    for o in overrides:
        apply_override(tree, o)
    return build(model, tree, source or (str(path) if path else "config"))


def dump_config(cfg: Section) -> str:
    """The resolved config as YAML (what a run directory keeps)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

