"""Refuse, at start, a run directory that the learner's node does not share with the controller.

The learner ranks write each checkpoint on their own node (into RUN/ckpt/.step=N.tmp/learner),
and the controller, on the driver's node, commits it and reads it back on `--resume`. On a
multi-node cluster RUN must therefore be one storage both nodes mount (NFS, a PVC, ...). A
node-local path would only show at the first checkpoint, hours in; this checks it before the
first step with a round trip: the controller writes a token file, a zero-CPU task on every node
holding a learner rank reads it and writes its own reply beside it, and the controller reads that.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.errors import JobFailed, one_line

TIMEOUT_S = 120.0


@ray.remote(num_cpus=0, max_retries=0)
def _probe(path: str, token: str) -> dict:
    """On a learner node: does it see the controller's file, and can it write beside it?"""
    ctx = ray.get_runtime_context()
    out = {"node": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "seen": False, "error": None}
    p = Path(path)
    try:
        out["seen"] = p.read_text() == token
        Path(f"{path}.{out['node'][:12]}").write_text(token)
    except OSError as e:
        out["error"] = f"{type(e).__name__}: {e.strerror or e}"
    return out


def check_shared_run_dir(run_root: str | Path, learner_nodes: list[str]) -> None:
    """Raise JobFailed (one line) unless every node in `learner_nodes` reads and writes `run_root`
    as this process sees it."""
    root = Path(run_root)
    token = uuid.uuid4().hex
    probe = root / f".shared-storage-check-{token[:8]}"
    probe.write_text(token)
    try:
        for node in dict.fromkeys(learner_nodes):
            try:
                r = ray.get(_probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                            .remote(str(probe), token), timeout=TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - the node went away, or the probe could not run
                raise JobFailed(f"run_dir check: no answer from the learner's node {node[:12]} ({one_line(e)})") from None
            reply = Path(f"{probe}.{r['node'][:12]}")
            back = reply.read_text() if reply.is_file() else None
            if r["seen"] and back == token:
                continue
            why = (f"it cannot use the directory ({r['error']})" if r["error"] else
                   "it does not see a file the controller wrote there" if not r["seen"] else
                   "the controller does not see the file it wrote there")
            raise JobFailed(f"run_dir {root} is not shared storage: the learner's node {r['ip']} ({node[:12]}) "
                            f"writes checkpoints there, but {why}; put run_dir on storage every node mounts "
                            f"(cluster/manifests/rayjob.yaml: the rlhf-runs volume at /runs)")
    finally:
        for f in root.glob(f"{probe.name}*"):
            f.unlink(missing_ok=True)
