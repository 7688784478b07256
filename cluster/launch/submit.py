"""`rlhf submit`: `ray job submit -- rlhf train CONFIG` with the config shipped in the job's working dir.

The config file travels as the job's `working_dir` (so CONFIG need not exist on the head node);
paths inside it (models, prompts, run_dir) must be valid on the cluster. Token auth: when this
machine holds a Ray auth token, the CLI is run with RAY_AUTH_MODE=token (Ray 2.60 requires it).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from cluster.config import load_config
from cluster.errors import UsageError
from cluster.launch.ray_session import use_token_auth

JOB_CONFIG_NAME = "job.yaml"
# What a head that is up but still starting answers (retried); "connection refused" is not here.
NOT_READY = ("No available agent", "RemoteDisconnected", "Connection aborted")


def ray_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ray.scripts.scripts", *args]


def submit_argv(address: str, overrides: list[str], working_dir: str, submission_id: str) -> list[str]:
    # No env_vars: the job resolves its device on the cluster, and every actor it starts gets the
    # device profile's environment (contract.devices.DeviceProfile.actor_env) there.
    runtime_env = {"working_dir": working_dir}
    return ray_cli("job", "submit", "--address", address, "--submission-id", submission_id, "--runtime-env-json",
                   json.dumps(runtime_env), "--no-wait", "--", "rlhf", "train", JOB_CONFIG_NAME,
                   *(shlex.quote(o) for o in overrides))


def auth_env() -> dict[str, str]:
    use_token_auth()
    return dict(os.environ)


def submit_command(config: str, overrides: list[str], address: str, wait: bool = True,
                   agent_wait_s: float = 120.0) -> int:
    """Submit, then (unless --no-wait) follow the job's logs and exit 0 only if it SUCCEEDED.

    A freshly started head answers "No available agent" or drops the connection for a few seconds:
    retried until `agent_wait_s`."""
    load_config(config, overrides)  # a typo fails here, not minutes later on the cluster
    if not address.startswith(("http://", "https://")):
        raise UsageError(f"--address {address!r}: expected the dashboard URL, e.g. http://HEAD:8265")
    env = auth_env()
    submission_id = f"rlhf-{uuid.uuid4().hex[:8]}"
    staging = Path(tempfile.mkdtemp(prefix="rlhf-submit-"))
    try:
        shutil.copyfile(config, staging / JOB_CONFIG_NAME)
        deadline = time.monotonic() + agent_wait_s
        while True:
            r = subprocess.run(submit_argv(address, overrides, str(staging), submission_id), env=env,
                               capture_output=True, text=True)
            if r.returncode == 0:
                break
            out = r.stdout + r.stderr
            if any(m in out for m in NOT_READY) and time.monotonic() < deadline:
                time.sleep(2)
                continue
            last = [line for line in out.splitlines() if line.strip()][-1:] or ["(no output)"]
            raise UsageError(f"ray job submit to {address} failed: {last[0].strip()}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"rlhf submit: job {submission_id} submitted to {address}", flush=True)
    if not wait:
        return 0
    subprocess.run(ray_cli("job", "logs", submission_id, "--address", address, "--follow"), env=env)
    from ray.job_submission import JobSubmissionClient

    final = str(JobSubmissionClient(address).get_job_status(submission_id).value)
    print(f"rlhf submit: job {submission_id} {final}", flush=True)
    return 0 if final == "SUCCEEDED" else 1
