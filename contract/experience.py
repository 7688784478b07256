"""The Arrow experience batch: the one table that flows rollout -> reward -> learner -> Parquet.

One row per sample (a prompt's `sample_idx`-th completion). Rollout workers fill the rollout
columns; the controller appends the reward columns from the reward service and `step`.
Arrow end to end: the rollout batches travel through Ray's object store and are written to
Parquet as they are; the learner converts them to padded tensors once (learner/batch.py), the
reward client reads the text columns as Python lists.
"""
from __future__ import annotations

import pyarrow as pa

ROLLOUT_FIELDS = [
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("sample_idx", pa.int32(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("response", pa.string(), nullable=False),
    pa.field("response_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("logprobs", pa.list_(pa.float32()), nullable=False),
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("policy_version", pa.int64(), nullable=False),
    pa.field("worker_id", pa.string(), nullable=False),
    pa.field("gen_s", pa.float64(), nullable=False),
    # The prompt's conversation as JSON ([{role, content}, ...]) when it came as chat messages, null
    # for a plain-text prompt; `prompt` then holds it rendered with the policy's chat template. The
    # reward model re-renders these messages with its own template (reward_service/model.py).
    pa.field("messages", pa.string(), nullable=True),
    # The prompt's reference answer (the prompt file's `data.columns.answer`), which a verifier checks
    # the response against; null when the task has none.
    pa.field("reference", pa.string(), nullable=True),
    # The policy version that sampled each response token (one per `response_ids` entry). With in-flight
    # updates (`loop.mode: inflight`) a new version can load between two tokens of one response; the
    # engine then recomputes the response's KV under it, so each token's logprob is exactly that of
    # its version. `policy_version` is the first (oldest) entry. Null: every token is `policy_version`.
    pa.field("token_versions", pa.list_(pa.int64()), nullable=True),
]
ROLLOUT_SCHEMA = pa.schema(ROLLOUT_FIELDS)
# Columns a table may lack (older producers, hand-built tables): readers treat them as all null.
OPTIONAL_COLUMNS = frozenset({"messages", "reference", "token_versions", "verifier", "verifier_outcome"})
# Columns that come from the prompt table, not from the engine: joined back onto the samples by prompt_id.
PROMPT_COLUMNS = ("messages", "reference")

REWARD_FIELDS = [
    pa.field("reward", pa.float32(), nullable=False),
    pa.field("reward_valid", pa.bool_(), nullable=False),
    # name -> value of each part that went into `reward` (model, each function, feedback).
    pa.field("reward_parts", pa.map_(pa.string(), pa.float64()), nullable=False),
    # the reward model version that scored the sample (0: reward.model_dir; +1 per `rlhf reward-model update`)
    pa.field("reward_model_version", pa.int64(), nullable=False),
    # the verifier that checked the response against `reference` ("math (math-verify 0.9.0)") and how
    # that call ended: ok | timeout | error (not ok: the reward row is invalid). Null: no verifier.
    pa.field("verifier", pa.string(), nullable=True),
    pa.field("verifier_outcome", pa.string(), nullable=True),
]
EXPERIENCE_SCHEMA = pa.schema(ROLLOUT_FIELDS + REWARD_FIELDS)


class ExperienceError(ValueError):
    """An experience table that must not be trained on; the message names the column and rows."""


def rollout_batch(rows: list[dict]) -> pa.RecordBatch:
    """Build a RecordBatch in ROLLOUT_SCHEMA from row dicts (raises on a missing/mistyped field)."""
    return pa.RecordBatch.from_pylist(rows, schema=ROLLOUT_SCHEMA)


def with_optional(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` plus an all-null column for each OPTIONAL_COLUMNS field of `schema` it lacks."""
    for f in schema:
        if f.name in OPTIONAL_COLUMNS and f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table


def concat(batches: list[pa.RecordBatch | pa.Table], schema: pa.Schema = ROLLOUT_SCHEMA) -> pa.Table:
    if not batches:
        return schema.empty_table()
    first = batches[0].schema
    if all(isinstance(b, pa.RecordBatch) and b.schema.equals(first) for b in batches):
        # the pool's case (one batch per chunk, all alike): normalise once, not once per batch
        return with_optional(pa.Table.from_batches(batches), schema).select(schema.names).cast(schema)
    tables = [b if isinstance(b, pa.Table) else pa.Table.from_batches([b]) for b in batches]
    return pa.concat_tables([with_optional(t, schema).select(schema.names).cast(schema) for t in tables])


def attach_prompt_columns(rollouts: pa.Table, prompts: pa.Table) -> pa.Table:
    """`rollouts` with each row's PROMPT_COLUMNS (`messages`, `reference`) taken from the prompt
    table by prompt_id (the pool dispatches text and token ids only; the rest rejoins here)."""
    rollouts = with_optional(rollouts, ROLLOUT_SCHEMA)
    pids = rollouts.column("prompt_id").to_pylist()
    for name in PROMPT_COLUMNS:
        if name not in prompts.column_names:
            continue
        by_id = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column(name).to_pylist()))
        values = pa.array([by_id.get(p) for p in pids], pa.string())
        rollouts = rollouts.set_column(rollouts.column_names.index(name), ROLLOUT_SCHEMA.field(name), values)
    return rollouts


def check_columns(table: pa.Table, schema: pa.Schema) -> None:
    """Every required column of `schema` is present with its type (optional ones only if present)."""
    missing = [n for n in schema.names if n not in table.column_names and n not in OPTIONAL_COLUMNS]
    if missing:
        raise ExperienceError(f"experience table is missing column(s) {missing}; expected {schema.names}")
    for f in schema:
        if f.name not in table.column_names:
            continue
        have = table.schema.field(f.name).type
        if have != f.type:
            raise ExperienceError(f"experience column {f.name!r} has type {have}, expected {f.type}")


def check_lengths(table: pa.Table) -> None:
    """Every sample's logprobs must align one-to-one with its response tokens."""
    import pyarrow.compute as pc

    n_ids = pc.list_value_length(table.column("response_ids"))
    n_lp = pc.list_value_length(table.column("logprobs"))
    bad = pc.indices_nonzero(pc.not_equal(n_ids, n_lp)).to_pylist()
    if bad:
        raise ExperienceError(f"experience rows {bad[:5]} have len(logprobs) != len(response_ids)")


def sample_keys(table: pa.Table) -> list[tuple[str, int]]:
    """(prompt_id, sample_idx) per row: the identity used for exactly-once accounting."""
    return list(zip(table.column("prompt_id").to_pylist(), table.column("sample_idx").to_pylist()))


def ordered_exactly_once(table: pa.Table, prompt_ids: list[str], n: int) -> pa.Table:
    """The rows ordered by prompt (in `prompt_ids` order) then sample_idx, after checking that each
    of the len(prompt_ids) x n (prompt_id, sample_idx) keys appears exactly once (ValueError if not)."""
    import pyarrow.compute as pc

    keys = sample_keys(table)
    want = {(p, s) for p in prompt_ids for s in range(n)}
    if len(keys) != len(want) or set(keys) != want:
        missing = sorted(want - set(keys))[:3]
        raise ExperienceError(f"expected each of {len(want)} (prompt_id, sample_idx) once, got {len(keys)} rows "
                              f"({len(set(keys))} distinct); missing e.g. {missing}")
    pos = pc.index_in(table.column("prompt_id"), value_set=pa.array(prompt_ids, pa.string()))
    order = pc.sort_indices(pa.table({"p": pos, "s": table.column("sample_idx")}),
                            sort_keys=[("p", "ascending"), ("s", "ascending")])
    return table.take(order)
