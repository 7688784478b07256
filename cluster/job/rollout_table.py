"""Turning a rollout table into the experience the learner trains on and the Parquet provenance.

Rows are never removed from what gets written: a stale or invalid sample stays in the Parquet with
`trained = false`, so the files account for every sample exactly once.
"""
from __future__ import annotations


import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from contract.experience import EXPERIENCE_SCHEMA, OPTIONAL_COLUMNS, REWARD_FIELDS, check_columns


def with_rewards(rollouts: pa.Table, rewards: pa.Table) -> pa.Table:
    """Append the reward service's columns to a ROLLOUT_SCHEMA table -> EXPERIENCE_SCHEMA (an optional
    column the rewards lack, e.g. `verifier` from a service with no verifier, is all null)."""
    if rewards.num_rows != rollouts.num_rows:
        raise ValueError(f"reward service returned {rewards.num_rows} rows for {rollouts.num_rows} samples")
    table = rollouts
    for f in REWARD_FIELDS:
        if f.name not in rewards.column_names and f.name in OPTIONAL_COLUMNS:
            table = table.append_column(f, pa.nulls(rewards.num_rows, f.type))
        else:
            table = table.append_column(f, rewards.column(f.name).cast(f.type))
    check_columns(table, EXPERIENCE_SCHEMA)
    return table.select(EXPERIENCE_SCHEMA.names)


def scored(reward, rollouts: pa.Table) -> pa.Table:
    """The rollouts scored by the reward client, as EXPERIENCE_SCHEMA (the train step's and the eval's
    one way to score): text, the prompt's conversation and its reference answer go to the service."""
    rewards = reward.score(rollouts.column("prompt").to_pylist(), rollouts.column("response").to_pylist(),
                           rollouts.column("messages").to_pylist(), rollouts.column("reference").to_pylist())
    return with_rewards(rollouts, rewards)


def staleness(table: pa.Table, learner_version: int) -> np.ndarray:
    return learner_version - table.column("policy_version").to_numpy()


def version_spread(table: pa.Table) -> np.ndarray:
    """[rows] newest minus oldest version among a sample's tokens: 0 unless an in-flight update landed
    inside the response (no `token_versions`: 0)."""
    if "token_versions" not in table.column_names:
        return np.zeros(table.num_rows, dtype=np.int64)
    return np.array([max(v) - min(v) if v else 0 for v in table.column("token_versions").to_pylist()],
                    dtype=np.int64)


def trainable_mask(table: pa.Table, learner_version: int, max_staleness: int) -> np.ndarray:
    """Valid reward and at most `max_staleness` versions behind the learner (the job plan's: 0 when sync,
    as the learner's experience check holds it)."""
    ok = table.column("reward_valid").to_numpy(zero_copy_only=False).astype(bool)
    return ok & (staleness(table, learner_version) <= max_staleness)


def untrained_reasons(table: pa.Table, fresh: np.ndarray, keep: np.ndarray) -> list[str | None]:
    """Per sample, why it is not trained on (None: it is): `invalid_reward`, `stale` (its oldest token
    more than loop.max_staleness versions behind: the sample is dropped whole, never cut), or
    `uniform_group` (dynamic sampling set its group aside)."""
    valid = table.column("reward_valid").to_numpy(zero_copy_only=False).astype(bool)
    return ["invalid_reward" if not v else "stale" if not f else "uniform_group" if not k else None
            for v, f, k in zip(valid, fresh, keep)]


def provenance(table: pa.Table, step: int, trained: np.ndarray, gold: list[float] | None,
               split: str = "train", why: list[str | None] | None = None) -> pa.Table:
    """The Parquet row set of one step: experience + step, trained flag, why not trained (`why`,
    `untrained_reasons`; null for trained rows and evals), split ("train" or "eval") and the gold
    score if known."""
    table = table.append_column("step", pa.array(np.full(table.num_rows, step, dtype=np.int64)))
    table = table.append_column("trained", pa.array(trained, type=pa.bool_()))
    table = table.append_column("not_trained", pa.array(why or [None] * table.num_rows, type=pa.string()))
    table = table.append_column("split", pa.array([split] * table.num_rows, type=pa.string()))
    if gold is not None:
        table = table.append_column("gold", pa.array(gold, type=pa.float64()))
    return table


def rollout_stats(table: pa.Table, wall_s: float) -> dict[str, float]:
    tokens = int(pc.sum(pc.list_value_length(table.column("response_ids"))).as_py() or 0)
    rewards = table.column("reward").to_numpy(zero_copy_only=False)
    spread = version_spread(table)
    return {"samples": table.num_rows, "rollout_tokens": tokens,
            "rollout_tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
            "reward_mean": float(rewards.mean()) if len(rewards) else 0.0,
            "reward_std": float(rewards.std()) if len(rewards) else 0.0,
            "response_len": tokens / max(1, table.num_rows),
            # cut at max_new_tokens rather than ended by EOS or a stop string
            "truncated_frac": float(pc.mean(pc.equal(table.column("finish_reason"), "length")).as_py() or 0.0),
            # in-flight updates: samples whose tokens span versions, and the widest span
            "spanning_versions_frac": float((spread > 0).mean()) if len(spread) else 0.0,
            "token_version_spread_max": int(spread.max()) if len(spread) else 0,
            **verifier_stats(table)}


def verifier_stats(table: pa.Table, prefix: str = "") -> dict[str, float]:
    """Counts of verifier calls that timed out or failed (their samples are not trained on), and
    the mean verifier score of the others; {} when no verifier scored the table."""
    if "verifier_outcome" not in table.column_names or table.column("verifier_outcome").null_count == table.num_rows:
        return {}
    outcome = table.column("verifier_outcome")
    parts = [dict(p) for p in table.column("reward_parts").to_pylist()]
    ok = [p for p, o in zip(parts, outcome.to_pylist()) if o == "ok"]
    score = [v for p in ok for k, v in p.items() if k.startswith("verifier:")]
    return {f"{prefix}verifier_timeouts": int(pc.sum(pc.equal(outcome, "timeout")).as_py() or 0),
            f"{prefix}verifier_errors": int(pc.sum(pc.equal(outcome, "error")).as_py() or 0),
            f"{prefix}verifier_score": float(np.mean(score)) if score else float("nan")}
