"""`RolloutWorker`: a Ray actor owning one vLLM engine, its policy version and its counters.

Weights arrive by either transport the learner offers: a state dict (Ray derefs an ObjectRef
argument) or a broadcast over a side process group the worker joins as rank >= 1. Either way the
tensors stream into `reload_weights`, or, when they are a LoRA adapter (`adapter` set on the
manifest / packed state dict), into the engine's adapter slot; the engine is never restarted.
"""
from __future__ import annotations

import os
import time

import pyarrow as pa
import ray

from actors.config import RolloutConfig, SamplingConfig
from contract.devices import DeviceProfile
from contract.weights import (GroupAddress, PackedStateDict, StaleVersionError, WeightManifest, check_version,
                              join_group, leave_group, receive_weights)


class Worker:
    """A rollout worker: one vLLM engine, its weights and its health; `RolloutWorker` below is it as a
    Ray actor, and one process can also host it directly (benchmarks).

    `defer_engine=True` (what the pool uses): the constructor only records its arguments, so `ping`
    answers as soon as Ray has placed the actor on a node and started its process, and the engine
    loads in `start_engine`: the pool can tell "waiting for a node" from "loading the model".
    `engine_factory` (a callable or "module:attr", called like `RolloutEngine(model_dir, cfg.engine,
    device)`) replaces vLLM: only benchmarks/scale.py (a simulated engine) and tests set it, never
    a job config."""

    def __init__(self, worker_id: str, model_dir: str, cfg: RolloutConfig, device_kind: str = "cpu",
                 defer_engine: bool = False, engine_factory=None):
        device = DeviceProfile(kind=device_kind)  # type: ignore[arg-type]
        for k, v in device.actor_env(cfg.threads_per_worker).items():
            os.environ.setdefault(k, v)  # direct construction (no runtime_env): still before vllm import
        self.worker_id, self.cfg, self.device = worker_id, cfg, device
        self._model_dir, self._engine_factory = model_dir, engine_factory
        self.engine = None
        self.version = 0
        self._group = None
        self._samples = self._tokens = 0
        self._gen_s = 0.0
        if not defer_engine:
            self.start_engine()

    def start_engine(self) -> dict:
        """Load the engine (idempotent); the worker can generate once this returns."""
        if self.engine is None:
            if isinstance(self._engine_factory, str):
                from contract.user_code import load_function

                factory = load_function(self._engine_factory, "engine_factory")
            elif self._engine_factory is not None:
                factory = self._engine_factory
            else:
                from actors.engine import RolloutEngine as factory
            self.engine = factory(self._model_dir, self.cfg.engine, self.device)
        return self.ping()

    @ray.method(concurrency_group="health")
    def ping(self) -> dict:
        return {"worker_id": self.worker_id, "version": self.version, "alive": True, "pid": os.getpid()}

    @ray.method(concurrency_group="health")
    def node_id(self) -> str:
        """The Ray node this worker runs on (placement by role is checked against it)."""
        return ray.get_runtime_context().get_node_id()

    def generate(self, prompts: pa.Table, sampling: SamplingConfig | None = None) -> pa.RecordBatch:
        t0 = time.perf_counter()
        batch = self.engine.generate(prompts, sampling or self.cfg.sampling, self.version, self.worker_id)
        self._gen_s += time.perf_counter() - t0
        self._samples += batch.num_rows
        self._tokens += sum(len(r) for r in batch.column("response_ids").to_pylist())
        return batch

    def _load(self, version: int, named, adapter: str) -> None:
        """Tensors into the engine: a LoRA adapter (with its adapter_config.json) or full weights."""
        if adapter:
            self.engine.load_adapter(version, named, adapter)
        else:
            self.engine.load_weights(named)
        self.version = version

    def update_weights(self, version: int, weights: PackedStateDict) -> int:
        """Object-store transport: `weights` (HF names, or a LoRA adapter) maps from shared memory
        without a copy."""
        if check_version(self.version, version):
            self._load(version, weights.tensors(), weights.adapter)
        return self.version

    def join_weight_group(self, addr: GroupAddress, rank: int) -> None:
        self.leave_weight_group()
        self._group = join_group(addr, rank)

    def receive_weights(self, version: int, manifest: WeightManifest) -> int:
        """Broadcast transport. A stale version still drains the broadcast (so the sender and the other
        receivers finish the collective), then raises."""
        if self._group is None:
            raise RuntimeError(f"worker {self.worker_id}: receive_weights before join_weight_group")
        stream = receive_weights(self._group, manifest, device=self.device.torch_device())
        try:
            load = check_version(self.version, version)
        except StaleVersionError:
            for _ in stream:
                pass
            raise
        if load:
            self._load(version, stream, manifest.adapter)
        else:
            for _ in stream:
                pass
        return self.version

    def leave_weight_group(self) -> None:
        if self._group is not None:
            leave_group(self._group)
            self._group = None

    @ray.method(concurrency_group="health")
    def metrics(self) -> dict:
        return {"worker_id": self.worker_id, "version": self.version, "samples": self._samples,
                "tokens": self._tokens, "gen_s": self._gen_s,
                "tokens_per_s": self._tokens / self._gen_s if self._gen_s else 0.0}


# ping/metrics run on their own thread so a health check answers while a long generate runs;
# generate and the weight calls share the default group and never overlap.
RolloutWorker = ray.remote(max_restarts=0, max_task_retries=0, concurrency_groups={"health": 1})(Worker)
