"""Fast checks of the controller's pieces: run directory, experience bookkeeping, demo data,
submission command, and the one-line errors `rlhf train` gives before any actor starts."""
from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from cluster.config import load_config
from cluster.errors import UsageError
from cluster.job.rollout_table import provenance, trainable_mask, untrained_reasons, with_rewards
from cluster.launch.ray_session import check_port, check_reachable
from cluster.outputs.run_dir import RunDir
from contract.experience import EXPERIENCE_SCHEMA, rollout_batch
from support_jobs import rlhf, wait_for


def rollouts(versions: list[int]) -> pa.Table:
    rows = [{"prompt_id": f"p{i}", "sample_idx": 0, "prompt": "a", "prompt_ids": [5], "response": "b c",
             "response_ids": [6, 7], "logprobs": [-1.0, -2.0], "finish_reason": "length", "policy_version": v,
             "worker_id": "rollout-0", "gen_s": 0.1} for i, v in enumerate(versions)]
    return pa.Table.from_batches([rollout_batch(rows)])


def rewards(values: list[float], valid: list[bool]) -> pa.Table:
    return pa.table({"reward": pa.array(values, pa.float32()), "reward_valid": valid,
                     "reward_parts": pa.array([[("model", v)] for v in values], pa.map_(pa.string(), pa.float64())),
                     "reward_model_version": pa.array([0] * len(values), pa.int64())})


def test_checkpoint_is_invisible_until_committed_and_latest_wins(tmp_path):
    run = RunDir(tmp_path / "run").create("name: x\n")
    staging = run.checkpoint_staging(4)
    (staging / "learner").mkdir()
    assert run.latest_checkpoint() is None  # half-written: not a resume point
    run.commit_checkpoint(staging, 4, {"loop": {"step": 4}})
    run.commit_checkpoint(run.checkpoint_staging(8), 8, {"loop": {"step": 8}})
    run.checkpoint_staging(12)  # a crash mid-save leaves only a hidden temp dir
    assert run.latest_checkpoint().name == "step=000008"
    assert json.loads((run.latest_checkpoint() / "controller.json").read_text())["loop"]["step"] == 8
    run.prune_checkpoints(keep=1)
    assert [p.name for p in run.checkpoints()] == ["step=000008"]


def test_metrics_and_rollouts_truncated_to_the_checkpoint_on_resume(tmp_path):
    run = RunDir(tmp_path).create("")
    for step in range(6):
        run.log_metrics(step, {"reward_mean": float(step)})
        run.write_rollouts(step, pa.table({"step": [step]}))
    (run.checkpoint_staging(5) / "learner").mkdir()  # a save the crash interrupted
    run.truncate(after_step=3)
    assert not list((tmp_path / "ckpt").iterdir())
    assert [m["step"] for m in run.read_metrics()] == [0, 1, 2, 3]
    assert run.read_rollouts().column("step").to_pylist() == [0, 1, 2, 3]
    assert list((tmp_path / "tb").iterdir())  # TensorBoard events written beside the JSONL


def test_stale_and_invalid_samples_are_kept_in_parquet_but_not_trained(tmp_path):
    exp = with_rewards(rollouts([3, 2, 1, 3]), rewards([0.5, 0.1, 0.2, 0.3], [True, True, True, False]))
    assert exp.schema.names == EXPERIENCE_SCHEMA.names
    mask = trainable_mask(exp, learner_version=3, max_staleness=1)
    assert mask.tolist() == [True, True, False, False]  # version 1 is 2 behind; row 3 invalid
    assert trainable_mask(exp, 3, 0).tolist() == [True, False, False, False]  # sync: only current rows
    run = RunDir(tmp_path).create("")
    keep = np.array([True, False, True, True])  # dynamic sampling set row 1's group aside
    run.write_rollouts(7, provenance(exp, 7, mask & keep, gold=[0.0, 0.25, 0.5, 1.0],
                                     why=untrained_reasons(exp, mask, keep)))
    table = run.read_rollouts()
    assert table.column("not_trained").to_pylist() == [None, "uniform_group", "stale", "invalid_reward"]
    mask = mask & keep
    assert table.num_rows == 4
    assert table.column("step").to_pylist() == [7] * 4
    assert table.column("trained").to_pylist() == mask.tolist()
    assert table.column("reward_parts").to_pylist()[0] == [("model", 0.5)]
    assert table.column("policy_version").to_pylist() == [3, 2, 1, 3]


def test_reward_row_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="returned 1 rows for 2 samples"):
        with_rewards(rollouts([0, 0]), rewards([1.0], [True]))


def test_the_job_plan_tells_the_learner_the_loops_staleness_and_the_samplers_settings():
    from cluster.plan import make_job_plan

    base = {"model": {"policy": "m"}, "data": {"prompts": "p"}, "reward": {"model_dir": "r"}}
    plan = make_job_plan(load_config(None, ["loop.mode=async", "loop.max_staleness=2"], base=base))
    assert (plan.max_staleness, plan.learner.correction) == (2, "tis")  # null correction: tis when async
    assert not plan.rollout.inflight_updates
    plan = make_job_plan(load_config(None, ["loop.max_staleness=2"], base=base))
    assert (plan.max_staleness, plan.learner.correction) == (0, "off")
    # inflight: as async for the learner, and the engines load versions between steps
    plan = make_job_plan(load_config(None, ["loop.mode=inflight", "loop.max_staleness=2"], base=base))
    assert (plan.max_staleness, plan.learner.correction, plan.rollout.inflight_updates) == (2, "tis", True)
    # the overlong penalty's L_max and seq_sum_norm's constant are the sampler's max_new_tokens: a job with
    # them resolves its plan (it failed at learner start when the job did not pass max_new_tokens)
    cfg = load_config(None, ["learner.rl.overlong.mode=penalty", "learner.rl.loss_aggregation=seq_sum_norm",
                             "rollout.sampling.max_new_tokens=20", "rollout.sampling.temperature=0.7"], base=base)
    plan = make_job_plan(cfg)
    assert (plan.learner.norm_tokens, plan.learner.overlong_buffer, plan.learner.temperature) == (20, 4, 0.7)
    # greedy sampling (T = 0) is scored at T = 1; replicas from the autoscaler's floor when it is on
    assert make_job_plan(load_config(None, ["rollout.sampling.temperature=0"], base=base)).learner.temperature == 1.0
    auto = load_config(None, ["reward.autoscaling={min_replicas: 2, max_replicas: 4}"], base=base)
    assert (make_job_plan(base_cfg := load_config(None, [], base=base)).reward_replicas,
            make_job_plan(auto).reward_replicas) == (base_cfg.reward.num_replicas, 2)


def held_starts(monkeypatch, failing: str | None, hold_s: float = 30):
    """Stand-ins for the services' starts: `failing`'s raises at once, each other's holds (at most
    `hold_s`) until its event in `release` is set. With `failing=None` the reward's start is the real
    one (it fails by itself) and only the learner's and the pool's are stand-ins. Returns (release,
    stopped): the stand-ins' names as each is shut down."""
    import threading

    import actors.pool
    import cluster.job.services as services
    import learner.group
    import reward_service.app
    from cluster.errors import JobFailed

    release, stopped = {k: threading.Event() for k in ("reward", "learner", "pool")}, []

    def held(kind: str, name: str):
        class StartingService:
            num_workers, http_url = 1, "http://stand-in"

            def __init__(self, *args, **kwargs):
                assert release[kind].wait(hold_s)

            def shutdown(self):
                stopped.append(name)
        return type(name, (StartingService,), {})

    def fails(*args, **kwargs):
        raise JobFailed(f"{failing} cannot start: no")

    stand_ins = {"learner": held("learner", "LearnerGroup"), "pool": held("pool", "RolloutPool"),
                 "reward": held("reward", "RewardClient")}
    if failing is not None:
        stand_ins[failing] = fails
    monkeypatch.setattr(learner.group, "LearnerGroup", stand_ins["learner"])
    monkeypatch.setattr(actors.pool, "RolloutPool", stand_ins["pool"])
    if failing is not None:
        monkeypatch.setattr(services, "start_reward", stand_ins["reward"])
        monkeypatch.setattr(reward_service.app, "shutdown", lambda name: stopped.append("RewardClient"))
    return release, stopped


def start_in_thread(logged: list, reward: dict | None = None, store: str = "/nonexistent"):
    """start_services on a tiny config (its `reward` section replaced by `reward`), in a thread;
    returns (thread, outcome: [exception])."""
    import threading

    from cluster.job.services import start_services
    from contract.devices import DeviceProfile

    base = {"model": {"policy": "m"}, "data": {"prompts": "p"}, "reward": reward or {"model_dir": "r"}}
    outcome = []

    def run():
        try:
            start_services(load_config(None, [], base=base), DeviceProfile("cpu"), store, log=logged.append)
        except Exception as e:  # noqa: BLE001 - the test reads it
            outcome.append(e)
    th = threading.Thread(target=run)
    th.start()
    return th, outcome


def test_a_reward_that_cannot_score_fails_the_start_at_once_and_what_was_starting_is_stopped(
        ray_local, serve_controller_pids, monkeypatch, tmp_path):
    """The services start together; a reward that cannot score (the real reward app on the session's
    Ray, with a real reward function whose every value is NaN: its probe is invalid) ends the start
    without waiting for the learner and the pool (stand-ins held mid-start), each shut down when its
    own start returns, never left unowned; the failed reward app leaves no Serve behind."""
    from pathlib import Path

    from contract.net import free_port

    assert serve_controller_pids() == [], "a Serve controller of an earlier test is still up (that test fails too)"
    release, stopped = held_starts(monkeypatch, None, hold_s=600)
    here = str(Path(__file__).parent)
    th, outcome = start_in_thread([], reward={"model_dir": None, "functions": [{"path": "support_rewards:nan_scores"}],
                                              "python_path": [here], "http_port": free_port(), "max_retries": 1},
                                  store=str(tmp_path / "store"))
    th.join(240)  # the reward app's deploy and probe: ~10-40 s on 2 cores
    assert not th.is_alive() and stopped == [], stopped  # the learner and the pool are still starting
    assert str(outcome[0]).startswith("reward service cannot score (probe request invalid): "), outcome
    release["learner"].set()
    release["pool"].set()
    wait_for(lambda: sorted(stopped) == ["LearnerGroup", "RolloutPool"], 10, "the held starts to be stopped")
    wait_for(lambda: not serve_controller_pids(), 30, "the failed reward app's Serve to stop")


def test_a_failed_reward_start_ends_the_start_at_once_and_what_was_starting_is_stopped(monkeypatch):
    """The same with all three starts stand-ins (the reward's raises at once): the orchestration alone,
    in a second, without Ray."""
    release, stopped = held_starts(monkeypatch, "reward")
    th, outcome = start_in_thread([])
    th.join(10)
    assert not th.is_alive() and "reward cannot start" in str(outcome[0]) and stopped == []
    release["learner"].set()
    release["pool"].set()
    wait_for(lambda: sorted(stopped) == ["LearnerGroup", "RolloutPool"], 10, "the held starts to be stopped")


@pytest.mark.parametrize("failing, other", [("learner", "pool"), ("pool", "learner")])
def test_a_learner_or_pool_that_cannot_start_ends_the_start_once_the_reward_app_stopped_itself(
        monkeypatch, failing, other):
    """Serve's actors outlive the job (the driver kills the controller once the start failed), so a
    failed start waits for a reward app still starting, which stops itself when its start returns; the
    learner or pool still starting is not waited for (its actors die with the controller), and is shut
    down when its own start returns."""
    release, stopped = held_starts(monkeypatch, failing)
    th, outcome = start_in_thread([])
    time.sleep(1.0)
    assert th.is_alive() and stopped == []  # the reward app is still starting
    release["reward"].set()
    th.join(10)
    assert not th.is_alive() and f"{failing} cannot start" in str(outcome[0])
    assert stopped == ["RewardClient"]  # the other is still starting
    release[other].set()
    names = {"learner": "LearnerGroup", "pool": "RolloutPool"}
    wait_for(lambda: sorted(stopped) == sorted(["RewardClient", names[other]]), 10,
             "the held starts to be stopped")


def test_a_reward_app_still_starting_past_the_bound_is_stopped_and_said(monkeypatch):
    import cluster.job.services as services

    monkeypatch.setattr(services, "REWARD_STOP_WAIT_S", 0.5)
    release, stopped = held_starts(monkeypatch, "learner")
    th, outcome = start_in_thread(logged := [])
    th.join(10)
    assert not th.is_alive() and "learner cannot start" in str(outcome[0])
    assert stopped == ["RewardClient"] and any("still starting" in m for m in logged), logged
    release["reward"].set()
    release["pool"].set()
    wait_for(lambda: sorted(stopped) == ["RewardClient", "RewardClient", "RolloutPool"], 10,
             "the held starts to be stopped")


def test_demo_preferences_are_ranked_by_the_gold_score(tiny_models):
    from transformers import AutoTokenizer

    from cluster.demo.task import preference_pairs
    from reward_service.functions import colour_fraction

    tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    pairs = preference_pairs(tok, ["the cat", "a dog"], 200, max_tokens=16, seed=1)
    assert len(pairs) == 200
    for p in pairs:
        chosen, rejected = colour_fraction([p["prompt"]] * 2, [p["chosen"], p["rejected"]])
        assert chosen > rejected + 0.04
    gold = np.array(colour_fraction([""] * 400, [p[k] for p in pairs for k in ("chosen", "rejected")]))
    assert gold.min() < 0.1 and gold.max() > 0.9  # covers the policy's whole trajectory
    assert not any("<s>" in p["chosen"] or "<pad>" in p["chosen"] for p in pairs)


def test_submit_command_line_ships_the_config_and_quotes_overrides(tmp_path, monkeypatch):
    from cluster.launch.submit import auth_env, submit_argv

    argv = submit_argv("http://127.0.0.1:8265", ["data.prompts=/a b.jsonl"], str(tmp_path), "rlhf-1")
    tail = argv[argv.index("--") + 1:]
    assert tail == ["rlhf", "train", "job.yaml", "'data.prompts=/a b.jsonl'"]
    env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert env == {"working_dir": str(tmp_path)}  # no CPU-only variables: the job's device profile sets them
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert auth_env()["RAY_AUTH_MODE"] == "token"


def test_port_and_address_checks_are_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(UsageError, match=f"ray.dashboard_port: port {port} on 127.0.0.1 is already in use"):
            check_port("ray.dashboard_port", "127.0.0.1", port)
    with pytest.raises(UsageError, match="no Ray cluster reachable"):
        check_reachable(f"127.0.0.1:{port}", timeout_s=2)
    with pytest.raises(UsageError, match="expected HOST:PORT"):
        check_reachable("nonsense")


def test_a_reward_app_that_fails_half_way_leaves_no_serve_running(ray_local, serve_controller_pids, tmp_path,
                                                                 monkeypatch):
    """Serve's actors are detached: a deploy that fails after `serve.start` must stop Serve, or it
    outlives the job on a shared cluster. Serve's deploy (`serve._run`) is the stand-in that fails."""
    from ray import serve

    from contract.net import free_port
    from reward_service import app as reward_app
    from reward_service.config import RewardConfig

    assert serve_controller_pids() == [], "a Serve controller of an earlier test is still up (that test fails too)"
    monkeypatch.setattr(serve, "_run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("replica failed to start")))
    cfg = RewardConfig(model_dir=None, functions=[{"path": "reward_service.functions:colour_fraction"}],
                       http_port=free_port())
    with pytest.raises(RuntimeError, match="replica failed to start"):
        reward_app.deploy(cfg, tmp_path / "store", name="reward_half")
    deadline = time.monotonic() + 30
    while serve_controller_pids() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not serve_controller_pids()


def test_a_reward_app_no_node_can_take_fails_after_its_start_timeout_and_leaves_no_serve(
        ray_local, serve_controller_pids, tmp_path):
    """serve.run would wait forever for a replica that asks for a resource no node has (an autoscaling
    cluster that never grows, or one whose capacity other jobs hold): reward.start_timeout_s ends it
    in one line, and Serve is stopped."""
    from contract.net import free_port
    from reward_service import app as reward_app
    from reward_service.config import RewardConfig

    assert serve_controller_pids() == [], "a Serve controller of an earlier test is still up (that test fails too)"
    cfg = RewardConfig(model_dir=None, functions=[{"path": "reward_service.functions:colour_fraction"}],
                       http_port=free_port(), resources={"no_such_node": 1}, start_timeout_s=3)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as e:
        reward_app.deploy(cfg, tmp_path / "store", name="reward_unplaced")
    assert str(e.value).startswith("reward.start_timeout_s=3: the reward app was not running after 3s")
    assert "\n" not in str(e.value) and time.monotonic() - t0 < 60
    deadline = time.monotonic() + 30
    while serve_controller_pids() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not serve_controller_pids()


def test_an_embedded_ray_whose_raylet_does_not_register_is_one_line(monkeypatch):
    """Ray waits a fixed 30 s for its raylet and then raises a bare Exception (seen on 2 busy cores):
    `rlhf train` says so in one line instead of a traceback. ray.init is the stand-in that fails."""
    import ray

    from cluster.config import RayConfig
    from cluster.errors import JobFailed
    from cluster.launch.ray_session import connect

    from cluster.launch.ray_session import EMBEDDED_START_ATTEMPTS

    calls = []

    def init_times_out(**kwargs):
        calls.append(kwargs)
        raise Exception("The current node timed out during startup. This could happen because some of the raylet "
                        "failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(ray, "init", init_times_out)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(JobFailed, match=r"^the embedded Ray cluster did not start: its raylet did not register "
                                        r"within Ray's 30 s \(2 tries; .*--address$"):
        connect(RayConfig(dashboard_port=free), None, {})
    assert EMBEDDED_START_ATTEMPTS == 2 and len(calls) == 2  # tried again once, then the one line

    calls.clear()  # a second try that starts: the session is returned, no error

    def times_out_once(**kwargs):
        if not calls:
            init_times_out(**kwargs)
        calls.append(kwargs)
        return type("Info", (), {"dashboard_url": f"127.0.0.1:{free}"})()

    monkeypatch.setattr(ray, "init", times_out_once)
    monkeypatch.setattr("cluster.launch.ray_session._metrics_port", lambda ray_module: None)
    session = connect(RayConfig(dashboard_port=free), None, {})
    assert len(calls) == 2 and session.dashboard_url == f"http://127.0.0.1:{free}"


@pytest.fixture
def job_yaml(tmp_path, tiny_models):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"red cat {i}"}) + "\n" for i in range(4)))

    def write(**changes):
        tree = {"model": {"policy": str(tiny_models["policy"])}, "data": {"prompts": str(prompts)},
                "reward": {"model_dir": str(tiny_models["reward"])}}
        for key, value in changes.items():
            section, field = key.split("__")
            tree.setdefault(section, {})[field] = value
        path = tmp_path / f"job{len(list(tmp_path.glob('job*.yaml')))}.yaml"
        path.write_text(json.dumps(tree))
        return str(path)
    return write


def test_bad_inputs_fail_before_ray_with_one_line(job_yaml, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        cases = [
            ([job_yaml(model__policy=str(tmp_path / "nope"))], "model.policy: model directory"),
            ([job_yaml(data__prompts=str(empty))], "empty.jsonl: file is empty"),
            ([job_yaml(), f"ray.dashboard_port={busy}"], f"ray.dashboard_port: port {busy}"),
            # more engines than the box's memory holds: the embedded cluster would start them for minutes
            ([job_yaml(), "rollout.num_workers=200", "--run-dir", str(tmp_path / "w")],
             "rollout.num_workers=200: the job needs at least"),
            ([job_yaml(), "--address", f"127.0.0.1:{busy + 1 if busy < 65535 else 1}", "--run-dir",
              str(tmp_path / "r")], "no Ray cluster reachable"),
            # the demo (no config) with an address nobody answers: refused before it builds its models
            (["--address", f"127.0.0.1:{busy + 1 if busy < 65535 else 1}", "--run-dir", str(tmp_path / "d")],
             "no Ray cluster reachable"),
        ]
        with ThreadPoolExecutor(len(cases)) as runs:  # each CLI spends ~10 s importing; they overlap
            done = list(runs.map(lambda case: rlhf("train", *case[0]), cases))
        for (args, message), r in zip(cases, done):
            lines = [line for line in r.stderr.splitlines() if line.strip()]
            assert r.returncode == 2, r.stderr
            assert len(lines) == 1 and lines[0].startswith("rlhf train: error: ") and message in lines[0], lines
    assert not (tmp_path / "d").exists()  # the demo built nothing (it spent a minute on its models first)


def test_a_stop_signal_asks_the_job_to_stop_and_a_second_one_aborts():
    """StopSignals (rlhf train): before the job runs any signal aborts (nothing to keep); while it runs
    the first SIGTERM or Ctrl-C is recorded (the driver then stops the job as `rlhf stop` does) and a
    second aborts at once; the process's own handlers come back afterwards. Real signals, sent to
    this process."""
    import os
    import signal

    from cluster.launch.train import StopSignals

    def deliver(sig):
        os.kill(os.getpid(), sig)
        time.sleep(0.2)  # Python runs the handler at its next check

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignals() as signals:
        with pytest.raises(KeyboardInterrupt):
            deliver(signal.SIGTERM)  # not armed yet: no controller to ask
        assert signals.received is None
        signals.armed = True
        deliver(signal.SIGTERM)
        assert signals.received == "SIGTERM" and signals.exit_code == 143
        with pytest.raises(KeyboardInterrupt):
            deliver(signal.SIGINT)  # the second one aborts
        assert signals.received == "SIGTERM"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    with StopSignals() as signals:
        signals.armed = True
        deliver(signal.SIGINT)
        assert signals.received == "SIGINT" and signals.exit_code == 130


SIGTERM_AFTER_CONNECT = """
import sys, time
from cluster.launch.ray_session import use_token_auth
use_token_auth()
from cluster import cli
from cluster.config import RayConfig
from cluster.launch.ray_session import connect

def command(args):  # a command with no run to keep (train-sft's shape): attached, working, then SIGTERM
    connect(RayConfig(), sys.argv[1], {})
    try:
        print("up", flush=True)
        time.sleep(120)
    finally:
        print("unwound", flush=True)

cli._cmd_make_task = command
sys.exit(cli.main(["make-task", "arithmetic", "unused"]))
"""


def test_sigterm_to_a_command_attached_to_ray_unwinds_in_one_line_with_143(ray_local, tmp_path):
    """ray.init makes SIGTERM end the driver with a C stack dump (or sys.exit(15)); after `connect` it
    unwinds like Ctrl-C instead: every `finally` runs (the embedded cluster shut down, nothing half
    written), one line naming the signal, exit code 128 + 15. A real driver process, a real signal."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "sigterm_command.py"  # not cmd.py: that would shadow the stdlib module pdb imports
    script.write_text(SIGTERM_AFTER_CONNECT)
    proc = subprocess.Popen([sys.executable, str(script), ray_local.get_runtime_context().gcs_address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert proc.stdout.readline().strip() == "up"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "unwound" in out, (proc.returncode, out, err[-2000:])
    assert err.splitlines()[-1] == "rlhf make-task: stopped by SIGTERM; nothing half written was kept", err[-2000:]
    assert "Traceback" not in err and "SIGTERM received" not in err, err[-2000:]  # no stack, no C dump
