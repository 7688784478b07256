"""Token-budget micro-batches (`learner.max_tokens_per_micro_batch`).

Instead of `rl.micro_batch_size` samples padded to the batch's longest, a minibatch's samples are
sorted by length (prompt + response) and packed greedily, longest first: a micro-batch takes the
next sample while rows x its longest <= the budget (a sample longer than the budget goes alone),
and each micro-batch is cut to its own longest sample and longest response (`trim`).

Same gradient: the loss weighs each sample by 1 / (real samples in its minibatch), a weight
computed over the whole minibatch before any cut (learner/algorithm.py), so how the samples are
grouped changes nothing but floating-point summation order.

Ranks agree without talking: every rank holds the whole batch and draws the same minibatch order
(the seeded generator), so each computes the same plan for the whole minibatch (`plan`): the
micro-batches are dealt to ranks (longest-processing-time first, by padded tokens) and every rank
runs the largest count any rank got, padding its own list with weightless fillers (one short
sample with weight 0: a forward and backward that add nothing). That equal count is what
DeepSpeed's accumulation boundary and ZeRO-3's collective forwards need; the boundary itself is
set by hand on the last micro-batch (`set_boundary`), since the count now varies per minibatch.
The no-grad passes (old policy, reference, values) keep today's row shards and pack each shard
the same way (`shard_outputs`); with ZeRO-3 the shards' counts are equalised the same way.
Padding rows of the batch (`real == 0`) are never packed: they carry no weight.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable

import torch

from learner import algorithm as alg
from learner.batch import Batch

_SEQUENCE_FIELDS = ("input_ids", "attention_mask")  # [B, L]; Batch's other 2-D fields are [B, T]


@dataclass(frozen=True)
class Micro:
    rows: torch.Tensor       # batch row indices
    weightless: bool = False  # a filler: runs so every rank has the same count, weighs nothing


def lengths(b: Batch) -> torch.Tensor:
    """[B] prompt + response tokens of each row."""
    return b.attention_mask.sum(1)


def pack(rows: torch.Tensor, length: torch.Tensor, budget: int) -> list[torch.Tensor]:
    """`rows` sorted by `length` (longest first) and cut greedily under `budget` padded tokens."""
    order = rows[torch.argsort(length[rows], descending=True, stable=True)].tolist()
    parts: list[list[int]] = []
    for r in order:
        if not parts or (len(parts[-1]) + 1) * int(length[parts[-1][0]]) > budget:
            parts.append([])
        parts[-1].append(r)
    return [torch.tensor(p, dtype=torch.long) for p in parts]


def deal(parts: list[torch.Tensor], length: torch.Tensor, world: int) -> list[list[torch.Tensor]]:
    """Micro-batches to ranks: costliest (rows x longest) first, each to the least loaded rank."""
    cost = [len(p) * int(length[p].max()) for p in parts]
    load, out = [0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(parts)), key=lambda i: -cost[i]):
        r = min(range(world), key=lambda r: (load[r], r))
        out[r].append(parts[i])
        load[r] += cost[i]
    return out


def _filler(b: Batch, rows: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    real = rows[b.real[rows] > 0]
    pool = real if len(real) else rows
    return pool[int(torch.argmin(length[pool]))].view(1)


def _equalised(per_rank: list[list[torch.Tensor]], rank: int, filler: torch.Tensor) -> list[Micro]:
    n = max(1, max(len(p) for p in per_rank))
    return [Micro(p) for p in per_rank[rank]] + [Micro(filler, True)] * (n - len(per_rank[rank]))


def plan(b: Batch, rows: torch.Tensor, rank: int, world: int, budget: int) -> list[Micro]:
    """This rank's micro-batches of the minibatch `rows`; every rank gets the same count."""
    length = lengths(b)
    real = rows[b.real[rows] > 0]
    return _equalised(deal(pack(real, length, budget), length, world), rank, _filler(b, rows, length))


def trim(mb: Batch) -> Batch:
    """`mb` cut to its longest row (prompt + response) and longest response."""
    L = int(lengths(mb).max())
    T = int((lengths(mb) - mb.prompt_lens).max())
    cut = {f.name: (t[:, :L] if f.name in _SEQUENCE_FIELDS else t[:, :T])
           for f in fields(mb) if (t := getattr(mb, f.name)).dim() == 2}
    return replace(mb, **cut)


def take(b: Batch, tg: alg.Targets, part: torch.Tensor | Micro) -> tuple[Batch, alg.Targets]:
    """The micro-batch's rows of the batch and targets: plain rows for a fixed-count cut (today's
    path, untouched), trimmed rows for a `Micro` (a filler's weight zeroed through `real`)."""
    if not isinstance(part, Micro):
        return b.rows(part), tg.rows(part)
    mb = trim(b.rows(part.rows))
    if part.weightless:
        mb = replace(mb, real=torch.zeros_like(mb.real))
    t = tg.rows(part.rows)
    T = mb.mask.shape[1]
    return mb, replace(t, **{f.name: v[:, :T] for f in fields(t)
                             if (v := getattr(t, f.name)) is not None and v.dim() == 2})


def set_boundary(engines, last: bool) -> None:
    """DeepSpeed's accumulation boundary by hand: the optimizer steps after the last micro-batch."""
    for e in engines:
        if e is not None:
            e.set_gradient_accumulation_boundary(last)


def shard_outputs(b: Batch, rank: int, world: int, budget: int, collective: bool,
                  passes: dict[str, Callable[[Batch], torch.Tensor] | None], to_device) -> dict:
    """The no-grad passes over this rank's row shard (rows [rank * shard, (rank + 1) * shard), as
    the fixed-count path), packed under the budget: {name: [shard, T] or None}, rows in shard
    order, zeros on padding rows. `collective` (ZeRO-3): every rank runs the same count."""
    shard, T = len(b) // world, b.mask.shape[1]
    length = lengths(b)
    shards = [torch.arange(q * shard, (q + 1) * shard) for q in range(world)]
    per_rank = [pack(s[b.real[s] > 0], length, budget) for s in shards]
    mine = (_equalised(per_rank, rank, _filler(b, shards[rank], length)) if collective
            else [Micro(p) for p in per_rank[rank]])
    out = {k: None if fn is None else torch.zeros(shard, T) for k, fn in passes.items()}
    for m in mine:
        mb = to_device(trim(b.rows(m.rows)))
        for k, fn in passes.items():
            if fn is not None:
                v = fn(mb)
                if not m.weightless:
                    out[k][m.rows - rank * shard, :v.shape[1]] = v.float().cpu()
    return out


def no_grad_passes(actor, ref, critic, need_old: bool, temperature: float) -> dict:
    """The old-policy, reference and value passes `shard_outputs` runs (None: not needed)."""
    return {"old": (lambda mb: alg.response_logprobs(actor, mb, temperature)) if need_old else None,
            "ref": (lambda mb: alg.response_logprobs(ref, mb, temperature)) if ref is not None else None,
            "val": (lambda mb: alg.critic_values(critic, mb)) if critic is not None else None}
