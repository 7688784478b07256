"""`rlhf train`: check the inputs, reach a Ray cluster, start the named controller, follow it.

Everything a user can get wrong (config keys, model dirs of the wrong kind, lengths that do not
fit, an unimportable function, an empty dataset, resources the cluster lacks, a taken port, an
unreachable address) is checked before any actor starts (`preflight.py`), all problems listed,
one line each. The loop itself runs inside the controller actor; this process shows progress and
the outcome. Nothing is written to the run directory before the checks pass.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from cluster.config import CONFIGS_DIR, JobConfig, apply_override, dump_config, load_config, read_yaml
from cluster.errors import JobFailed, UsageError, one_line
from cluster.job.status import JobStatus
from cluster.outputs.run_dir import RunDir

DEMO_YAML = CONFIGS_DIR / "demo.yaml"
DEMO_BUILT = ("model.policy", "data.prompts", "reward.model_dir")  # paths only known once the demo is built


def _get(tree: dict, key: str):
    for part in key.split("."):
        tree = tree[part]
    return tree


def demo_config(work: Path, overrides: list[str], build=None) -> JobConfig:
    """cluster/configs/demo.yaml with the paths of the models and data the demo builds under `work`.
    The overrides are validated before anything is built, so a typo costs a second, not a minute."""
    if build is None:
        from cluster.demo.task import build_demo as build
    tree = read_yaml(DEMO_YAML)
    for key in DEMO_BUILT:
        apply_override(tree, f"{key}={work / 'built-at-run-time'}")
    first = load_config(None, overrides, base=tree, source="demo")
    built = build(work, max_new_tokens=first.rollout.sampling.max_new_tokens)
    for key in DEMO_BUILT:
        apply_override(tree, f"{key}={_get(built, key)}")
    return load_config(None, overrides, base=tree, source="demo")


def resolve_job(config: str | None, overrides: list[str], resume: str | None,
                run_dir: str | None) -> tuple[JobConfig, Path]:
    """(validated config, run directory) for a new run, a resumed one or the built-in demo."""
    if config is not None and "=" in config and not Path(config).exists():
        # `rlhf train loop.steps=200` / `--resume RUN loop.steps=20`: argparse took an override as CONFIG
        config, overrides = None, [config, *overrides]
    if resume:
        root = Path(resume).resolve()
        if config is not None:
            raise UsageError("--resume RUN_DIR reuses RUN_DIR/config.yaml; pass only key=value overrides")
        if not (root / "config.yaml").is_file():
            raise UsageError(f"--resume {resume}: not a run directory (no config.yaml)")
        if RunDir(root).latest_checkpoint() is None:
            raise UsageError(f"--resume {resume}: the run has no complete checkpoint to resume from")
        return load_config(root / "config.yaml", overrides), root
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if config is None:
        root = Path(run_dir or f"runs/demo-{stamp}").resolve()
        return demo_config(root / "demo", overrides), root
    cfg = load_config(config, overrides)
    return cfg, Path(run_dir or cfg.run_dir or f"runs/{cfg.name}-{stamp}").resolve()


class StopSignals:
    """SIGTERM (what `kill`, Kubernetes, Slurm and `docker stop` send) or a first Ctrl-C stops a running
    job the way `rlhf stop` does: the step in flight finishes (bounded by loop.timeout_s), a checkpoint
    is written, and the resume line is printed. A second one aborts at once (KeyboardInterrupt: the
    controller is killed, nothing more is written), as does any before the job runs (nothing to keep)."""

    def __init__(self):
        self.received: str | None = None  # the first signal's name, once one came while armed
        self.armed = False                # a controller is running: a signal asks it to stop
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        self.install()
        return self

    def install(self) -> None:
        """(Again) make these the process's handlers. `ray.init` installs Ray's own SIGTERM handler in
        the driver (a C stack dump, then abort), so this runs again once Ray is up."""
        if threading.current_thread() is not threading.main_thread():  # Python delivers signals there only
            return
        for s in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(s, self._on_signal)
            self._previous.setdefault(s, previous)

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _on_signal(self, signum: int, frame) -> None:
        if self.received is not None or not self.armed:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, the shell's convention for a process ended by it."""
        return 128 + int(getattr(signal, self.received)) if self.received else 0


def cpus_needed(roles: list[tuple[str, int, dict[str, float]]]) -> float:
    """CPUs the job's roles reserve (preflight.demand)."""
    return sum(n * bundle["CPU"] for _, n, bundle in roles)


def train_command(config: str | None, overrides: list[str], resume: str | None = None,
                  run_dir: str | None = None, address: str | None = None) -> int:
    with StopSignals() as signals:
        return _train(config, overrides, resume, run_dir, address, signals)


def _train(config: str | None, overrides: list[str], resume: str | None, run_dir: str | None,
           address: str | None, signals: StopSignals) -> int:
    from contract.devices import resolve_device
    from cluster.job.dtypes import resolve_job_dtypes
    from cluster.launch.preflight import check_cluster, demand, preflight

    if given := address or os.environ.get("RAY_ADDRESS"):
        from cluster.launch.ray_session import check_reachable

        check_reachable(given)  # before the demo builds its models: a wrong address costs seconds, not minutes
    cfg, root = resolve_job(config, overrides, resume, run_dir)
    device = resolve_device(cfg.device)
    cfg, dtype_line = resolve_job_dtypes(cfg, device)  # `auto` -> one concrete dtype for engines and learner
    plan = preflight(cfg, device, embedded=not (address or os.environ.get("RAY_ADDRESS") or cfg.ray.address))
    print(f"rlhf train: {dtype_line}", flush=True)
    import ray

    from cluster.job.controller import Controller, controller_options
    from cluster.launch.ray_session import connect

    env = device.actor_env(threads=1)
    session = connect(cfg.ray, address, env, {"reward.http_port": (cfg.reward.http_host, cfg.reward.http_port)},
                      cpus_needed=cpus_needed(demand(cfg, plan, device)))
    signals.install()  # over the SIGTERM handler ray.init just installed
    resume_cmd = f"rlhf train --resume {root}"
    ctl = None
    try:
        if not session.started_here:
            check_cluster(cfg, plan, device)
        run = RunDir(root).create(dump_config(cfg))
        print(f"rlhf train: run dir {root}", flush=True)
        if session.dashboard_url:
            from cluster.launch.control import dashboard_access

            print(f"rlhf train: Ray dashboard {dashboard_access(session.dashboard_url)}  metrics "
                  f"http://127.0.0.1:{session.metrics_port}/metrics", flush=True)
        try:
            ctl = ray.remote(Controller).options(**controller_options(cfg, env)).remote(
                cfg.model_dump(mode="json"), plan, str(root), bool(resume))
            ray.get(ctl.start.remote(), timeout=120)
        except ValueError as e:
            raise UsageError(f"cannot start the controller in namespace {cfg.ray.namespace!r} ({one_line(e)}); "
                             f"another job may be running there: set ray.namespace=OTHER") from None
        final = follow(ctl, cfg, signals)
    finally:
        if ctl is not None:
            ray.kill(ctl)
        if session.started_here:
            ray.shutdown()
    if final.phase != "done":
        ckpt = run.latest_checkpoint()
        hint = f"; last checkpoint {ckpt}; resume with: {resume_cmd}" if ckpt else "; no checkpoint was written"
        raise JobFailed(f"{final.error}{hint}")
    if signals.received:
        print(f"rlhf train: stopped by {signals.received} after step {final.step} of {final.steps}; "
              f"checkpoint {run.latest_checkpoint()}; resume with: {resume_cmd}", flush=True)
        return signals.exit_code
    print_summary(final, root)
    return 0


def follow(ctl, cfg: JobConfig, signals: StopSignals) -> JobStatus:
    """Poll the controller into a progress bar until the job ends; a silent or dead controller is an
    error. A stop signal (`StopSignals`) asks the controller to stop as `rlhf stop` does."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError
    from tqdm import tqdm

    bar = None  # opened when the loop starts, so startup time does not skew the rate
    last_step, last_change, seen, stopping = -1, time.monotonic(), 0, False
    signals.armed = True
    try:
        while True:
            if signals.received and not stopping:
                stopping = True
                try:
                    ray.get(ctl.stop.remote(), timeout=60)
                except (RayActorError, GetTimeoutError) as e:
                    raise JobFailed(f"the controller did not take the stop ({one_line(e)})") from None
                tqdm.write(f"rlhf train: {signals.received}: stopping after the step in flight, with a checkpoint "
                           f"(Ctrl-C again aborts at once)")
            try:
                st = ray.get(ctl.status.remote(seen), timeout=60)
            except (RayActorError, GetTimeoutError) as e:
                raise JobFailed(f"the controller stopped answering ({one_line(e)})") from None
            for msg in st.messages:
                tqdm.write(f"[controller] {msg}")
            seen = st.num_messages
            if bar is None and st.phase not in ("created", "starting"):
                bar = tqdm(total=cfg.loop.steps, initial=st.step, desc=cfg.name, unit="step", dynamic_ncols=True,
                           mininterval=1.0)
            if bar is not None and st.step != last_step:
                bar.n = st.step
                last_step, last_change = st.step, time.monotonic()
                m = st.last
                if m:
                    bar.set_postfix_str(f"v{st.policy_version} reward {m.get('reward_mean', 0):.3f} "
                                        f"kl {m.get('kl', 0):.4f} {m.get('rollout_tokens_per_s', 0):.0f} tok/s "
                                        f"workers {st.num_workers}", refresh=False)
                bar.refresh()
            if st.ended:
                return st
            if st.phase == "running" and time.monotonic() - last_change > cfg.loop.timeout_s:
                raise JobFailed(f"no step finished in {cfg.loop.timeout_s:.0f}s (loop.timeout_s); the job looks stuck")
            time.sleep(1.0)
    finally:
        signals.armed = False
        if bar is not None:
            bar.close()


def print_summary(st: JobStatus, root: Path) -> None:
    first, last = st.first or {}, st.last or {}
    print(f"rlhf train: done, {st.step} steps, policy version {st.policy_version}; run dir {root}")
    if "gold_mean" in last:
        print(f"  gold score (task's true objective): step 0 {first.get('gold_mean', float('nan')):.3f} -> "
              f"final {last['gold_mean']:.3f}")
    print(f"  training reward (as combined):       step 0 {first.get('reward_mean', float('nan')):.3f} -> "
          f"final {last.get('reward_mean', float('nan')):.3f}")
    print(f"  report {root / 'report.png'}; resume/extend with: rlhf train --resume {root} loop.steps=N")


