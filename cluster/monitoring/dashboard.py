"""The Grafana dashboard of the RL metrics, built from one table of panels.

`python -m cluster.monitoring.dashboard` rewrites `grafana_rlhf_dashboard.json` beside this file;
a test checks that the shipped JSON is what this builds, that every gauge of
`cluster/job/gauges.py` is on some panel, and (against a real Prometheus scraping a running job)
that every panel's queries return data.

Queries follow Ray's own dashboards: series of one Ray session (`$SessionName`), one KubeRay
cluster (`$Cluster`, the `ray_io_cluster` label a PodMonitor adds) and one job (`$rlhf_job`),
combined over the workers that reported them with `max by (rlhf_job)`.
"""
from __future__ import annotations

import json
from pathlib import Path

from cluster.job.gauges import TAG

JSON_PATH = Path(__file__).parent / "grafana_rlhf_dashboard.json"
UID = "rlhf-rl-metrics"
FILTER = f'{TAG}=~"$rlhf_job",SessionName=~"$SessionName",ray_io_cluster=~"$Cluster"'
# One panel: (title, unit, [(gauge name without the ray_ prefix, legend)], description)
PANELS = [
    ("Reward (mean of the step's samples)", "short", [("rlhf_reward_mean", "reward"), ("rlhf_reward_std", "std")],
     "What the policy is optimised for: reward model + functions, fused with human feedback."),
    ("Gold score", "short", [("rlhf_gold_score", "gold")],
     "The task's true objective when it has one (loop.gold_function): reward hacking shows as reward up, gold flat."),
    ("KL to the reference", "short", [("rlhf_kl", "KL per token")], "KL(policy || reference) per token."),
    ("Held-out eval", "short", [("rlhf_eval_reward_mean", "eval reward"), ("rlhf_eval_gold_score", "eval gold")],
     "Reward and gold score on the eval prompts, at the steps an eval ran."),
    ("Staleness", "short", [("rlhf_sample_staleness", "mean"), ("rlhf_sample_staleness_max", "max"),
                            ("rlhf_dropped_stale_samples", "dropped")],
     "Policy versions between a sample and the learner that trained on it (async); samples dropped as too old."),
    ("Rollout tokens/s", "short", [("rlhf_rollout_tokens_per_s", "tokens/s")], "Generated tokens per second."),
    ("Weight sync", "s", [("rlhf_weight_sync_seconds", "publish")],
     "Seconds to bring every rollout worker to the learner's weights."),
    ("Weight sync size", "bytes", [("rlhf_weight_sync_bytes", "per worker")],
     "Bytes one publish sends each rollout worker: the whole model, or the adapter alone (learner.lora.sync)."),
    ("Rollout workers", "short", [("rlhf_rollout_workers", "workers")], "Live vLLM rollout workers."),
    ("Importance-sampling weights", "short", [("rlhf_is_weight_mean", "mean"), ("rlhf_is_weight_max", "max"),
                                              ("rlhf_is_truncated_fraction", "truncated"),
                                              ("rlhf_is_masked_fraction", "masked")],
     "Rollout correction of off-policy samples (learner.rl.rollout_correction)."),
    ("Step time", "s", [("rlhf_step_seconds", "step"), ("rlhf_learner_step_seconds", "learner")],
     "Wall-clock seconds per step and of the learner's update."),
    ("Learner idle", "percentunit", [("rlhf_learner_idle_fraction", "idle")],
     "Share of a step the learner waited for rollouts."),
    ("Losses", "short", [("rlhf_policy_loss", "policy"), ("rlhf_value_loss", "value"),
                         ("rlhf_clip_fraction", "clip fraction")], "PPO losses and clipped ratio share."),
    ("Versions", "short", [("rlhf_policy_version", "policy"), ("rlhf_reward_model_version", "reward model"),
                           ("rlhf_step", "step")],
     "Policy version, reward model version (a step marks `rlhf reward-model update`) and step."),
    ("Invalid rewards", "short", [("rlhf_invalid_rewards", "invalid")], "Samples whose reward was NaN or failed."),
]


def expr(gauge: str) -> str:
    return f"max by ({TAG}) (ray_{gauge}{{{FILTER}}})"


def _panel(i: int, title: str, unit: str, series: list[tuple[str, str]], description: str) -> dict:
    return {
        "id": i + 1, "type": "timeseries", "title": title, "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 8, "x": 8 * (i % 3), "y": 8 * (i // 3)},
        "fieldConfig": {"defaults": {"unit": unit, "custom": {"lineWidth": 2, "showPoints": "auto"}}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "none"}},
        "targets": [{"datasource": {"type": "prometheus", "uid": "${datasource}"}, "expr": expr(g),
                     "legendFormat": f"{legend} ({{{{{TAG}}}}})", "refId": chr(ord("A") + k)}
                    for k, (g, legend) in enumerate(series)],
    }


def _variable(name: str, query: str, all_value: str, description: str) -> dict:
    return {"name": name, "label": name, "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "definition": query, "query": {"query": query, "refId": f"{name}-query"}, "refresh": 2,
            "includeAll": True, "allValue": all_value, "multi": False, "sort": 2, "hide": 0,
            "current": {"selected": True, "text": "All", "value": "$__all"}, "description": description}


def build() -> dict:
    return {
        "uid": UID, "title": "RLHF actor-learner: RL metrics", "tags": ["ray", "rlhf"], "editable": True,
        "schemaVersion": 39, "version": 1, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "timezone": "", "graphTooltip": 1, "annotations": {"list": []}, "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "data source", "type": "datasource", "query": "prometheus", "hide": 0,
             "current": {}, "description": "The Prometheus that scrapes the Ray cluster."},
            _variable("SessionName", "label_values(ray_rlhf_step, SessionName)", ".+", "Ray session (cluster start)."),
            _variable("Cluster", "label_values(ray_rlhf_step, ray_io_cluster)", ".*",
                      "KubeRay cluster (the ray_io_cluster label its PodMonitor adds); All elsewhere."),
            _variable(TAG, f'label_values(ray_rlhf_step{{SessionName=~"$SessionName"}}, {TAG})', ".+",
                      "The job (its `name` in the job config)."),
        ]},
        "panels": [_panel(i, *p) for i, p in enumerate(PANELS)],
    }


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of a dashboard JSON."""
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


if __name__ == "__main__":
    JSON_PATH.write_text(json.dumps(build(), indent=1) + "\n")
    print(f"wrote {JSON_PATH}")
