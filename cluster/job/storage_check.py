"""Refuse, at start, a run directory that the learner's node does not share with the controller.

The learner ranks write each checkpoint on their own node (into RUN/ckpt/.step=N.tmp/learner),
and the controller, on the driver's node, commits it and reads it back on `--resume`. On a
multi-node cluster RUN must therefore be one storage both nodes mount (NFS, a PVC, ...). A
node-local path would only show at the first checkpoint, hours in; this checks it before the
first step with a round trip: the controller writes a token file, a zero-CPU task on each node
reads it and writes its own reply beside it, and the controller reads that.

Twice, so a bad run_dir costs seconds, not a whole start: before anything starts, on every alive
node a learner rank could be placed on (`learner_node_candidates`), and once the learner group is
placed, on its nodes not checked yet (one the autoscaler added meanwhile). The controller's own
node is never probed (it is where the file was written), so a single-node job sends no probe.
"""
from __future__ import annotations

import math
import time
import uuid
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.errors import JobFailed, one_line

TIMEOUT_S = 120.0  # one probe's answer (a worker process starting on a busy node included)


@ray.remote(num_cpus=0, max_retries=0)
def _probe(path: str, token: str) -> dict:
    """On a learner node: does it see the controller's file, and can it write beside it?"""
    ctx = ray.get_runtime_context()
    out = {"node": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "seen": False, "error": None}
    p = Path(path)
    try:
        out["seen"] = p.is_file() and p.read_text() == token
        if out["seen"]:
            Path(f"{path}.{out['node'][:12]}").write_text(token)
    except OSError as e:
        out["error"] = f"{type(e).__name__}: {e.strerror or e}"
    return out


def learner_node_candidates(bundle: dict[str, float]) -> list[str]:
    """Alive nodes whose resources (used or not) hold one learner rank's bundle: where a rank may go."""
    return [n["NodeID"] for n in ray.nodes() if n.get("Alive")
            and all(math.floor(n.get("Resources", {}).get(k, 0.0) / v + 1e-9) >= 1 for k, v in bundle.items() if v > 0)]


def check_shared_run_dir(run_root: str | Path, nodes: list[str], strict: bool = True) -> list[str]:
    """Raise JobFailed (one line) unless every node in `nodes` reads and writes `run_root` as this
    process sees it; the nodes that answered (this process's own node counts as answered).
    `strict=False` (the check before start, on candidate nodes): a node that does not answer is
    left for the check after placement instead of failing the job."""
    own = ray.get_runtime_context().get_node_id()
    todo = [n for n in dict.fromkeys(nodes) if n != own]
    if not todo:
        return [own]
    root = Path(run_root)
    token = uuid.uuid4().hex
    probe = root / f".shared-storage-check-{token[:8]}"
    probe.write_text(token)
    answered = [own]
    try:
        refs = {node: _probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                .remote(str(probe), token) for node in todo}  # in parallel: one timeout for all
        deadline = time.monotonic() + TIMEOUT_S
        for node, ref in refs.items():
            try:
                r = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
            except Exception as e:  # noqa: BLE001 - the node went away, or the probe could not run
                if not strict:
                    continue
                raise JobFailed(f"run_dir check: no answer from learner node {node[:12]} ({one_line(e)})") from None
            reply = Path(f"{probe}.{r['node'][:12]}")
            back = reply.read_text() if reply.is_file() else None
            if r["seen"] and back == token:
                answered.append(node)
                continue
            why = ("it does not see a file the controller wrote there" if not r["seen"] else
                   f"it cannot write there ({r['error']})" if r["error"] else
                   "the controller does not see the file it wrote there")
            raise JobFailed(f"run_dir {root} is not shared storage: learner node {r['ip']} ({node[:12]}) writes "
                            f"checkpoints there, but {why}; put run_dir on storage every node mounts "
                            f"(cluster/manifests/rayjob.yaml: the rlhf-runs volume at /runs)")
    finally:
        for f in root.glob(f"{probe.name}*"):
            f.unlink(missing_ok=True)
    return answered
