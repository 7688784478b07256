"""Start and stop the reward Serve app on the current Ray cluster.

`deploy` checks what it can in this process first (model dir, function import paths, store dir),
so a typo is a one-line error here rather than a replica crash loop in the cluster.
HTTP lives at http://{http_host}:{http_port}/{name}/... (routes in `http.py`, the review page at
/{name}/review), behind the app's token (`app_token`).
"""
from __future__ import annotations

import hashlib
import logging
import os
import secrets
import sys
from pathlib import Path

import ray
from ray import serve
from ray.serve.exceptions import RayServeException

from contract.config_base import ConfigError
from contract.devices import DeviceProfile
from contract.user_code import load_function
from reward_service.client import RewardClient
from reward_service.config import RewardConfig
from reward_service.replicas import RewardFeedback, RewardScorer
from reward_service.versions import ModelVersions

__all__ = ["deploy", "shutdown", "RewardClient"]
log = logging.getLogger(__name__)


def _check(cfg: RewardConfig) -> None:
    if cfg.model_dir and not (Path(cfg.model_dir) / "config.json").is_file():
        raise ConfigError(f"reward.model_dir: {cfg.model_dir} is not a model directory (no config.json)")
    if cfg.feedback.seed_file and not Path(cfg.feedback.seed_file).is_file():
        raise ConfigError(f"reward.feedback.seed_file: {cfg.feedback.seed_file} not found")
    if cfg.autoscaling:
        from ray.serve.config import AutoscalingConfig

        try:
            AutoscalingConfig(**cfg.autoscaling)
        except Exception as e:  # pydantic or Ray's own validation, whichever this Ray version uses
            raise ConfigError(f"reward.autoscaling: {' '.join(str(e).split()[3:])[:300]}") from None
    sys.path[:0] = [p for p in cfg.python_path if p not in sys.path]
    for f in cfg.functions:
        try:
            load_function(f.path, "reward.functions")
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _replica_env(cfg: RewardConfig, device: DeviceProfile, threads: int) -> dict[str, str]:
    env = device.actor_env(threads)
    if cfg.python_path:
        # Ray expands ${PYTHONPATH} to what the worker would have had, so nothing is dropped.
        env["PYTHONPATH"] = os.pathsep.join([str(Path(p).resolve()) for p in cfg.python_path] + ["${PYTHONPATH}"])
    return env


def app_token(cfg: RewardConfig, store: Path) -> tuple[str, str]:
    """(token, where it is): the environment variable `reward.token_env` if set, else a random token
    kept in `<store>/token` (mode 0600, the same across restarts of the app on this run)."""
    token = os.environ.get(cfg.token_env) if cfg.token_env else None
    if token:
        return token, f"${cfg.token_env}"
    path = store / "token"
    if not path.is_file() or not path.read_text().strip():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24))
    return path.read_text().strip(), str(path)


def deploy(cfg: RewardConfig, store_dir: str | Path, name: str = "reward",
           device: DeviceProfile = DeviceProfile("cpu"), rollouts_dir: str | Path | None = None,
           metrics_file: str | Path | None = None) -> RewardClient:
    """Run app `name` (deployments RewardScorer + RewardFeedback) and return its client. Replicas
    start with the device profile's actor environment. The review page shows the samples of
    `rollouts_dir` (step=N.parquet files) and the curves of `metrics_file` (JSON lines) when given."""
    _check(cfg)
    store = Path(store_dir).resolve()
    store.mkdir(parents=True, exist_ok=True)
    token, token_source = app_token(cfg, store)
    token_sha = hashlib.sha256(token.encode()).hexdigest()
    model = ModelVersions(store).start(cfg.model_dir) if cfg.model_dir else None
    review = {"rollouts_dir": str(Path(rollouts_dir).resolve()) if rollouts_dir else None,
              "metrics_file": str(Path(metrics_file).resolve()) if metrics_file else None}
    threads = max(1, int(cfg.cpus_per_replica))
    scaling = ({"autoscaling_config": cfg.autoscaling, "num_replicas": "auto"} if cfg.autoscaling
               else {"num_replicas": cfg.num_replicas})
    # The store lives on this node's disk, so its replica must too.
    here = {f"node:{ray.util.get_node_ip_address()}": 0.001}
    feedback = RewardFeedback.options(ray_actor_options={"num_cpus": 0, "resources": here}).bind(
        str(store), cfg.feedback.ngram, cfg.feedback.threshold,
        str(Path(cfg.feedback.seed_file).resolve()) if cfg.feedback.seed_file else None, review)
    scorer = RewardScorer.options(
        max_ongoing_requests=2 * cfg.max_batch_size,  # >= the batch size, or Serve caps batches at 5
        ray_actor_options={"num_cpus": cfg.cpus_per_replica,
                           "runtime_env": {"env_vars": _replica_env(cfg, device, threads)},
                           **({"resources": dict(cfg.resources)} if cfg.resources else {})},  # reward.resources
        **scaling,
    ).bind(cfg.model_dump(), token_sha, feedback, model)
    try:
        serve.start(http_options={"host": cfg.http_host, "port": cfg.http_port},
                    controller_options={"runtime_env": {"env_vars": SERVE_CONTROLLER_ENV}})
        # serve.run's wait for RUNNING has no limit (a replica no node can take would hold the job
        # forever): the same deploy without it, then the same wait with reward.start_timeout_s.
        serve._run(scorer, _blocking=False, name=name, route_prefix=f"/{name}",
                   logging_config={"enable_access_log": False})
        _wait_running(name, cfg.start_timeout_s)
    except BaseException:
        shutdown(name)  # Serve's actors are detached: a half-started app would outlive the job
        raise
    return RewardClient(name, _with_running_http(cfg), token_source)


# Serve's controller kills an HTTP proxy not ready 5 s after its creation, and `serve.start` then fails
# ("The actor never ran - it was cancelled"). A job starts its learner and engines at the same time
# as the reward app, and on a busy node the proxy's imports alone take longer than that (seen on 2
# cores). Seconds, for its first start (Serve allows n times as long for its n-th).
SERVE_CONTROLLER_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30"}


def _wait_running(name: str, timeout_s: float) -> None:
    from ray.serve.context import _get_global_client

    try:
        _get_global_client()._wait_for_application_running(name, timeout_s=timeout_s)
    except TimeoutError:
        raise TimeoutError(f"reward.start_timeout_s={timeout_s:g}: the reward app was not running after "
                           f"{timeout_s:g}s (replicas no node can take wait: see reward.resources, "
                           "reward.cpus_per_replica, reward.num_replicas)") from None


def _with_running_http(cfg: RewardConfig) -> RewardConfig:
    """Serve keeps the HTTP host/port of its first start: report the one really serving."""
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    if (http.host, http.port) != (cfg.http_host, cfg.http_port):
        log.warning("Serve already listens on %s:%s; reward.http_host/http_port %s:%s not applied",
                    http.host, http.port, cfg.http_host, cfg.http_port)
        cfg = cfg.model_copy(update={"http_host": http.host, "http_port": http.port})
    return cfg


def shutdown(name: str = "reward") -> None:
    """Delete app `name`; stop Serve itself when no other app is left."""
    if not ray.is_initialized():
        return
    try:
        serve.delete(name)
        if not serve.status().applications:
            serve.shutdown()
    except (RuntimeError, ray.exceptions.RayError, RayServeException):
        pass  # Serve was never started on this cluster, or is gone already
