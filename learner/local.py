"""The update in one process with plain torch (CleanRL-style): the reference a DeepSpeed rank is
checked against, the benchmarks' baseline, and a debugger-friendly way through one step.

`LocalLearner.train_step` runs learner/update.py's `train_step`, exactly as a `LearnerRank` does;
only the `Engines` differ: here the models are plain modules (loaded as a rank loads them), the
optimizers torch AdamW (what DeepSpeed builds from rank.deepspeed_config: lr, weight decay 0,
default betas and eps) and gradients are clipped with clip_grad_norm_ at every minibatch end. Read
update.py top to bottom to follow a whole update. Training is fp32: `learner.dtype` bfloat16 is
DeepSpeed's mixed precision, which this path does not reproduce.
"""
from __future__ import annotations

import pyarrow as pa
import torch

from learner import algorithm as alg
from learner import lora, models, update
from learner.batch import Batch, prepare
from learner.config import LearnerConfig


def load_models(cfg: LearnerConfig, policy_dir: str, critic_dir: str | None, seed: int, device: str = "cpu"):
    """(policy in fp32, frozen reference in cfg.dtype or None, critic or None), as LearnerRank.setup
    builds them (learner/models.py: checkpointing, LoRA): the reference only when kl_coef > 0 (with
    LoRA the policy itself with its adapters off, no second model), the critic (a one-output
    token-classification head on critic_dir, default the policy) only for ppo, the RNG re-seeded
    right before each model so adapters and the new head start as on a rank."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    policy = models.load_policy(cfg, policy_dir).to(device)
    ref = lora.reference(policy, policy) if cfg.rl.kl_coef > 0 else None
    if cfg.rl.kl_coef > 0 and ref is None:
        ref = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=getattr(torch, cfg.dtype)).to(device).eval()
        ref.requires_grad_(False)
    critic = None
    if cfg.rl.algorithm == "ppo":
        torch.manual_seed(seed)
        critic = models.load_critic(cfg, critic_dir or policy_dir)
    return policy, ref, critic


class LocalLearner:
    """A `LearnerGroup`'s update in this process: the same arguments, metrics and, after a step, the
    same weights (tests/test_learner_local.py checks it against a 1-rank ZeRO-0 group)."""

    rank, world, collective = 0, 1, False

    def __init__(self, cfg: LearnerConfig, policy_dir: str, critic_dir: str | None = None, seed: int = 0,
                 device: str = "cpu", plan: alg.Plan | None = None, max_staleness: int = 0):
        if cfg.dtype != "float32":
            raise ValueError(f"LocalLearner trains in float32 (learner.dtype {cfg.dtype!r} is DeepSpeed's mixed "
                             f"precision)")
        self.cfg, self.seed, self.device, self.version, self.max_staleness = cfg, seed, device, 0, max_staleness
        self.plan = plan or alg.make_plan(cfg.rl)
        policy, self.ref, critic = load_models(cfg, policy_dir, critic_dir or cfg.critic_model, seed, device)
        self.actor = policy.to(device)
        self.critic = None if critic is None else critic.to(device)
        self.optimizers = {"actor": torch.optim.AdamW(models.trainable(self.actor), lr=cfg.lr, weight_decay=0.0)}
        if self.critic is not None:
            self.optimizers["critic"] = torch.optim.AdamW(models.trainable(self.critic), lr=cfg.critic_lr,
                                                          weight_decay=0.0)

    def train_step(self, experience: pa.Table) -> dict:
        """Validate, then one update; the metrics of `LearnerGroup.train_step`."""
        p = self.cfg.rl
        prep = prepare(experience, self.version, self.max_staleness, multiple_of=p.minibatch_size)
        metrics = self.train_batch(prep.batch, prep.num_samples)
        return {**metrics, "policy_version": self.version, "num_samples": prep.num_samples,
                "num_truncated": int(prep.batch.truncated.sum()), "num_dropped": prep.num_dropped,
                "staleness": self.version - 1 - prep.min_policy_version}

    def train_batch(self, b: Batch, n_real: int) -> dict:
        """One update on a prepared batch (padded to a multiple of rl.minibatch_size)."""
        metrics = update.train_step(self.cfg.rl, self.plan, self, b, n_real, self.version, self.seed,
                                    self.cfg.max_tokens_per_micro_batch)
        self.version += 1
        return metrics

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The HF-named weights a group publishes (with LoRA: merged, under the base names)."""
        return models.hf_state_dict(self.actor, {n: p.detach().clone() for n, p in self.actor.named_parameters()})

    # ---- update.Engines: torch owns the optimizers ----------------------------------------------

    def backward(self, which: str, loss: torch.Tensor) -> None:
        loss.backward()

    def set_boundary(self, last: bool) -> None:
        """Nothing to do: the optimizers step in `optimizer_step`, at the minibatch end."""

    def optimizer_step(self) -> float:
        """Each model's gradients clipped to rl.max_grad_norm, a step, zeroed; the policy's pre-clip norm."""
        norms = {}
        for which, opt in self.optimizers.items():
            model = self.actor if which == "actor" else self.critic
            norms[which] = float(torch.nn.utils.clip_grad_norm_(models.trainable(model), self.cfg.rl.max_grad_norm))
            opt.step()
            opt.zero_grad(set_to_none=True)
        return norms["actor"]

    def all_gather(self, local: torch.Tensor) -> torch.Tensor:
        return local

    def all_reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        return t
