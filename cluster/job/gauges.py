"""RL metrics exported through `ray.util.metrics`, so they land on every node's Prometheus endpoint
(as `ray_rlhf_<name>`, labelled `rlhf_job=<job name>`) and in the Ray dashboard's metrics views
beside Ray's own; cluster/monitoring/ has the Grafana dashboard and the Prometheus scrape config.

The label is `rlhf_job`, not `job`: Prometheus gives every scraped series its own `job` label (the
scrape job, "ray"), and a metric label of that name would be renamed `exported_job`.
A key a step does not report (no gold function, no eval this step, no IS correction) leaves its
gauge unset: Prometheus then has no series for it, which a dashboard shows as "no data".
"""
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
    "eval_reward_mean": ("rlhf_eval_reward_mean", "mean reward on the held-out eval prompts (steps with an eval)"),
    "eval_gold_mean": ("rlhf_eval_gold_score", "mean gold score on the held-out eval prompts (steps with an eval)"),
    "rollout_tokens_per_s": ("rlhf_rollout_tokens_per_s", "generated tokens per second"),
    "step_s": ("rlhf_learner_step_seconds", "learner train_step seconds"),
    "wall_s": ("rlhf_step_seconds", "wall-clock seconds of the whole step"),
    "learner_idle_frac": ("rlhf_learner_idle_fraction", "share of the step the learner waited"),
    "sync_s": ("rlhf_weight_sync_seconds", "weight publish seconds"),
    "sync_bytes": ("rlhf_weight_sync_bytes", "bytes a weight publish sends each rollout worker (the adapter's "
                   "alone with learner.lora.sync: adapter)"),
    "policy_version": ("rlhf_policy_version", "learner policy version"),
    "staleness_mean": ("rlhf_sample_staleness", "mean versions between sample and learner"),
    "staleness_max": ("rlhf_sample_staleness_max", "most versions a sample of the step was behind"),
    "num_workers": ("rlhf_rollout_workers", "live rollout workers"),
    "is_weight_mean": ("rlhf_is_weight_mean", "mean importance-sampling weight (rollout correction)"),
    "is_weight_max": ("rlhf_is_weight_max", "largest importance-sampling weight (rollout correction)"),
    "is_truncated_frac": ("rlhf_is_truncated_fraction", "share of IS weights truncated"),
    "is_masked_frac": ("rlhf_is_masked_fraction", "share of tokens masked by the IS correction"),
    "invalid_rewards": ("rlhf_invalid_rewards", "samples whose reward was invalid this step"),
    "dropped_stale": ("rlhf_dropped_stale_samples", "samples dropped for staleness this step"),
    "reward_model_version": ("rlhf_reward_model_version", "reward model version that scored the step"),
    "step": ("rlhf_step", "training step"),
}
TAG = "rlhf_job"


class RLGauges:
    def __init__(self, job: str):
        from ray.util.metrics import Gauge

        self._gauges = {}
        for key, (name, desc) in EXPORTED.items():
            g = Gauge(name, description=desc, tag_keys=(TAG,))
            g.set_default_tags({TAG: job})
            self._gauges[key] = g

    def update(self, metrics: dict) -> None:
        for key, g in self._gauges.items():
            v = metrics.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:  # NaN: leave the last value
                g.set(float(v))
