"""Resuming a run: what a checkpoint holds besides the learner, and restoring a job from it.

A checkpoint at step S holds the learner (S steps trained), the loop state, the prompt order, and
the steps an async or inflight loop had generated (and scored) but not trained yet: their samples
were drawn under older weights, exactly as the uninterrupted run trains on them. Saving them (one
Parquet file each, `rollouts_in_flight/`) rather than drawing their prompts again is what makes a
resumed run go on sample for sample as the uninterrupted one would have: the same prompts, seeds and
policy versions, hence the same tokens. A production still queued when the loop stopped is not
saved; the prompt order is recorded from just before it, so its prompts are drawn again.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from cluster.job.produce import ScoredRollouts


@dataclass
class LoopState:
    """What a checkpoint needs besides the learner: where the loop and the prompt order stand."""

    step: int = 0  # steps completed == index of the next step
    samples: int = 0
    dropped_stale: int = 0
    invalid_rewards: int = 0
    uniform_groups: int = 0  # groups dynamic sampling set aside (all rewards equal)


# A checkpoint's steps generated (and scored) but not yet trained, one Parquet file each: a resumed
# async/inflight run trains on them as the uninterrupted run would have, instead of regenerating them
# under newer weights (which would lose them and change every later step).
IN_FLIGHT_DIR = "rollouts_in_flight"
_SCALARS = ("step", "gen_s", "reward_s", "num_workers", "draws", "groups_uniform")


def save_in_flight(directory: Path, produced: list[ScoredRollouts]) -> None:
    """`produced` (consecutive steps) as DIRECTORY/rollouts_in_flight/step=K.parquet: the table, the
    dynamic-sampling `keep` flags as a column, the rest as schema metadata."""
    import pyarrow.parquet as pq

    from contract.atomic import staged_file

    (directory / IN_FLIGHT_DIR).mkdir(parents=True, exist_ok=True)
    for p in produced:
        table = p.table.append_column("keep", pa.array(p.keep, pa.bool_()))
        meta = json.dumps({k: getattr(p, k) for k in _SCALARS}).encode()
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"rlhf.scored_rollouts": meta})
        with staged_file(directory / IN_FLIGHT_DIR / f"step={p.step:06d}.parquet") as tmp:
            pq.write_table(table, tmp)


def load_in_flight(directory: Path) -> list[ScoredRollouts]:
    """What `save_in_flight` wrote under DIRECTORY, in step order ([] if nothing)."""
    import pyarrow.parquet as pq

    out = []
    for f in sorted((directory / IN_FLIGHT_DIR).glob("step=*.parquet")):
        table = pq.read_table(f)
        meta = json.loads(table.schema.metadata[b"rlhf.scored_rollouts"])
        keep = table.column("keep").to_numpy(zero_copy_only=False).astype(bool)
        table = table.drop_columns(["keep"]).replace_schema_metadata(None)
        out.append(ScoredRollouts(table=table, keep=keep, **meta))
    return out


def restore(run, services, prompts, log=print) -> tuple[LoopState, list[ScoredRollouts]]:
    """Bring a job's freshly started services back to RUN's latest checkpoint: the learner's state,
    the prompt order, the pool's size and weights; forget what the run logged past it. Returns the
    loop state and the saved in-flight steps (to hand to `TrainingLoop`); a run with no checkpoint
    starts from scratch."""
    ckpt = run.latest_checkpoint()
    if ckpt is None:
        return LoopState(), []
    saved = json.loads((ckpt / "controller.json").read_text())
    services.learner.load_checkpoint(str(ckpt / "learner"))
    prompts.load_state_dict(saved["prompts"])
    state = LoopState(**saved["loop"])
    run.truncate(after_step=state.step - 1)
    if saved.get("num_workers") and saved["num_workers"] != services.pool.num_workers:
        services.pool.scale_to(saved["num_workers"])
    services.publish_weights()
    in_flight = load_in_flight(ckpt)
    log(f"resumed from {ckpt} at step {state.step}, policy version {services.learner.version}"
        + (f"; {len(in_flight)} step(s) generated before it are trained first" if in_flight else ""))
    return state, in_flight
