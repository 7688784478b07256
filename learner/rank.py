"""One learner rank: a torch.distributed rank running DeepSpeed, inside a Ray actor.

Holds the policy engine (trained), the critic engine (PPO only, its own optimizer) and a frozen
reference policy (only when a KL coefficient is set). Every method below that touches parameters
is collective: the controller calls it on all ranks at once (ZeRO-3 gathers need every rank).
"""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from learner import algorithm as alg
from learner import lora, models, update
from learner import micro as micro_batches
from learner.batch import Batch
from learner.config import LearnerConfig
from learner.rank_group import join_deepspeed_group, rank_endpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def deepspeed_config(cfg: LearnerConfig, lr: float) -> dict:
    p = cfg.rl
    return {"train_batch_size": p.minibatch_size, "train_micro_batch_size_per_gpu": p.micro_batch_size,
            "gradient_accumulation_steps": p.minibatch_size // (cfg.num_ranks * p.micro_batch_size),
            "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0, "torch_adam": True}},
            "zero_optimization": {"stage": cfg.zero_stage}, "gradient_clipping": p.max_grad_norm,
            "bf16": {"enabled": cfg.dtype == "bfloat16"}, "steps_per_print": 10**9, "wall_clock_breakdown": False}


class LearnerRank:
    def __init__(self, rank: int, cfg_json: str, policy_dir: str, critic_dir: str | None, device: str, seed: int,
                 plan: alg.Plan):
        """`plan`: what an update needs beyond the learner config (scoring temperature, correction,
        lengths), made once by the group (`algorithm.make_plan`)."""
        self.rank, self.cfg, self.plan = rank, LearnerConfig.model_validate_json(cfg_json), plan
        self.world = self.cfg.num_ranks
        self.policy_dir, self.critic_dir, self.device, self.seed = policy_dir, critic_dir, device, seed
        self.weight_group = None

    def endpoint(self, local_only: bool) -> tuple[str, int]:
        return rank_endpoint(local_only)

    def setup(self, master_addr: str, master_port: int) -> None:
        import deepspeed
        from transformers import AutoModelForCausalLM

        join_deepspeed_group(self.rank, self.world, master_addr, master_port, self.device, self.cfg.dist_timeout_s,
                             self.seed)
        dtype = getattr(torch, self.cfg.dtype)
        policy = models.load_policy(self.cfg, self.policy_dir)  # + activation checkpointing, LoRA
        self.actor, *_ = deepspeed.initialize(model=policy, model_parameters=models.trainable(policy),
                                              config=deepspeed_config(self.cfg, self.cfg.lr))
        self.ref = None
        if self.cfg.rl.kl_coef > 0:  # LoRA: the policy with its adapters off, no second model
            self.ref = lora.reference(self.actor, policy)
        if self.cfg.rl.kl_coef > 0 and self.ref is None:
            self.ref = AutoModelForCausalLM.from_pretrained(self.policy_dir, dtype=dtype).to(self.device).eval()
            self.ref.requires_grad_(False)
        self.critic = None
        if self.cfg.rl.algorithm == "ppo":
            torch.manual_seed(self.seed)  # the critic's new value head starts the same wherever it is built
            critic = models.load_critic(self.cfg, self.critic_dir or self.policy_dir)
            self.critic, *_ = deepspeed.initialize(model=critic, model_parameters=models.trainable(critic),
                                                   config=deepspeed_config(self.cfg, self.cfg.critic_lr))

    # ---- training -----------------------------------------------------------------------------

    def train_step(self, b: Batch, n_real: int, version: int) -> dict:
        """The update (learner/update.py, read it top to bottom) with this rank as its `Engines`."""
        return update.train_step(self.cfg.rl, self.plan, self, b, n_real, version, self.seed,
                                 self.cfg.max_tokens_per_micro_batch)

    # ---- update.Engines: DeepSpeed owns the optimizers -------------------------------------------

    @property
    def collective(self) -> bool:
        return self.cfg.zero_stage == 3  # ZeRO-3 forwards gather parameters from every rank

    def backward(self, which: str, loss: torch.Tensor) -> None:
        """DeepSpeed averages gradients over ranks, so the loss is scaled by the world size (and not
        by the accumulation steps: the sample weights already make it a minibatch mean). Its
        step() after every backward applies the optimizer at the accumulation boundary only, i.e.
        after the minibatch's last micro-batch."""
        engine = self.actor if which == "actor" else self.critic
        engine.backward(loss * self.world, scale_wrt_gas=False)
        if which == "actor" and engine.is_gradient_accumulation_boundary() and self.cfg.zero_stage == 0:
            self._own_grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in engine.module.parameters() if p.grad is not None])).item()
        engine.step()

    def set_boundary(self, last: bool) -> None:
        micro_batches.set_boundary((self.actor, self.critic), last)

    def optimizer_step(self) -> float:
        """The engines stepped in `backward`; the pre-clipping global norm of the policy's step.
        DeepSpeed records it except for ZeRO-0 in fp32, where `backward` measured the (already
        all-reduced) gradients itself."""
        norm = self.actor.get_global_grad_norm()
        return float(norm) if norm is not None else self._own_grad_norm

    def all_gather(self, local: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)

    def all_reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t

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
        """What the engines receive: the HF-named weights (with LoRA: the adapter alone, or merged
        weights under the base names; `models.sync_state_dict`)."""
        from contract.weights import make_manifest, specs_of

        named, aliases, adapter = models.sync_layout(self.actor.module, self.cfg)
        return make_manifest(specs_of(named), bucket_bytes=self.cfg.bucket_mb << 20, aliases=aliases, adapter=adapter)

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
                send_weights(self.weight_group, manifest, models.sync_state_dict(self.actor.module, sd, self.cfg))
        return version

    def put_state_dict(self) -> list | None:
        """Rank 0: one ray.put of what a sync sends (`models.sync_state_dict`: full weights, or a LoRA
        adapter with its config) as a `PackedStateDict` (the put is the only copy), returned wrapped
        in a list so the caller gets the ref itself, not its value."""
        import ray

        from contract.weights import PackedStateDict

        module = self.actor.module
        _, aliases, adapter = models.sync_layout(module, self.cfg)
        with self._gathered(self.actor) as sd:
            return None if sd is None else [ray.put(PackedStateDict.pack(models.sync_state_dict(module, sd, self.cfg),
                                                                         aliases, adapter))]

    # ---- checkpoints (collective; `path` is a fresh temp dir the controller renames) ------------

    def save_checkpoint(self, path: str, version: int) -> None:
        root = Path(path)
        engines = {"policy": self.actor, "critic": self.critic}
        for name, engine in engines.items():
            if engine is None:
                continue
            # LoRA: the frozen base stays out of the DeepSpeed state (it is the model directory)
            engine.save_checkpoint(str(root / "deepspeed" / name), tag=f"v{version}",
                                   exclude_frozen_parameters=models.is_adapted(engine.module))
            with self._gathered(engine) as sd:
                if sd is not None:  # HF safetensors (LoRA: merged, plus the adapter in <name>/adapter)
                    models.export_pretrained(engine.module, root / name, sd)
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
                load_path, _ = engine.load_checkpoint(str(root / "deepspeed" / name), tag=f"v{version}",
                                                      load_module_strict=not models.is_adapted(engine.module))
                if load_path is None:
                    raise RuntimeError(f"learner checkpoint {path}: no DeepSpeed {name} state for version {version}")
        return version
