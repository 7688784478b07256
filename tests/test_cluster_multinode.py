"""A real multi-node Ray cluster on one box: `ray.cluster_utils.Cluster` runs one raylet per node,
each with its own resources and agents; a lost node is its raylet and every process it started
SIGKILLed. The shape of cluster/manifests/: a head with no work (0 CPUs), two rollout nodes offering
`rollout`, one learner node offering `learner` and `reward`. Jobs attach with --address like on a
real cluster; real vLLM engines, a real DeepSpeed rank, the real Serve reward app.

1. a learner node whose view of the run directory is its own (a tmpfs mounted over it in a mount
   namespace of its own: what a node-local path on another machine looks like): the job is refused
   at start in one line, before the reward service, learner or engines start;
2. one job through everything else: placement by role; weight sync reaching the workers of both
   rollout nodes at one version per step; `rlhf scale` past capacity (autoscaler request, loop not
   stalled, a warning naming the worker with no node, a node added later used); a rollout node lost
   mid-run (the job goes on, every (prompt, sample) once in the Parquet); then the learner node lost
   (one line naming the resume command) and `--resume` once a learner node is back.

What one box cannot show: no autoscaler launches nodes here (`request_resources` is checked as
the request the autoscaler reads; the test adds the node itself, as a cloud provider would), and
every node shares one file system (so a non-shared run_dir is made with a private mount).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cluster.launch.ray_session import RAYLET_DID_NOT_REGISTER
from contract.net import free_port
from support_jobs import (VENV_BIN, check_exactly_once, cli_env, failed_lines, metrics_rows, rlhf, start_train,
                          wait_for, write_job)

pytestmark = pytest.mark.slow
ROLLOUT_NODE = {"num_cpus": 2, "resources": {"rollout": 1}}
LEARNER_NODE = {"num_cpus": 3, "resources": {"learner": 1, "reward": 1}}
PLACEMENT = {"rollout": {"resources": {"rollout": 1}, "placement_timeout_s": 5},
             "learner": {"resources": {"learner": 1}, "num_ranks": 1}, "reward": {"resources": {"reward": 1}}}


def add_node(cluster, **kw):
    """A node, its agents' ports picked up front. On a loaded 2-core box a node's Python agents can
    start slower than Ray waits for them (ray.cluster_utils then raises and leaves the node's
    processes behind): those processes are killed and the node started again."""
    import psutil

    me = psutil.Process()
    for attempt in range(3):
        before = {p.pid for p in me.children(recursive=True)}
        try:
            return cluster.add_node(metrics_agent_port=free_port(), runtime_env_agent_port=free_port(),
                                    dashboard_agent_listen_port=free_port(), **kw)
        except Exception:  # noqa: BLE001 - "The current node timed out during startup"
            for p in me.children(recursive=True):
                if p.pid not in before:
                    p.kill()
            if attempt == 2:
                raise
            time.sleep(5)


def kill_node(cluster, node) -> None:
    """A node lost whole: its raylet and every process it started (workers, actors) SIGKILLed."""
    import psutil
    from ray._private import ray_constants

    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    victims = raylet.children(recursive=True)
    cluster.remove_node(node, allow_graceful=False)
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def learner_nodes() -> list[str]:
    import ray

    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("learner")]


@pytest.fixture(scope="module")
def sim():
    """Head (0 CPUs, no work) + rollout nodes a and b. Learner nodes come and go per test."""
    import ray
    from ray.cluster_utils import Cluster

    from conftest import start_local_ray

    was_local = ray.is_initialized()
    ray.shutdown()  # this process drives the simulated cluster; the session's local one comes back after
    cluster = Cluster()
    try:
        add_node(cluster, num_cpus=0, include_dashboard=False)
        nodes = {"a": add_node(cluster, **ROLLOUT_NODE), "b": add_node(cluster, **ROLLOUT_NODE)}
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="multinode-test", log_to_driver=False)
        yield {"cluster": cluster, "nodes": nodes, "address": cluster.address}
    finally:
        ray.shutdown()
        cluster.shutdown()
        if was_local:
            start_local_ray()


def checkpoints(run: Path) -> list[int]:
    return sorted(int(c.name.removeprefix("step=")) for c in (run / "ckpt").glob("step=*")) or [-1]


def served_by(run: Path) -> set[str]:
    """Workers whose samples are in the run's Parquet so far."""
    return {w for f in (run / "rollouts").glob("step=*.parquet")
            for w in pq.read_table(f, columns=["worker_id"]).column("worker_id").to_pylist()}


def node_of(name: str) -> str | None:
    """The node of the live actor `name` (a Serve replica: its deployment's name)."""
    from ray._private.state import actors

    found = [a["Address"]["NodeID"] for a in actors().values() if a["State"] == "ALIVE"
             and (a["Name"] == name or name in a["ActorClassName"])]
    return found[0] if len(found) == 1 else None


def autoscaler_request() -> list[dict]:
    """The standing `request_resources` bundles, where the cluster's autoscaler (v1 or v2) reads them."""
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get, internal_kv_get_gcs_client

    if is_autoscaler_v2():
        from ray.autoscaler.v2.sdk import get_cluster_resource_state

        state = get_cluster_resource_state(internal_kv_get_gcs_client())
        return [dict(r.request.resources_bundle) for c in state.cluster_resource_constraints
                for r in c.resource_requests for _ in range(r.count)]
    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


def test_a_run_dir_the_learner_node_does_not_share_is_refused_at_start(sim, tmp_path, tiny_models):
    shared = tmp_path / "shared"
    shared.mkdir()
    ports = [free_port() for _ in range(4)]
    # The learner node sees an empty tmpfs where the driver and the controller (head) see `shared`.
    start = (f"mount -t tmpfs tmpfs {shared} && exec {VENV_BIN}/ray start --address={sim['address']} --block "
             f"--num-cpus={LEARNER_NODE['num_cpus']} --resources='{json.dumps(LEARNER_NODE['resources'])}' "
             f"--dashboard-agent-listen-port={ports[0]} --metrics-export-port={ports[1]} "
             f"--runtime-env-agent-port={ports[2]} --dashboard-agent-grpc-port={ports[3]} --disable-usage-stats")
    for attempt in range(3):  # `ray start` gives its raylet 30 s to register, too few on a loaded box (as add_node)
        with open(tmp_path / "node.out", "w") as log:
            node = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", start], stdout=log,
                                    stderr=subprocess.STDOUT, env=cli_env(), start_new_session=True)
        try:
            wait_for(learner_nodes, 180, "the learner node", node)
            break
        except AssertionError:
            if attempt == 2 or RAYLET_DID_NOT_REGISTER not in (tmp_path / "node.out").read_text():
                raise
            try:  # what the failed start left behind
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        run = shared / "run"
        job = write_job(tmp_path, tiny_models, "mn-storage", run, **PLACEMENT)
        out = tmp_path / "driver.out"
        t0 = time.monotonic()
        rc = start_train([str(job), "--address", sim["address"]], out).wait(300)
        took = time.monotonic() - t0
    finally:  # the node lost whole: `ray start` and the raylet, agents and workers it started
        import psutil

        try:
            procs = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        node.wait(30)
    text = out.read_text()
    failed = failed_lines(text)
    assert rc == 1 and len(failed) == 1, text[-3000:]
    assert f"run_dir {run.resolve()} is not shared storage: learner node" in failed[0], failed[0]
    assert "writes checkpoints there, but it does not see a file the controller wrote there" in failed[0], failed[0]
    # refused before anything heavy started: no reward app, no learner, no engines, no step
    assert not any(s in text for s in ("reward service up", "learner group up", "rollout pool up")), text[-3000:]
    assert not metrics_rows(run), "a step ran before the refusal"
    print(f"refused {took:.0f}s after `rlhf train` started")


@pytest.mark.timeout(900)  # 5.3 min on an idle 2-core box
def test_roles_sync_scale_and_node_losses_on_a_simulated_cluster(sim, tmp_path, tiny_models):
    cluster, nodes, address = sim["cluster"], sim["nodes"], sim["address"]
    nodes["learner"] = add_node(cluster, **LEARNER_NODE)
    cluster.wait_for_nodes()
    wait_for(lambda: learner_nodes() == [nodes["learner"].node_id], 120, "only the new learner node alive")
    run = tmp_path / "run"
    job = write_job(tmp_path, tiny_models, "mn", run, rollout={**PLACEMENT["rollout"], "num_workers": 2},
                    learner={**PLACEMENT["learner"], "sync_timeout_s": 30},
                    reward={**PLACEMENT["reward"], "max_retries": 5, "request_timeout_s": 30},
                    loop={"steps": 100000, "checkpoint_every": 1})
    out = tmp_path / "driver.out"
    driver = start_train([str(job), "--address", address], out)
    ids = {k: n.node_id for k, n in nodes.items()}
    try:
        wait_for(lambda: len(metrics_rows(run)) >= 1, 600, "a first step", driver)
        # placement by role: one worker per rollout node; the rank and the reward model on the learner node
        assert {node_of("rollout-0"), node_of("rollout-1")} == {ids["a"], ids["b"]}
        assert node_of("learner-rank-0") == node_of("RewardScorer") == ids["learner"]
        victim = next(w for w in ("rollout-0", "rollout-1") if node_of(w) == ids["a"])

        # `rlhf scale` past capacity: the autoscaler is asked, the call returns, the loop goes on with 2
        r = rlhf("scale", "--workers", "3", "--address", address)
        assert r.returncode == 0, r.stderr
        assert autoscaler_request() == [{"CPU": 1.0, "rollout": 1.0}] * 3
        wait_for(lambda: "rollout-2: not running after 5s" in out.read_text(), 120, "the no-node warning", driver)
        assert "asked the autoscaler for 3" in out.read_text()
        pending_from = len(metrics_rows(run))
        wait_for(lambda: len(metrics_rows(run)) > pending_from, 300, "a step while the node is pending", driver)
        assert metrics_rows(run)[pending_from]["num_workers"] == 2

        # a node added later (what the autoscaler would do) is used
        nodes["c"] = add_node(cluster, **ROLLOUT_NODE)
        wait_for(lambda: "rollout-2" in served_by(run), 300, "a step served by the new node's worker", driver)
        assert node_of("rollout-2") == nodes["c"].node_id

        # a whole rollout node lost mid-run: the job goes on with the other two
        lost_at = len(metrics_rows(run))  # the step in flight when the node goes
        kill_node(cluster, nodes.pop("a"))
        wait_for(lambda: len(metrics_rows(run)) >= lost_at + 3 and checkpoints(run)[-1] >= lost_at + 3,
                 600, "steps and a checkpoint after the rollout node loss", driver)
        assert all(m["num_workers"] == 2 for m in metrics_rows(run)[lost_at + 1:])

        # the learner node lost: the job ends in one line naming the resume command
        kill_node(cluster, nodes.pop("learner"))
        rc = driver.wait(300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    text = out.read_text()
    failed = failed_lines(text)
    assert rc == 1 and len(failed) == 1, text[-3000:]
    assert failed[0].endswith(f"resume with: rlhf train --resume {run.resolve()}"), failed[0]
    assert f"rollout worker {victim} failed" in text, text[-3000:]

    # resume once a learner node is back
    nodes["learner"] = add_node(cluster, **LEARNER_NODE)
    cluster.wait_for_nodes()
    resume_at = checkpoints(run)[-1]
    assert resume_at >= lost_at + 3
    steps = resume_at + 1
    r = rlhf("train", "--resume", str(run), f"loop.steps={steps}", "--address", address, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert f"at step {resume_at}" in r.stdout

    table = check_exactly_once(run, steps)  # through the scale-up, both node losses and the resume
    # sync: every sample carries the version of its step, from workers on two or three nodes at once
    assert table.column("policy_version").to_pylist() == table.column("step").to_pylist()
    workers_of = {s: set(table.filter(pc.equal(table.column("step"), s)).column("worker_id").to_pylist())
                  for s in range(steps)}
    assert workers_of[0] == {"rollout-0", "rollout-1"}  # one per rollout node, one version
    assert all(len(workers_of[s]) >= 2 for s in range(steps)), workers_of
    # the late node served (its Parquet may be written before its step's metrics row: lost_at included)
    assert any("rollout-2" in workers_of[s] for s in range(lost_at + 1))
    assert all(victim not in workers_of[s] for s in range(lost_at + 1, resume_at))  # gone with its node
