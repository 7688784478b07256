"""The shipped monitoring files: the Grafana dashboard is what `cluster/monitoring/dashboard.py`
builds and covers every RL gauge; the Prometheus config is the one Ray documents and passes
Debian's `promtool check config`. (That every panel's query returns data from a running job is
checked against a real Prometheus in test_reward_service_review_job.py.)"""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from cluster.job.gauges import EXPORTED, TAG
from cluster.monitoring.dashboard import JSON_PATH, build, panel_queries

PROMETHEUS_YML = JSON_PATH.parent / "prometheus.yml"


def test_shipped_dashboard_is_what_the_builder_makes():
    assert json.loads(JSON_PATH.read_text()) == build(), "run: python -m cluster.monitoring.dashboard"


def test_every_gauge_is_on_a_panel_and_every_query_is_filtered_by_job_and_session():
    queries = panel_queries(build())
    on_panels = {re.search(r"ray_(rlhf_\w+)\{", q).group(1) for _, q in queries}
    assert on_panels == {name for name, _ in EXPORTED.values()}
    for title, q in queries:
        assert q.startswith(f"max by ({TAG}) (") and '$rlhf_job' in q and "$SessionName" in q, (title, q)
    names = [v["name"] for v in build()["templating"]["list"]]
    assert names == ["datasource", "SessionName", "Cluster", TAG]
    for wanted in ("Reward", "Gold", "KL", "eval", "Staleness", "tokens/s", "Weight sync", "workers",
                   "Importance-sampling"):
        assert any(wanted.lower() in title.lower() for title, _ in queries), wanted
    assert len({p["id"] for p in build()["panels"]}) == len(build()["panels"])


def test_prometheus_config_is_rays_documented_one():
    from ray.dashboard.modules.metrics.templates import PROMETHEUS_YML_TEMPLATE

    ours = yaml.safe_load(PROMETHEUS_YML.read_text())
    rays = yaml.safe_load(PROMETHEUS_YML_TEMPLATE.format(
        prom_metrics_service_discovery_file_path="/tmp/ray/prom_metrics_service_discovery.json"))
    assert ours == rays


@pytest.mark.skipif(not shutil.which("promtool"), reason="Debian's prometheus package (make sysdeps) is missing")
def test_promtool_accepts_the_prometheus_config():
    r = subprocess.run(["promtool", "check", "config", "--syntax-only", str(PROMETHEUS_YML)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
