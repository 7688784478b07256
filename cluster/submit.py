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
import uuid
from pathlib import Path

from cluster.config import load_config
from cluster.errors import UsageError

JOB_CONFIG_NAME = "job.yaml"


def submit_argv(address: str, overrides: list[str], working_dir: str, wait: bool, submission_id: str) -> list[str]:
    env_vars = {"TORCHDYNAMO_DISABLE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
    runtime_env = {"working_dir": working_dir, "env_vars": env_vars}
    argv = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", address,
            "--submission-id", submission_id, "--runtime-env-json", json.dumps(runtime_env)]
    if not wait:
        argv.append("--no-wait")
    return argv + ["--", "rlhf", "train", JOB_CONFIG_NAME, *(shlex.quote(o) for o in overrides)]


def auth_env() -> dict[str, str]:
    env = dict(os.environ)
    if "RAY_AUTH_MODE" not in env and (env.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").is_file()):
        env["RAY_AUTH_MODE"] = "token"
    return env


def submit_command(config: str, overrides: list[str], address: str, wait: bool = True) -> int:
    load_config(config, overrides)  # a typo fails here, not minutes later on the cluster
    if not address.startswith(("http://", "https://")):
        raise UsageError(f"--address {address!r}: expected the dashboard URL, e.g. http://HEAD:8265")
    staging = Path(tempfile.mkdtemp(prefix="rlhf-submit-"))
    try:
        shutil.copyfile(config, staging / JOB_CONFIG_NAME)
        submission_id = f"rlhf-{uuid.uuid4().hex[:8]}"
        print(f"rlhf submit: job {submission_id} -> {address}", flush=True)
        return subprocess.run(submit_argv(address, overrides, str(staging), wait, submission_id),
                              env=auth_env()).returncode
    finally:
        shutil.rmtree(staging, ignore_errors=True)
