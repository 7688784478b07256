"""Checks of a prompt batch, done before any work is dispatched: a bad batch is a one-line error,
never a hang or a half-filled table. Used by the pool (before splitting) and by each engine
(for callers that reach a worker directly)."""
from __future__ import annotations

import pyarrow as pa


class PromptError(ValueError):
    """A prompt batch that cannot be generated from; the message names the column/prompt."""


def check_prompt_table(prompts: pa.Table) -> None:
    if not isinstance(prompts, (pa.Table, pa.RecordBatch)):
        raise PromptError(f"prompts: expected a pyarrow Table with columns prompt_id, prompt (got {type(prompts).__name__})")
    for col in ("prompt_id", "prompt"):
        if col not in prompts.column_names:
            raise PromptError(f"prompts: missing column {col!r}; expected columns prompt_id (string), prompt (string)")
        typ = prompts.schema.field(col).type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
            raise PromptError(f"prompts.{col}: expected string values (got {typ})")
        if prompts.column(col).null_count:
            raise PromptError(f"prompts.{col}: expected a string in every row (got {prompts.column(col).null_count} null)")
    if prompts.num_rows == 0:
        raise PromptError("prompts: empty batch; expected at least one prompt")
    ids = prompts.column("prompt_id").to_pylist()
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise PromptError(f"prompts.prompt_id: expected unique ids (got {dup!r} more than once)")


def check_prompt_lengths(prompt_ids: list[str], token_ids: list[list[int]], max_model_len: int) -> None:
    """A prompt must leave room for at least one new token; responses stop at max_model_len
    (finish_reason "length")."""
    for pid, toks in zip(prompt_ids, token_ids):
        if len(toks) >= max_model_len:
            raise PromptError(f"prompt {pid!r}: {len(toks)} tokens, expected fewer than "
                              f"rollout.engine.max_model_len={max_model_len}")
