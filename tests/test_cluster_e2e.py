"""End to end through the real stack: local Ray, vLLM workers, the reward Serve app, DeepSpeed ranks
over gloo. Each job start costs 1.5-2 minutes on a 2-core box (process spawns and imports), so
scenarios share runs:

1. `rlhf submit` (`ray job submit`) of a sync PPO job to a local cluster with the dashboard; while it
   runs: `rlhf scale` 1 -> 2 -> 1, kill -9 of a rollout worker, `rlhf status`, Prometheus scrape.
2. an async GRPO run one of whose learner ranks is killed with SIGKILL: the job stops in one line
   naming the resume command; `rlhf train --resume`, whose driver is then killed with SIGKILL; and
   `rlhf train --resume` again to the end.
3. a reward service that cannot score: one line, non-zero exit.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.compute as pc
import pytest

from cluster.outputs.run_dir import RunDir
from contract.datasets import PromptIterator, load_prompts
from contract.net import free_port
from support_jobs import (PROMPTS_PER_STEP, VENV_BIN, check_exactly_once, cli_env, failed_lines, metrics_rows, rlhf, start_train,
                          wait_for, write_job)


pytestmark = pytest.mark.slow














def check_data_order(prompts: Path, table, steps: int) -> None:
    """Each step's prompts are those an uninterrupted run would have drawn at that step."""
    it = PromptIterator(load_prompts(prompts), seed=0)
    for step in range(steps):
        want = sorted(it.next_batch(PROMPTS_PER_STEP).column("prompt_id").to_pylist())
        rows = table.filter(pc.equal(table.column("step"), step))
        assert sorted(set(rows.column("prompt_id").to_pylist())) == want, step


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL a driver started with start_new_session=True and whatever of its cluster outlived it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)
    time.sleep(3)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def local_cluster(tmp_path):
    """A Ray head with the dashboard from `ray start --block`: stopping that process stops only this
    cluster (never `ray stop`, which would take down every cluster on the box). Every port is picked
    free, the dashboard agent's included: its default (52365) is taken when another cluster runs here."""
    import ray

    gcs_port, dash, metrics, agent, client = (free_port() for _ in range(5))
    proc = subprocess.Popen(
        [os.path.join(VENV_BIN, "ray"), "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=8",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent}",
         f"--ray-client-server-port={client}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env(), start_new_session=True)
    try:
        wait_for(lambda: _http_ok(f"http://127.0.0.1:{dash}/api/version"), 120, "the dashboard", proc)
        yield {"gcs": f"{ray.util.get_node_ip_address()}:{gcs_port}", "dashboard": f"http://127.0.0.1:{dash}",
               "metrics": metrics}
    finally:  # SIGTERM, then the whole session: a graceful `ray start --block` exit took a minute here
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status < 500
    except OSError as e:
        return getattr(e, "code", 500) < 500


def _prometheus(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _actor_pid(dashboard: str, name: str) -> int | None:
    r = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "list", "actors", "--address", dashboard,
                        "--filter", f"name={name}", "--filter", "state=ALIVE", "--format", "json"],
                       capture_output=True, text=True, timeout=60, env=cli_env(RAY_AUTH_MODE="token"))
    rows = json.loads(r.stdout or "[]") if r.returncode == 0 else []
    return rows[0]["pid"] if rows else None


def _workers_from(run: Path, first_step: int) -> set[str]:
    import pyarrow.parquet as pq

    files = [f for f in (run / "rollouts").glob("step=*.parquet") if int(f.stem.split("=")[1]) >= first_step]
    return {w for f in files for w in pq.read_table(f, columns=["worker_id"]).column("worker_id").to_pylist()}


@pytest.mark.timeout(900)  # 7 min on an idle 2-core box: a head, a job, two worker starts
def test_submitted_sync_job_scales_survives_a_killed_worker_and_exports_metrics(tmp_path, tiny_models, local_cluster):
    run = tmp_path / "run"
    # Far more steps than the test lets it run: it ends the job with `rlhf stop` once everything happened.
    job = write_job(tmp_path, tiny_models, "e2e-sync", run, loop={"steps": 100000})
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "submit", str(job), "--address",
                             local_cluster["dashboard"]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=cli_env())
    gcs = local_cluster["gcs"]
    try:
        wait_for(lambda: len(metrics_rows(run)) >= 2, 420, "two steps", proc)
        r = rlhf("scale", "--workers", "2", "--address", gcs)
        assert r.returncode == 0, r.stderr
        up = wait_for(lambda: next((m["step"] for m in metrics_rows(run) if m["num_workers"] == 2), None), 180,
                      "a step with 2 workers", proc)
        pid = wait_for(lambda: _actor_pid(local_cluster["dashboard"], "rollout-1"), 60, "rollout-1's pid")
        os.kill(pid, signal.SIGKILL)
        killed_at = len(metrics_rows(run))
        wait_for(lambda: "rollout-2" in _workers_from(run, killed_at), 240, "samples from the replacement", proc)
        text = wait_for(lambda: (t := _prometheus(local_cluster["metrics"])) and "ray_rlhf_rollout_workers" in t and t,
                        60, "RL gauges on the Prometheus endpoint")
        status = rlhf("status", "--address", gcs)
        assert status.returncode == 0 and "job e2e-sync (sync): running" in status.stdout, status.stderr
        assert rlhf("scale", "--workers", "1", "--address", gcs).returncode == 0
        down = len(metrics_rows(run))
        wait_for(lambda: any(m["num_workers"] == 1 for m in metrics_rows(run)[down:]), 120, "back to 1 worker", proc)
        assert rlhf("stop", "--address", gcs).returncode == 0
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "SUCCEEDED" in out, out[-3000:]
    for gauge in ("ray_rlhf_reward_mean", "ray_rlhf_kl", "ray_rlhf_policy_version", "ray_rlhf_weight_sync_seconds",
                  "ray_rlhf_rollout_tokens_per_s", "ray_rlhf_gold_score", "ray_rlhf_sample_staleness"):
        assert f"{gauge}{{" in text, gauge
    steps = len(metrics_rows(run))
    table = check_exactly_once(run, steps)  # across the scale-up, the kill -9 and the scale-down
    # sync: every sample was generated by the policy of its own step, replacement worker included
    assert table.column("policy_version").to_pylist() == table.column("step").to_pylist()
    assert all(table.column("trained").to_pylist())
    step_worker = list(zip(table.column("step").to_pylist(), table.column("worker_id").to_pylist()))
    assert min(s for s, w in step_worker if w == "rollout-1") >= up
    assert {w for s, w in step_worker if s < up} == {"rollout-0"}
    counts = [m["num_workers"] for m in metrics_rows(run)]
    assert counts[0] == 1 and 2 in counts and counts[-1] == 1, counts
    assert (run / "report.png").stat().st_size > 0 and list((run / "tb").iterdir())
    assert RunDir(run).latest_checkpoint().name == f"step={steps:06d}"  # the stop checkpointed


@pytest.mark.timeout(1200)  # three job starts
def test_async_run_survives_a_killed_learner_rank_then_a_killed_driver(tmp_path, tiny_models):
    """One async GRPO run on 2 ranks, three drivers: a learner rank SIGKILLed (the job stops in one
    line naming the resume command; the last checkpoint is whole), a resume whose driver is SIGKILLed
    after its next checkpoint, and a resume that finishes. Every sample exactly once throughout, in
    the order an uninterrupted run draws, at most one version behind the learner that trained on it."""
    every, dashboard = 2, free_port()
    run = tmp_path / "run"
    job = write_job(tmp_path, tiny_models, "e2e-crashes", run,
                    loop={"steps": 100000, "mode": "async", "max_staleness": 1, "checkpoint_every": every},
                    learner={"rl": {"algorithm": "grpo", "minibatch_size": 8, "micro_batch_size": 4}},
                    ray={"dashboard_port": dashboard})
    resume_cmd = f"resume with: rlhf train --resume {run.resolve()}"

    # 1. a learner rank killed: rank 0 waits in a collective for a peer that is gone, and must not hang
    out = tmp_path / "driver1.out"
    driver = start_train([str(job)], out)
    try:
        # the pid first (a lookup takes seconds, steps take less), so the kill lands soon after the checkpoint
        wait_for(lambda: "learner group up" in out.read_text(), 400, "the learner group", driver)
        pid = wait_for(lambda: _actor_pid(f"http://127.0.0.1:{dashboard}", "learner-rank-1"), 60,
                       "learner-rank-1's pid", driver)
        wait_for(lambda: RunDir(run).latest_checkpoint(), 300, "the first checkpoint", driver)
        os.kill(pid, signal.SIGKILL)
        rc = driver.wait(300)  # stops by itself: a dead rank is an error, not a hang
    finally:
        kill_session(driver)
    failed = failed_lines(out.read_text())
    assert rc == 1 and len(failed) == 1, out.read_text()[-3000:]
    assert "learner" in failed[0] and "rank" in failed[0], failed[0]
    assert failed[0].endswith(resume_cmd), failed[0]
    # the last checkpoint is complete; an interrupted save (a .tmp staging dir) is never one
    ckpts = RunDir(run).checkpoints()
    assert all(c.name.startswith("step=") and ".tmp" not in c.name for c in ckpts), ckpts
    last = ckpts[-1]
    assert str(last) in failed[0]
    first_resume = int(last.name.removeprefix("step="))
    saved = json.loads((last / "controller.json").read_text())
    assert saved["loop"]["step"] == saved["policy_version"] == first_resume >= every
    learner = last / "learner"
    assert json.loads((learner / "learner_state.json").read_text())["version"] == first_resume
    assert (learner / "policy" / "config.json").is_file() and list((learner / "deepspeed" / "policy").iterdir())
    assert not [p for p in last.rglob("*") if ".tmp" in p.name], "leftover temp files in the checkpoint"

    # 2. resumed (endless), then its driver SIGKILLed once it has checkpointed again
    out = tmp_path / "driver2.out"
    driver = start_train(["--resume", str(run)], out)
    try:
        wait_for(lambda: RunDir(run).latest_checkpoint().name >= f"step={first_resume + every:06d}", 400,
                 "a checkpoint after the resume", driver)
    finally:
        kill_session(driver)
    assert f"at step {first_resume}, policy version {first_resume}" in out.read_text(), out.read_text()[-3000:]

    # 3. resumed again, told where to end (a resume may change loop.steps)
    resume_at = int(RunDir(run).latest_checkpoint().name.removeprefix("step="))
    steps = resume_at + 2
    r = rlhf("train", "--resume", str(run), f"loop.steps={steps}", timeout=500)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at step {resume_at}" in r.stdout
    metrics = metrics_rows(run)
    assert [m["step"] for m in metrics] == list(range(steps))  # each failed run's steps past its checkpoint redone
    assert [m["policy_version"] for m in metrics[resume_at:]] == list(range(resume_at + 1, steps + 1))
    table = check_exactly_once(run, steps)
    check_data_order(tmp_path / "prompts.jsonl", table, steps)  # same order as an uninterrupted run
    # one step off: a sample is at most one version behind the learner that trained on it
    for step, version in zip(table.column("step").to_pylist(), table.column("policy_version").to_pylist()):
        assert version in (max(0, step - 1), step), (step, version)
    assert all(table.column("trained").to_pylist())
    assert json.loads((RunDir(run).latest_checkpoint() / "controller.json").read_text())["policy_version"] == steps


def test_reward_service_that_cannot_score_fails_in_one_line(tmp_path, tiny_models):
    job = write_job(tmp_path, tiny_models, "e2e-badreward", tmp_path / "run",
                    reward={"model_dir": None, "functions": [{"path": "json:loads"}]})
    r = rlhf("train", str(job), timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert r.returncode != 0
    assert lines[-1].startswith("rlhf train: failed: reward service cannot score"), r.stderr[-2000:]
