"""RL metrics exported through `ray.util.metrics`, so they land on every node's Prometheus endpoint
(as `ray_rlhf_<name>`) and in the Ray dashboard's metrics views beside Ray's own."""
from __future__ import annotations

# step metric key -> (gauge name, description)
EXPORTED = {
    "reward_mean": ("rlhf_reward_mean", "mean reward of the step's samples"),
    "reward_std": ("rlhf_reward_std", "std of the step's rewards"),
    "gold_mean": ("rlhf_gold_score", "mean gold score of the step's samples (when the task has one)"),
    "kl": ("rlhf_kl", "KL(policy || reference) per token"),
    "policy_loss": ("rlhf_policy_loss", "policy loss"),
    "value_loss": ("rlhf_value_loss", "value loss (PPO with critic)"),
    "clip_frac": ("rlhf_clip_fraction", "fraction of clipped ratios"),
    "rollout_tokens_per_s": ("rlhf_rollout_tokens_per_s", "generated tokens per second"),
    "step_s": ("rlhf_learner_step_seconds", "learner train_step seconds"),
    "sync_s": ("rlhf_weight_sync_seconds", "weight publish seconds"),
    "policy_version": ("rlhf_policy_version", "learner policy version"),
    "staleness_mean": ("rlhf_sample_staleness", "mean versions between sample and learner"),
    "num_workers": ("rlhf_rollout_workers", "live rollout workers"),
    "invalid_rewards": ("rlhf_invalid_rewards", "samples whose reward was invalid this step"),
    "dropped_stale": ("rlhf_dropped_stale_samples", "samples dropped for staleness this step"),
    "step": ("rlhf_step", "training step"),
}


class RLGauges:
    def __init__(self, job: str):
        from ray.util.metrics import Gauge

        self._gauges = {}
        for key, (name, desc) in EXPORTED.items():
            g = Gauge(name, description=desc, tag_keys=("job",))
            g.set_default_tags({"job": job})
            self._gauges[key] = g

    def update(self, metrics: dict) -> None:
        for key, g in self._gauges.items():
            v = metrics.get(key)
            if isinstance(v, (int, float)):
                g.set(float(v))
