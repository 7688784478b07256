"""One PPO-family update, top to bottom, whoever owns the optimizers.

`train_step` is the whole update: the no-grad passes (old policy, reference, values) on this
process's shard of the batch, gathered; the targets (advantages, returns, loss masks); then
epochs x minibatches x this process's micro-batches, each a forward, the losses and a backward,
with an optimizer step at every minibatch end; and the metrics, reduced over processes.

It runs unchanged on a DeepSpeed rank (learner/rank.py: the engines own the optimizers and
average gradients over ranks) and in one plain-torch process (learner/local.py: AdamW and
clip_grad_norm_): an `Engines` object is all that differs between them.

Loss scale (learner/algorithm.py): every normaliser is computed over the whole minibatch before
it is cut into ranks and micro-batches, so the cut changes nothing but summation order. The cut is
`rl.micro_batch_size` rows, or with a token budget (`learner.max_tokens_per_micro_batch`) the
length-sorted packing of learner/micro.py.
"""
from __future__ import annotations

import time
from typing import Any, Protocol

import torch

from contract.devices import DeviceProfile
from learner import algorithm as alg
from learner import micro
from learner.batch import Batch
from learner.config import RLConfig


class Engines(Protocol):
    """Who owns the models and optimizers of one process of the update."""

    rank: int            # this process's index among `world`
    world: int           # processes sharing the batch (data parallel)
    device: str          # "cpu" or "cuda"
    collective: bool     # forwards are collective (ZeRO-3): every process runs as many
    actor: Any           # the trained policy (callable like its HF module)
    ref: Any | None      # the frozen reference (kl_coef > 0)
    critic: Any | None   # the value model (ppo)

    def backward(self, which: str, loss: torch.Tensor) -> None:
        """Accumulate the gradient of one micro-batch's loss ("actor" or "critic"); the loss is
        already this micro-batch's share of the minibatch mean over all processes."""

    def set_boundary(self, last: bool) -> None:
        """Token-budget micro-batches only (their count varies per minibatch): whether the next
        micro-batch is the minibatch's last, after which the optimizers step."""

    def optimizer_step(self) -> float:
        """The minibatch is done: clip and step every optimizer (if not done already) and zero
        the gradients; returns the policy's pre-clipping global gradient norm."""

    def all_gather(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's tensor, in rank order (identity for one process)."""

    def all_reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """Sum ("sum") or maximum ("max") over processes (identity for one process)."""


@torch.no_grad()
def targets(cfg: RLConfig, plan: alg.Plan, eng: Engines, b: Batch, budget: int | None = None) -> alg.Targets:
    """Old logprobs (unless the update's first forward gives them), reference logprobs and values
    on this process's row shard, gathered to the full batch, then the targets."""
    micro_rows, shard = cfg.micro_batch_size, len(b) // eng.world
    need_old = not alg.old_is_first_forward(cfg, len(b), plan)
    passes = micro.no_grad_passes(eng.actor, eng.ref, eng.critic, need_old, plan.temperature)
    if budget is not None:  # packed under the token budget (learner/micro.py)
        local = micro.shard_outputs(b, eng.rank, eng.world, budget, eng.collective, passes,
                                    lambda mb: mb.to(eng.device))
        outs = {k: [] if v is None else [v] for k, v in local.items()}
    else:
        outs = {k: [] for k in passes}
        for start in range(eng.rank * shard, (eng.rank + 1) * shard, micro_rows):
            mb = b.rows(slice(start, start + micro_rows)).to(eng.device)
            for k, fn in passes.items():
                if fn is not None:
                    outs[k].append(fn(mb))
    full = {k: eng.all_gather(torch.cat(v)).cpu() if v else None for k, v in outs.items()}
    return alg.compute_targets(cfg, b, full["old"], full["ref"], full["val"], plan)


def micro_step(cfg: RLConfig, plan: alg.Plan, eng: Engines, mb: Batch, tg: alg.Targets, norm: float
               ) -> dict[str, torch.Tensor]:
    """Forward, losses and backward of one micro-batch (policy, then critic); per-sample metrics."""
    mb, tg = mb.to(eng.device), tg.to(eng.device)
    w = alg.sample_weights(mb, norm, tg.keep)
    loss, metrics = alg.actor_loss(cfg, eng.actor, mb, tg, w, plan)
    eng.backward("actor", loss)
    if eng.critic is not None:
        vloss, vm = alg.critic_loss(cfg, alg.critic_values(eng.critic, mb), mb, tg, w, plan)
        eng.backward("critic", vloss)
        metrics.update(vm)
    return {k: v.detach().cpu() for k, v in metrics.items()}


def my_micro_batches(cfg: RLConfig, eng: Engines, b: Batch, rows: torch.Tensor, budget: int | None) -> list:
    """This process's micro-batches of the minibatch `rows` (every process gets as many)."""
    if budget is not None:
        return micro.plan(b, rows, eng.rank, eng.world, budget)
    per_rank = cfg.minibatch_size // (eng.world * cfg.micro_batch_size)
    return list(rows.split(cfg.micro_batch_size)[eng.rank * per_rank:(eng.rank + 1) * per_rank])


def train_step(cfg: RLConfig, plan: alg.Plan, eng: Engines, b: Batch, n_real: int, version: int, seed: int,
               budget: int | None = None) -> dict[str, float]:
    """The whole update on `b` (every process holds all of it and works on its share). Minibatch
    order is seeded by (seed, version): the same on every process and on a resumed run. `budget`:
    tokens per micro-batch (`learner.max_tokens_per_micro_batch`), None for micro_batch_size rows."""
    t0 = time.time()
    memory = DeviceProfile(eng.device)  # type: ignore[arg-type]
    memory.reset_peak_memory()
    tg = targets(cfg, plan, eng, b, budget)
    sums: dict[str, torch.Tensor] = {}
    maxes: dict[str, float] = {}
    grad_norms = []
    gen = torch.Generator().manual_seed(seed * 1_000_003 + version)
    for _ in range(cfg.epochs):
        for rows in alg.minibatches(n_real, len(b), cfg.minibatch_size, gen):
            norm = alg.loss_normaliser(cfg, b.rows(rows), tg.keep[rows])
            mine = my_micro_batches(cfg, eng, b, rows, budget)
            for k, part in enumerate(mine):
                if budget is not None:
                    eng.set_boundary(k == len(mine) - 1)
                for name, value in micro_step(cfg, plan, eng, *micro.take(b, tg, part), norm).items():
                    if name in alg.MAX_METRICS:
                        maxes[name] = max(maxes.get(name, 0.0), float(value.max()))
                    else:
                        sums[name] = sums.get(name, 0) + value.sum()
            grad_norms.append(eng.optimizer_step())
    maxes["peak_mem_mb"] = memory.peak_memory_mb()  # this step's peak in this process; max over processes
    names, max_names = sorted(sums), sorted(maxes)
    totals = eng.all_reduce(torch.stack([torch.as_tensor(sums[k], dtype=torch.float64) for k in names]), "sum")
    peaks = eng.all_reduce(torch.tensor([maxes[k] for k in max_names], dtype=torch.float64), "max")
    # logprob_gap (rollout engine vs learner on the same tokens) is a health signal: dtype,
    # kernels or stale weights show up there first.
    metrics = {k: float(v) / (n_real * cfg.epochs) for k, v in zip(names, totals)}
    metrics.update({k: float(v) for k, v in zip(max_names, peaks)})
    metrics["grad_norm"] = sum(grad_norms) / len(grad_norms)
    metrics["step_s"] = time.time() - t0
    metrics.setdefault("value_loss", 0.0)
    return metrics
