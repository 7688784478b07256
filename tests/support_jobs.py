"""Shared test helpers (not a test module): running `rlhf` jobs in subprocesses and checking their run directories."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc

from cluster.outputs.run_dir import RunDir
from contract.net import free_port


VENV_BIN = str(Path(sys.executable).parent)


PROMPTS_PER_STEP, N = 4, 2


def cli_env(**extra) -> dict:
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", RAY_metrics_report_interval_ms="1000", **extra)
    env.pop("RAY_ADDRESS", None)
    return env


def rlhf(*args, timeout=180, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(**env))


def write_job(tmp: Path, tiny_models, name: str, run_dir: Path, **sections) -> Path:
    prompts = tmp / "prompts.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"red cat {i} runs"}) + "\n"
                                   for i in range(16)))
    tree = {
        "name": name, "run_dir": str(run_dir),
        "model": {"policy": str(tiny_models["policy"])},
        "data": {"prompts": str(prompts), "prompts_per_step": PROMPTS_PER_STEP},
        "rollout": {"num_workers": 1, "sampling": {"n": N, "max_new_tokens": 8}},
        "reward": {"model_dir": str(tiny_models["reward"]), "http_port": free_port(), "max_retries": 1},
        "learner": {"num_ranks": 2, "lr": 1e-3, "critic_lr": 1e-3, "rl": {"minibatch_size": 8, "micro_batch_size": 4}},
        "loop": {"gold_function": "reward_service.functions:colour_fraction"},
        "ray": {"dashboard_port": free_port(), "namespace": name},
    }
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(tree))
    return path


def start_train(args: list[str], out: Path) -> subprocess.Popen:
    """`rlhf train ARGS` in a session of its own (killable with its whole tree), stdout and stderr to `out`."""
    with open(out, "w") as o:
        return subprocess.Popen([sys.executable, "-m", "cluster.cli", "train", *args], stdout=o,
                                stderr=subprocess.STDOUT, text=True, env=cli_env(), start_new_session=True)


def failed_lines(text: str) -> list[str]:
    """The one-line failures `rlhf train` printed."""
    return [line for line in text.splitlines() if line.startswith("rlhf train: failed:")]


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read()[-3000:] if proc.stdout else ""
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}: {out}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def actor_pid(dashboard: str, name: str) -> int | None:
    """The pid of the live actor `name`, from the cluster's state API (`ray list actors`) at `dashboard`."""
    r = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "list", "actors", "--address", dashboard,
                        "--filter", f"name={name}", "--filter", "state=ALIVE", "--format", "json"],
                       capture_output=True, text=True, timeout=60, env=cli_env(RAY_AUTH_MODE="token"))
    rows = json.loads(r.stdout or "[]") if r.returncode == 0 else []
    return rows[0]["pid"] if rows else None


def metrics_rows(run: Path) -> list[dict]:
    return RunDir(run).read_metrics()


def check_exactly_once(run: Path, steps: int, per_step: int = PROMPTS_PER_STEP, n: int = N):
    """One Parquet file per step, each with exactly prompts x n unique samples."""
    table = RunDir(run).read_rollouts()
    assert sorted(set(table.column("step").to_pylist())) == list(range(steps))
    for step in range(steps):
        rows = table.filter(pc.equal(table.column("step"), step))
        keys = list(zip(rows.column("prompt_id").to_pylist(), rows.column("sample_idx").to_pylist()))
        assert len(keys) == per_step * n and len(set(keys)) == len(keys), (step, keys)
    return table
