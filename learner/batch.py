"""Experience table -> padded tensors, after the checks that make a table safe to train on.

Rows with `reward_valid == False` are dropped (and counted). The batch is padded with weightless
copies up to a multiple of the minibatch size, so every rank runs the same number of forward
passes (ZeRO-3 forwards are collective) and every optimizer step sees the same shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import pyarrow as pa
import pyarrow.compute as pc
import torch

from contract.experience import EXPERIENCE_SCHEMA, ExperienceError, check_columns, check_lengths


@dataclass
class Batch:
    input_ids: torch.Tensor         # [B, L] prompt + response, right padded
    attention_mask: torch.Tensor    # [B, L]
    prompt_lens: torch.Tensor       # [B]
    response_ids: torch.Tensor      # [B, T]
    mask: torch.Tensor              # [B, T] 1 on real response tokens
    rollout_logprobs: torch.Tensor  # [B, T] as reported by the rollout engine
    score: torch.Tensor             # [B] sequence reward
    group: torch.Tensor             # [B] prompt index (GRPO/RLOO groups); padding rows get groups of one
    real: torch.Tensor              # [B] 1 for a real sample, 0 for padding
    truncated: torch.Tensor         # [B] bool: cut at max_new_tokens (finish_reason "length"); padding False

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, idx: torch.Tensor | slice) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def to(self, device) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@dataclass(frozen=True)
class Prepared:
    batch: Batch
    num_samples: int
    num_dropped: int
    min_policy_version: int


def validate(table: pa.Table, version: int, max_staleness: int) -> tuple[pa.Table, int]:
    """Raise ExperienceError on anything untrainable; return (valid rows, number dropped)."""
    check_columns(table, EXPERIENCE_SCHEMA)
    check_lengths(table)
    valid = table.filter(table.column("reward_valid"))
    dropped = table.num_rows - valid.num_rows
    if valid.num_rows == 0:
        raise ExperienceError(f"experience table has no row with reward_valid=True ({dropped} dropped)")
    nan = pc.indices_nonzero(pc.invert(pc.is_finite(valid.column("reward")))).to_pylist()
    if nan:
        raise ExperienceError(f"experience column 'reward' is NaN/inf in valid rows {nan[:5]}; expected finite floats")
    empty = pc.indices_nonzero(pc.equal(pc.list_value_length(valid.column("response_ids")), 0)).to_pylist()
    if empty:
        raise ExperienceError(f"experience rows {empty[:5]} have an empty 'response_ids'; expected >= 1 token")
    versions = valid.column("policy_version")
    oldest, newest = pc.min(versions).as_py(), pc.max(versions).as_py()
    if oldest < version - max_staleness:
        raise ExperienceError(f"experience column 'policy_version' has {oldest}, older than allowed: learner is at "
                              f"version {version}, max_staleness {max_staleness}")
    if newest > version:
        raise ExperienceError(f"experience column 'policy_version' has {newest}, newer than the learner's {version}")
    return valid, dropped


def to_batch(table: pa.Table, multiple_of: int, pad_id: int = 0) -> Batch:
    """Pad a validated table into tensors; B is rounded up to `multiple_of` with weightless rows."""
    prompts = table.column("prompt_ids").to_pylist()
    responses = table.column("response_ids").to_pylist()
    logprobs = table.column("logprobs").to_pylist()
    n = len(prompts)
    B = math.ceil(n / multiple_of) * multiple_of
    L = max(len(p) + len(r) for p, r in zip(prompts, responses))
    T = max(len(r) for r in responses)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, L, dtype=torch.long)
    response_ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T)
    rollout_lp = torch.zeros(B, T)
    prompt_lens = torch.zeros(B, dtype=torch.long)
    for i in range(B):
        j = i % n  # padding rows copy a real row (valid shapes), then get mask 0 and weight 0
        p, r = prompts[j], responses[j]
        input_ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        attention_mask[i, :len(p) + len(r)] = 1
        prompt_lens[i] = len(p)
        response_ids[i, :len(r)] = torch.tensor(r)
        if i < n:
            mask[i, :len(r)] = 1
            rollout_lp[i, :len(r)] = torch.tensor(logprobs[j])
    score = torch.zeros(B)
    score[:n] = torch.tensor(table.column("reward").to_numpy(zero_copy_only=False), dtype=torch.float32)
    pids = table.column("prompt_id").to_pylist()
    index = {pid: k for k, pid in enumerate(dict.fromkeys(pids))}
    group = torch.tensor([index[pid] for pid in pids] + list(range(len(index), len(index) + B - n)))
    real = (torch.arange(B) < n).float()
    truncated = torch.zeros(B, dtype=torch.bool)
    truncated[:n] = torch.tensor([r == "length" for r in table.column("finish_reason").to_pylist()], dtype=torch.bool)
    return Batch(input_ids, attention_mask, prompt_lens, response_ids, mask, rollout_lp, score, group, real, truncated)


def prepare(table: pa.Table, version: int, max_staleness: int, multiple_of: int) -> Prepared:
    valid, dropped = validate(table, version, max_staleness)
    return Prepared(batch=to_batch(valid, multiple_of), num_samples=valid.num_rows, num_dropped=dropped,
                    min_policy_version=pc.min(valid.column("policy_version")).as_py())
