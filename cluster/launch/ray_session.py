"""Attach to a Ray cluster or start an embedded one, after checking what would otherwise fail late.

An unreachable address or a port already taken are found here, before anything heavy starts, and
reported as one `UsageError` line. The embedded cluster uses `address="local"` so it never attaches
to some other cluster on the box by accident.
"""
from __future__ import annotations

import math
import os
import signal
import socket
import threading
from dataclasses import dataclass

from cluster.config import RayConfig
from cluster.errors import JobFailed, UsageError, raise_stopped
from contract.net import port_free


# What Ray's exception says when a node's raylet did not register within its fixed 30 s
# (ray/_private/node.py); `ray start` prints the same.
RAYLET_DID_NOT_REGISTER = "timed out during startup"
# Ray's fixed 30 s for a raylet to register is passed on a busy 2-core box now and then (a job starting
# beside another job or a benchmark): one more try, then the one-line error.
EMBEDDED_START_ATTEMPTS = 2


@dataclass(frozen=True)
class RaySession:
    started_here: bool  # True: an embedded cluster this process must shut down
    dashboard_url: str | None
    metrics_port: int | None
    namespace: str


def check_port(key: str, host: str, port: int) -> None:
    if not port_free(host, port):
        raise UsageError(f"{key}: port {port} on {host} is already in use; pick another with {key}=PORT")


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """`host:port` of a GCS must accept a TCP connection (ray.init would otherwise retry for minutes);
    `auto` and `ray://` client addresses are left to ray.init."""
    if address == "auto" or address.startswith("ray://"):
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address!r}: expected HOST:PORT of a Ray cluster (or 'auto')")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise UsageError(f"--address {address}: no Ray cluster reachable there ({e.strerror or e})") from None


def use_token_auth() -> None:
    """Ray 2.60 clusters use token auth by default; a driver attaching from outside (or the `ray`
    CLI) needs RAY_AUTH_MODE=token when this machine holds the token. Call before `import ray`."""
    from pathlib import Path

    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN")
                                              or (Path.home() / ".ray" / "auth_token").is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"


def connect(cfg: RayConfig, address: str | None, env: dict[str, str],
            own_ports: dict[str, tuple[str, int]] | None = None, cpus_needed: float = 0) -> RaySession:
    """Attach to `address` / RAY_ADDRESS / cfg.address, else start an embedded cluster with the dashboard.

    `own_ports` ({config key: (host, port)}) are ports the job will listen on in an embedded cluster
    (e.g. the reward service's HTTP port); they are checked before it starts. An embedded cluster
    gets at least `cpus_needed` logical CPUs plus room to scale, whatever the core count: on a small
    box the actors mostly wait on each other, and an unsatisfiable reservation would hang the job.
    """
    session = _connect(cfg, address, env, own_ports, cpus_needed)
    # ray.init's SIGTERM handling ends the driver with a C stack dump; SIGTERM unwinds like Ctrl-C instead
    # (the embedded cluster is shut down, nothing half written; `rlhf train` installs its graceful stop over it)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_stopped)
    return session


def _connect(cfg: RayConfig, address: str | None, env: dict[str, str],
             own_ports: dict[str, tuple[str, int]] | None, cpus_needed: float) -> RaySession:
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or cfg.address
    # Actor output stays in Ray's logs and the dashboard; the controller relays its own messages.
    quiet = dict(namespace=cfg.namespace, logging_level="WARNING", log_to_driver=False)
    if address:  # no runtime_env here: inside `ray job submit` it would clash with the job's own
        check_reachable(address)
        try:
            ray.init(address=address, **quiet)
        except ConnectionError as e:
            raise UsageError(f"--address {address}: {str(e).splitlines()[0]}") from None
        return RaySession(False, None, _metrics_port(ray), cfg.namespace)
    check_port("ray.dashboard_port", cfg.dashboard_host, cfg.dashboard_port)
    for key, (host, port) in (own_ports or {}).items():
        check_port(key, host, port)
    if cfg.metrics_export_port is not None:
        check_port("ray.metrics_export_port", "127.0.0.1", cfg.metrics_export_port)
    extra = {} if cfg.metrics_export_port is None else {"_metrics_export_port": cfg.metrics_export_port}
    num_cpus = cfg.num_cpus or max(os.cpu_count() or 1, math.ceil(cpus_needed) + 4)
    info = start_local(EMBEDDED_START_ATTEMPTS, num_cpus=num_cpus, include_dashboard=True,
                       runtime_env={"env_vars": env}, dashboard_host=cfg.dashboard_host,
                       dashboard_port=cfg.dashboard_port, **extra, **quiet)
    if info is None:
        raise JobFailed(f"the embedded Ray cluster did not start: its raylet did not register within Ray's 30 s "
                        f"({EMBEDDED_START_ATTEMPTS} tries; a busy machine?); run again, or start one with "
                        f"`ray start --head` and pass --address")
    return RaySession(True, f"http://{info.dashboard_url}", _metrics_port(ray), cfg.namespace)


def start_local(attempts: int, **init_kwargs):
    """`ray.init(address="local", **init_kwargs)`, tried up to `attempts` times while its raylet misses
    Ray's fixed 30 s to register (a busy box); the processes a failed try started are shut down and
    killed before the next. Returns ray.init's answer, or None when every try timed out so."""
    import psutil
    import ray

    me = psutil.Process()
    for _ in range(attempts):
        before = {p.pid for p in me.children(recursive=True)}
        try:
            return ray.init(address="local", **init_kwargs)
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception when its raylet does not register
            if RAYLET_DID_NOT_REGISTER not in str(e):
                raise
            ray.shutdown()
            for p in me.children(recursive=True):
                if p.pid not in before:
                    p.kill()
    return None


def _metrics_port(ray) -> int | None:
    """The Prometheus endpoint of the node this process runs on."""
    me = ray.util.get_node_ip_address()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    node = next((n for n in alive if n.get("NodeManagerAddress") == me), alive[0] if alive else {})
    return node.get("MetricsExportPort")
