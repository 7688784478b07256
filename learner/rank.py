"""One learner rank: a torch.distributed rank running DeepSpeed, inside a Ray actor.

Holds the policy engine (trained), the critic engine (PPO only, its own optimizer) and a frozen
reference policy (only when a KL coefficient is set). Every method below that touches parameters
is collective: the controller calls it on all ranks at once (ZeRO-3 gathers need every rank).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from learner import algorithm as alg
from learner.batch import Batch
from learner.config import LearnerConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def deepspeed_config(cfg: LearnerConfig, lr: float) -> dict:
    p = cfg.ppo
    return {"train_batch_size": p.minibatch_size, "train_micro_batch_size_per_gpu": p.micro_batch_size,
            "gradient_accumulation_steps": p.minibatch_size // (cfg.num_ranks * p.micro_batch_size),
            "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0, "torch_adam": True}},
            "zero_optimization": {"stage": cfg.zero_stage}, "gradient_clipping": p.max_grad_norm,
            "bf16": {"enabled": cfg.dtype == "bfloat16"}, "steps_per_print": 10**9, "wall_clock_breakdown": False}


class LearnerRank:
    def __init__(self, rank: int, cfg_json: str, policy_dir: str, critic_dir: str | None, device: str, seed: int,
                 sampling_temperature: float = 1.0, async_rollouts: bool = False, max_new_tokens: int | None = None):
        """`sampling_temperature`: the rollout sampler's temperature; every pass scores at it
        (0 = greedy: scored at 1, see `algorithm.scoring_temperature`). `async_rollouts`: the loop
        is async (rollout correction's auto mode). `max_new_tokens`: the sampler's response limit
        (seq_sum_norm's default constant, the overlong penalty's L_max). See `algorithm.make_plan`."""
        self.rank, self.cfg = rank, LearnerConfig.model_validate_json(cfg_json)
        self.plan = alg.make_plan(self.cfg.ppo, sampling_temperature, async_rollouts, max_new_tokens)
        self.world = self.cfg.num_ranks
        self.policy_dir, self.critic_dir, self.device, self.seed = policy_dir, critic_dir, device, seed
        self.weight_group = None

    def endpoint(self, local_only: bool) -> tuple[str, int]:
        """(address peers reach this rank's node at, a free port there), for a rendezvous store this
        rank hosts: the DeepSpeed group's, and the weight-sync group's (whose peers may be rollout
        workers on other nodes)."""
        import ray

        from contract.net import free_port

        host = "127.0.0.1" if local_only else ray.util.get_node_ip_address()
        return host, free_port("")

    def setup(self, master_addr: str, master_port: int) -> None:
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world), LOCAL_RANK="0")
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        backend = "nccl" if self.device == "cuda" else "gloo"
        deepspeed.init_distributed(dist_backend=backend, timeout=dt.timedelta(seconds=self.cfg.dist_timeout_s))
        torch.manual_seed(self.seed)
        dtype = getattr(torch, self.cfg.dtype)
        policy = AutoModelForCausalLM.from_pretrained(self.policy_dir, dtype=torch.float32)
        self.actor, *_ = deepspeed.initialize(model=policy, model_parameters=policy.parameters(),
                                              config=deepspeed_config(self.cfg, self.cfg.lr))
        self.ref = None
        if self.cfg.ppo.kl_coef > 0:
            self.ref = AutoModelForCausalLM.from_pretrained(self.policy_dir, dtype=dtype).to(self.device).eval()
            self.ref.requires_grad_(False)
        self.critic = None
        if self.cfg.ppo.algorithm == "ppo":
            critic = AutoModelForTokenClassification.from_pretrained(
                self.critic_dir or self.policy_dir, num_labels=1, dtype=torch.float32)
            self.critic, *_ = deepspeed.initialize(model=critic, model_parameters=critic.parameters(),
                                                   config=deepspeed_config(self.cfg, self.cfg.critic_lr))

    # ---- training -----------------------------------------------------------------------------

    def _to_device(self, b: Batch) -> Batch:
        return Batch(**{k: v.to(self.device) for k, v in vars(b).items()})

    def _all_gather(self, local: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)

    @torch.no_grad()
    def _targets(self, b: Batch) -> alg.Targets:
        """Old logprobs (unless the update's first forward gives them), reference logprobs and values
        on this rank's shard, gathered to the full batch."""
        micro, shard = self.cfg.ppo.micro_batch_size, len(b) // self.world
        outs: dict[str, list[torch.Tensor]] = {"old": [], "ref": [], "val": []}
        need_old = not alg.old_is_first_forward(self.cfg.ppo, len(b), self.plan)
        for start in range(self.rank * shard, (self.rank + 1) * shard, micro):
            mb = self._to_device(b.rows(slice(start, start + micro)))
            if need_old:
                outs["old"].append(alg.response_logprobs(self.actor, mb, self.plan.temperature))
            if self.ref is not None:
                outs["ref"].append(alg.response_logprobs(self.ref, mb, self.plan.temperature))
            if self.critic is not None:
                outs["val"].append(alg.critic_values(self.critic, mb))
        full = {k: self._all_gather(torch.cat(v)).cpu() if v else None for k, v in outs.items()}
        return alg.compute_targets(self.cfg.ppo, b, full["old"], full["ref"], full["val"], self.plan)

    def train_step(self, b: Batch, n_real: int, version: int) -> dict:
        import torch.distributed as dist

        t0 = time.time()
        p = self.cfg.ppo
        tg = self._targets(b)
        sums: dict[str, torch.Tensor] = {}
        maxes: dict[str, float] = {}
        grad_norms = []
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + version)
        micro_per_rank = p.minibatch_size // (self.world * p.micro_batch_size)
        for _ in range(p.epochs):
            for rows in alg.minibatches(n_real, len(b), p.minibatch_size, gen):
                norm = alg.loss_normaliser(p, b.rows(rows), tg.keep[rows])
                mine = rows.split(p.micro_batch_size)[self.rank * micro_per_rank:(self.rank + 1) * micro_per_rank]
                for idx in mine:
                    for name, value in self._micro_step(b.rows(idx), tg.rows(idx), norm).items():
                        if name in alg.MAX_METRICS:
                            maxes[name] = max(maxes.get(name, 0.0), float(value.max()))
                        else:
                            sums[name] = sums.get(name, 0) + value.sum()
                grad_norms.append(self._grad_norm())
        names, max_names = sorted(sums), sorted(maxes)
        totals = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64) for k in names])
        dist.all_reduce(totals)
        peaks = torch.tensor([maxes[k] for k in max_names], dtype=torch.float64)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        # logprob_gap (rollout engine vs learner on the same tokens) is a health signal: dtype,
        # kernels or stale weights show up there first.
        metrics = {k: float(v) / (n_real * p.epochs) for k, v in zip(names, totals)}
        metrics.update({k: float(v) for k, v in zip(max_names, peaks)})
        metrics["grad_norm"] = sum(grad_norms) / len(grad_norms)
        metrics["step_s"] = time.time() - t0
        metrics.setdefault("value_loss", 0.0)
        return metrics

    def _micro_step(self, mb: Batch, tg: alg.Targets, norm: float) -> dict[str, torch.Tensor]:
        """Forward/backward one micro-batch; DeepSpeed steps the optimizer at the minibatch boundary.
        DeepSpeed averages gradients over ranks, so the loss is scaled by the world size (and not by
        the accumulation steps: the sample weights already make it a minibatch mean)."""
        mb = self._to_device(mb)
        tg = tg.to(self.device)
        w = alg.sample_weights(mb, norm, tg.keep)
        loss, metrics = alg.actor_loss(self.cfg.ppo, self.actor, mb, tg, w, self.plan)
        self.actor.backward(loss * self.world, scale_wrt_gas=False)
        if self.actor.is_gradient_accumulation_boundary() and self.cfg.zero_stage == 0:
            self._own_grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in self.actor.module.parameters() if p.grad is not None])).item()
        self.actor.step()
        if self.critic is not None:
            vloss, vm = alg.critic_loss(self.cfg.ppo, alg.critic_values(self.critic, mb), mb, tg, w, self.plan)
            self.critic.backward(vloss * self.world, scale_wrt_gas=False)
            self.critic.step()
            metrics.update(vm)
        return {k: v.cpu() for k, v in metrics.items()}

    def _grad_norm(self) -> float:
        """The pre-clipping global norm of the last policy step. DeepSpeed records it except for
        ZeRO-0 in fp32, where _micro_step measures the (already all-reduced) gradients itself."""
        norm = self.actor.get_global_grad_norm()
        return float(norm) if norm is not None else self._own_grad_norm

    # ---- full state dict (collective) -----------------------------------------------------------

    @contextmanager
    def _gathered(self, engine):
        """Yield the full HF-named parameters on rank 0 (None elsewhere), gathering ZeRO-3 shards.
        A tied parameter appears once, under its first name (see `contract.weights.tied_aliases`)."""
        import deepspeed

        named = list(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None,
                                               enabled=self.cfg.zero_stage == 3):
            yield {n: p.detach() for n, p in named} if self.rank == 0 else None

    def manifest(self):
        from contract.weights import make_manifest, specs_of, tied_aliases

        named = [(n, p.new_empty(tuple(getattr(p, "ds_shape", p.shape)), device="meta"))
                 for n, p in self.actor.module.named_parameters()]
        return make_manifest(specs_of(named), bucket_bytes=self.cfg.bucket_mb << 20,
                             aliases=tied_aliases(self.actor.module))

    def join_weight_group(self, addr) -> None:
        from contract.weights import join_group

        self.leave_weight_group()
        self.weight_group = join_group(addr, 0)

    def leave_weight_group(self) -> None:
        from contract.weights import leave_group

        if self.weight_group is not None:
            leave_group(self.weight_group)
            self.weight_group = None

    def broadcast_weights(self, version: int) -> int:
        from contract.weights import send_weights

        manifest = self.manifest()
        with self._gathered(self.actor) as sd:
            if sd is not None:
                send_weights(self.weight_group, manifest, sd)
        return version

    def put_state_dict(self) -> list | None:
        """Rank 0: one ray.put of the full state dict as a `PackedStateDict` (the put is the only
        copy), returned wrapped in a list so the caller gets the ref itself, not its value."""
        import ray

        from contract.weights import PackedStateDict, tied_aliases

        with self._gathered(self.actor) as sd:
            return None if sd is None else [ray.put(PackedStateDict.pack(sd, tied_aliases(self.actor.module)))]

    # ---- checkpoints (collective; `path` is a fresh temp dir the controller renames) ------------

    def save_checkpoint(self, path: str, version: int) -> None:
        root = Path(path)
        engines = {"policy": self.actor, "critic": self.critic}
        for name, engine in engines.items():
            if engine is None:
                continue
            engine.save_checkpoint(str(root / "deepspeed" / name), tag=f"v{version}")
            with self._gathered(engine) as sd:
                if sd is not None:
                    engine.module.save_pretrained(root / name, state_dict=sd, safe_serialization=True)
                    for f in TOKENIZER_FILES:
                        if (Path(self.policy_dir) / f).is_file():
                            shutil.copy(Path(self.policy_dir) / f, root / name / f)
        if self.rank == 0:
            (root / "learner_state.json").write_text(json.dumps({"version": version}))

    def load_checkpoint(self, path: str) -> int:
        root = Path(path)
        version = json.loads((root / "learner_state.json").read_text())["version"]
        for name, engine in {"policy": self.actor, "critic": self.critic}.items():
            if engine is not None:
                load_path, _ = engine.load_checkpoint(str(root / "deepspeed" / name), tag=f"v{version}")
                if load_path is None:
                    raise RuntimeError(f"learner checkpoint {path}: no DeepSpeed {name} state for version {version}")
        return version
