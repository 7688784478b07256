"""End to end through the real stack: local Ray, vLLM workers, the reward Serve app, DeepSpeed ranks
over gloo. Each job start costs 1.5-2 minutes on a 2-core box (process spawns and imports), so
scenarios share runs:

1. an inflight GRPO run (async, weights loaded into the generation in flight) one of whose learner
   ranks is killed with SIGKILL: the job stops in one line naming the resume command; `rlhf train
   --resume`, whose driver is then killed with SIGKILL; a resume stopped by SIGTERM, and one stopped
   by Ctrl-C (SIGINT to its process group): each stops as `rlhf stop` does, with a checkpoint and the
   resume line. Then `rlhf replay` retrains the run from its Parquet files, across the three resumes,
   to bit-identical weights at every checkpoint.
2. a reward service that cannot score: one line, non-zero exit (attached to the session's Ray: the
   job fails at its start, and an embedded cluster's own start would be most of its time).

`rlhf submit` of a sync job, `rlhf scale`, a killed rollout worker, `rlhf status` and the metrics
endpoint run on the review page's job (test_reward_service_review_job.py): one job start for both.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest

from cluster.outputs.run_dir import RunDir
from contract.datasets import PromptIterator, load_prompts
from contract.net import free_port
from support_jobs import (PROMPTS_PER_STEP, actor_pid, check_exactly_once, failed_lines, metrics_rows, rlhf,
                          start_train, wait_for, write_job)


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


@pytest.mark.timeout(1500)  # four job starts
def test_inflight_run_survives_a_killed_learner_rank_a_killed_driver_and_stop_signals_and_replays(
        tmp_path, tiny_models, ray_local):
    """One inflight GRPO run on 2 ranks, four drivers: a learner rank SIGKILLed (the job stops in one
    line naming the resume command; the last checkpoint is whole), a resume whose driver is SIGKILLed
    after its next checkpoint, a resume stopped by SIGTERM and one stopped by Ctrl-C (a checkpoint
    where each stopped, the resume line, exit code 128 + the signal). Every sample exactly once
    throughout, in the order an uninterrupted run draws, its oldest token at most one version behind
    the learner that trained on it. `rlhf replay` then finds the weights of every checkpoint."""
    every, dashboard = 2, free_port()
    run = tmp_path / "run"
    job = write_job(tmp_path, tiny_models, "e2e-crashes", run,
                    loop={"steps": 100000, "mode": "inflight", "max_staleness": 1, "checkpoint_every": every},
                    learner={"rl": {"algorithm": "grpo", "minibatch_size": 8, "micro_batch_size": 4}},
                    ray={"dashboard_port": dashboard})
    resume_cmd = f"resume with: rlhf train --resume {run.resolve()}"

    # 1. a learner rank killed: rank 0 waits in a collective for a peer that is gone, and must not hang
    out = tmp_path / "driver1.out"
    driver = start_train([str(job)], out)
    try:
        # the pid first (a lookup takes seconds, steps take less), so the kill lands soon after the checkpoint
        wait_for(lambda: "learner group up" in out.read_text(), 400, "the learner group", driver)
        pid = wait_for(lambda: actor_pid(f"http://127.0.0.1:{dashboard}", "learner-rank-1"), 60,
                       "learner-rank-1's pid", driver)
        wait_for(lambda: RunDir(run).latest_checkpoint(), 300, "the first checkpoint", driver)
        os.kill(pid, signal.SIGKILL)
        rc = driver.wait(300)  # stops by itself: a dead rank is an error, not a hang
    finally:
        kill_session(driver)
    failed = failed_lines(out.read_text())
    assert rc == 1 and len(failed) == 1, out.read_text()[-3000:]
    # an embedded cluster's driver says how to get into its dashboard (a submitted job's cannot: see
    # test_reward_service_review_job, where `rlhf status` says it)
    assert re.search(rf"rlhf train: Ray dashboard http://127\.0\.0\.1:{dashboard} \(its token prompt wants the "
                     r"output of `ray get-auth-token`", out.read_text()), out.read_text()[:3000]
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

    # 3. resumed, then SIGTERM (kill, Kubernetes, Slurm, docker stop) to the driver: a graceful stop
    resume_at = int(RunDir(run).latest_checkpoint().name.removeprefix("step="))
    stopped_at = stop_by_signal(run, tmp_path / "driver3.out", ["--resume", str(run)], resume_at, "SIGTERM",
                                lambda d: d.send_signal(signal.SIGTERM), of=100000)

    # 4. resumed with a new loop.steps (a resume may change it), then Ctrl-C as a terminal sends it: SIGINT
    # to the driver's whole process group (Ray's own processes block it, the driver stops the job)
    steps = stop_by_signal(run, tmp_path / "driver4.out", ["--resume", str(run), "loop.steps=200000"], stopped_at,
                           "SIGINT", lambda d: os.killpg(d.pid, signal.SIGINT), of=200000)
    metrics = metrics_rows(run)
    assert [m["step"] for m in metrics] == list(range(steps))  # each failed run's steps past its checkpoint redone
    assert [m["policy_version"] for m in metrics[resume_at:]] == list(range(resume_at + 1, steps + 1))
    table = check_exactly_once(run, steps)
    check_data_order(tmp_path / "prompts.jsonl", table, steps)  # same order as an uninterrupted run
    # one step off: a sample is at most one version behind the learner that trained on it
    for step, version in zip(table.column("step").to_pylist(), table.column("policy_version").to_pylist()):
        assert version in (max(0, step - 1), step), (step, version)
    assert all(table.column("trained").to_pylist())
    for versions, first in zip(table.column("token_versions").to_pylist(), table.column("policy_version").to_pylist()):
        assert versions == sorted(versions) and versions[0] == first
    assert json.loads((RunDir(run).latest_checkpoint() / "controller.json").read_text())["policy_version"] == steps

    # the recorded experience retrains to the weights of every checkpoint, across the three resumes
    ledger = [e["step"] for e in RunDir(run).read_weight_ledger()]
    assert ledger == sorted(ledger) and ledger[-1] == steps and len(ledger) >= 4, ledger
    r = rlhf("replay", str(run), "--address", ray_local.get_runtime_context().gcs_address, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert r.stdout.splitlines()[-1] == (f"rlhf replay: weights bit-identical at all {len(ledger)} checkpoint(s) "
                                         f"(steps {', '.join(map(str, ledger))})"), r.stdout[-2000:]


def stop_by_signal(run: Path, out: Path, args: list[str], resume_at: int, name: str, send, of: int) -> int:
    """`rlhf train ARGS` from step `resume_at`; once it has trained a step, `send(driver)`: the job stops
    as `rlhf stop` stops it (the step in flight finished, a checkpoint at the step it stopped after, the
    resume line), exit code 128 + the signal's number. Returns the step it stopped after."""
    driver = start_train(args, out)
    try:
        # the resume line first: until then the metrics may still hold steps the last driver logged past its checkpoint
        wait_for(lambda: f"at step {resume_at}," in out.read_text(), 400, f"the resume at step {resume_at}", driver)
        wait_for(lambda: any(m["step"] >= resume_at for m in metrics_rows(run)), 300, f"a step after {resume_at}",
                 driver)
        send(driver)
        rc = driver.wait(300)
    finally:
        kill_session(driver)
    text = out.read_text()
    assert rc == 128 + getattr(signal, name), text[-3000:]
    assert f"rlhf train: {name}: stopping after the step in flight, with a checkpoint" in text, text[-3000:]
    stopped = re.search(rf"rlhf train: stopped by {name} after step (\d+) of {of}; checkpoint (\S+); "
                        rf"resume with: rlhf train --resume {re.escape(str(run.resolve()))}$", text, re.M)
    assert stopped, text[-3000:]
    step = int(stopped.group(1))
    assert step > resume_at and stopped.group(2) == str(RunDir(run).latest_checkpoint()), (step, text[-3000:])
    assert RunDir(run).latest_checkpoint().name == f"step={step:06d}"
    assert max(m["step"] for m in metrics_rows(run)) == step - 1  # nothing past the checkpoint was logged
    assert "Traceback" not in text and "interrupted" not in text, text[-3000:]
    return step


def test_reward_service_that_cannot_score_fails_in_one_line(tmp_path, tiny_models, ray_local):
    # a real function that cannot score: json.loads, called as a reward (prompts, responses), raises
    job = write_job(tmp_path, tiny_models, "e2e-badreward", tmp_path / "run",
                    reward={"model_dir": None, "functions": [{"path": "json:loads"}]})
    r = rlhf("train", str(job), "--address", ray_local.get_runtime_context().gcs_address, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert r.returncode != 0
    assert lines[-1].startswith("rlhf train: failed: reward service cannot score"), r.stderr[-2000:]
