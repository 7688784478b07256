"""`rlhf replay RUN_DIR`: train again from a run's recorded experience and check its weights bit for bit.

A run records, per step, every sample it drew and whether it trained on it (RUN/rollouts/*.parquet,
in the order the learner got them), and at every checkpoint a digest of each policy tensor
(RUN/weights.jsonl). Replay starts a learner group from the run's own config (the same model,
seed, ranks and algorithm), trains step by step on the recorded trained rows, and at each recorded
checkpoint exports the policy the way a checkpoint does and compares every tensor's digest. It
needs no rollout worker or reward service: the experience carries the rewards and the behaviour
logprobs. It works alike for sync, async and inflight runs and across resumes (a resumed run's
redone steps replaced the dead run's files, and its checkpoints continue the same ledger).

What must hold for bit-identical weights (checked first; each a one-line error, exit 2):
- the learner runs on CPUs with the run's ranks, ZeRO stage, dtype and threads per rank, and the
  same torch and DeepSpeed builds (recorded with each checkpoint: `replay_requirements`). CPU
  kernels are deterministic for a fixed thread count; on GPUs cuBLAS/cuDNN are not unless
  `torch.use_deterministic_algorithms` is on, which the learner does not set: GPU runs are refused.
- every step up to the last checkpoint has its Parquet file.
The minibatch order is seeded by (seed, policy version) and the DeepSpeed checkpoint restores the
optimizer state, so neither the wall clock nor a resume changes what is computed.
A mismatch exits 1 naming the first checkpoint step and the first tensor (in name order) that differ.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cluster.config import load_config
from cluster.errors import JobFailed, UsageError, one_line
from cluster.outputs.run_dir import RunDir
from cluster.outputs.weight_digest import first_difference, replay_requirements, tensor_digests


def replay_command(run_dir: str, address: str | None = None) -> int:
    checked = replay(run_dir, address, log=lambda m: print(f"rlhf replay: {m}", flush=True))
    print(f"rlhf replay: weights bit-identical at all {len(checked)} checkpoint(s) (steps "
          f"{', '.join(str(s) for s in checked)})", flush=True)
    return 0


def check_replayable(run: RunDir, device_kind: str):
    """(the run's config, its weight ledger) once everything a replay needs is there and the same."""
    if not run.config_path.is_file():
        raise UsageError(f"{run.root}: not a run directory (no config.yaml)")
    ledger = run.read_weight_ledger()
    if not ledger:
        raise UsageError(f"{run.root / 'weights.jsonl'} records no checkpoint: nothing to check "
                         f"the weights against")
    cfg = load_config(run.config_path)
    if device_kind != "cpu":
        raise UsageError(f"the learner would run on {device_kind}, whose kernels are not "
                         f"deterministic here (torch.use_deterministic_algorithms is off); replay checks CPU runs")
    have = replay_requirements(cfg, device_kind)
    for key, want in ledger[-1]["requirements"].items():
        if have.get(key) != want:
            raise UsageError(f"{key} was {want} when the run was trained, is {have.get(key)} here; "
                             f"bit-identical weights need the same")
    for step in range(ledger[-1]["step"]):
        if not run.rollout_path(step).is_file():
            raise UsageError(f"{run.rollout_path(step)} is missing; every step up to the last "
                             f"checkpoint (step {ledger[-1]['step']}) needs its experience")
    return cfg, ledger


def trained_rows(path: Path) -> pa.Table:
    """The rows step `path` trained on, in the order the learner got them."""
    table = pq.read_table(path)
    return table.filter(pc.equal(table.column("trained"), True))


def replay(run_dir: str, address: str | None = None, log=print, connect_ray: bool = True) -> list[int]:
    """Replay RUN_DIR; returns the checkpoint steps whose weights matched. Raises UsageError (not
    replayable) or JobFailed (a mismatch, or the learner failed), one line each. `connect_ray`:
    False when the caller is already attached to Ray (tests)."""
    from contract.devices import resolve_device

    run = RunDir(Path(run_dir).resolve())
    cfg = load_config(run.config_path) if run.config_path.is_file() else None
    device = resolve_device(cfg.device if cfg else "auto")
    cfg, ledger = check_replayable(run, device.kind)
    import ray

    session = None
    if connect_ray:
        from cluster.launch.ray_session import connect

        lc = cfg.learner
        session = connect(cfg.ray, address, device.actor_env(threads=1), cpus_needed=lc.num_ranks * lc.cpus_per_rank)
    try:
        return _replay(cfg, run, ledger, device, log)
    finally:
        if session is not None and session.started_here:
            ray.shutdown()


def _replay(cfg, run: RunDir, ledger: list[dict], device, log) -> list[int]:
    from cluster.plan import make_job_plan
    from learner.group import LearnerGroup

    plan = make_job_plan(cfg)
    # its own namespace: the run may still be training on this cluster, under the same actor names
    learner = LearnerGroup(cfg.learner, cfg.model.policy, device, critic_dir=cfg.learner.critic_model,
                           seed=cfg.seed, namespace=f"{cfg.ray.namespace}-replay", plan=plan.learner,
                           max_staleness=plan.max_staleness)
    scratch = run.root / ".replay"
    checked: list[int] = []
    try:
        at = {e["step"]: e for e in ledger}
        for step in range(max(at)):
            rows = trained_rows(run.rollout_path(step))
            if rows.num_rows:  # as the loop: a step with nothing to train leaves the version alone
                try:
                    learner.train_step(rows)
                except Exception as e:  # noqa: BLE001 - a rank died, or the table is refused: one line
                    raise JobFailed(f"the learner failed at step {step}: {one_line(e)}") from None
            if step + 1 in at:
                _check(learner, at[step + 1], scratch)
                checked.append(step + 1)
                log(f"step {step + 1}: policy version {learner.version}, every tensor bit-identical")
    finally:
        learner.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    return checked


def _check(learner, entry: dict, scratch: Path) -> None:
    step = entry["step"]
    if learner.version != entry["policy_version"]:
        raise JobFailed(f"at step {step} the learner is at policy version {learner.version}, the run "
                        f"was at {entry['policy_version']}")
    shutil.rmtree(scratch, ignore_errors=True)
    learner.save_checkpoint(str(scratch))  # the same export a checkpoint writes
    name = first_difference(entry["tensors"], tensor_digests(scratch / "policy"))
    if name is not None:
        raise JobFailed(f"weights differ at the checkpoint of step {step} (policy version "
                        f"{entry['policy_version']}): first tensor {name}")
