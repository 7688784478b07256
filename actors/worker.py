"""`RolloutWorker`: a Ray actor owning one vLLM engine, its policy version and its counters.

Weights arrive by either transport the learner offers: a state dict (Ray derefs an ObjectRef
argument) or a broadcast over a side process group the worker joins as rank >= 1. Either way the
tensors stream into `reload_weights`, or, when they are a LoRA adapter (`adapter` set on the
manifest / packed state dict), into the engine's adapter slot; the engine is never restarted.

Weights and generation never race: the weight calls run on their own thread ("weights" group), and
a version that arrives while a generate runs is staged, not loaded. The thread that steps the
engine loads it: between two engine steps when `rollout.inflight_updates` is on (sequences in
flight carry on under the new version, tagged per token: actors/engine.py `run_steps`), else when
the generate returns. A version that arrives while no generate runs loads at once.
"""
from __future__ import annotations

import os
import threading
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
        self._weights_lock = threading.Lock()  # guards the three below; held while weights load
        self._generating = False
        self._staged: tuple[int, object, str] | None = None  # (version, tensors, adapter) for the engine's thread
        self._samples = self._tokens = 0
        self._gen_s = 0.0
        self._engine_steps = 0
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

    def generate(self, prompts: pa.Table, sampling: SamplingConfig | None = None, one_version: bool = False
                 ) -> pa.RecordBatch:
        """`one_version`: every sample of this call from one policy version even with in-flight updates
        on (a held-out eval): a version arriving meanwhile loads when the call returns."""
        t0 = time.perf_counter()
        with self._weights_lock:
            self._load_staged()
            self._generating = True
        try:
            load = self.cfg.inflight_updates and not one_version
            batch = self.engine.generate(prompts, sampling or self.cfg.sampling, self.version, self.worker_id,
                                         between_steps=lambda version: self._between_steps(version, load))
        finally:
            with self._weights_lock:
                self._generating = False
                self._load_staged()
        self._gen_s += time.perf_counter() - t0
        self._samples += batch.num_rows
        self._tokens += sum(len(r) for r in batch.column("response_ids").to_pylist())
        return batch

    def _between_steps(self, version: int, load: bool) -> int:
        """The engine's hook between two steps: count it, and (`load`) load a staged version; returns
        the version the next step serves."""
        with self._weights_lock:
            self._engine_steps += 1
            if load:
                self._load_staged()
            return self.version

    def _load_staged(self) -> None:
        if self._staged is not None:
            (version, named, adapter), self._staged = self._staged, None
            self._load(version, named, adapter)

    def _load(self, version: int, named, adapter: str) -> None:
        """Tensors into the engine: a LoRA adapter (with its adapter_config.json) or full weights."""
        if adapter:
            self.engine.load_adapter(version, named, adapter)
        else:
            self.engine.load_weights(named)
        self.version = version

    def _accept(self, version: int, named, adapter: str, stream: bool) -> int:
        """Load `version` now, or stage it for the engine's thread if a generate runs. `named`: a
        callable giving the (name, tensor) pairs; `stream`: they come off a broadcast, so staging
        drains and copies them (the sender's collective must finish; its buffers are reused), outside
        the lock: the engine keeps stepping meanwhile."""
        with self._weights_lock:
            if not self._generating:  # streamed straight into the engine; a generate starting now waits
                self._load(version, named(), adapter)
                return version
        tensors = [(n, t.clone()) for n, t in named()] if stream else named()
        with self._weights_lock:
            if self._generating:
                self._staged = (version, tensors, adapter)
            else:  # the generate ended meanwhile
                self._load(version, tensors, adapter)
        return version

    @ray.method(concurrency_group="weights")
    def update_weights(self, version: int, weights: PackedStateDict) -> int:
        """Object-store transport: `weights` (HF names, or a LoRA adapter) maps from shared memory
        without a copy. Returns once the version is loaded, or staged while a generate runs."""
        if check_version(self._newest(), version):
            return self._accept(version, weights.tensors, weights.adapter, stream=False)
        return self._newest()

    def _newest(self) -> int:
        """The version this worker will serve next: staged, else loaded."""
        with self._weights_lock:
            return self._staged[0] if self._staged is not None else self.version

    @ray.method(concurrency_group="weights")
    def join_weight_group(self, addr: GroupAddress, rank: int) -> None:
        self.leave_weight_group()
        self._group = join_group(addr, rank)

    @ray.method(concurrency_group="weights")
    def receive_weights(self, version: int, manifest: WeightManifest) -> int:
        """Broadcast transport. A stale version still drains the broadcast (so the sender and the other
        receivers finish the collective), then raises."""
        if self._group is None:
            raise RuntimeError(f"worker {self.worker_id}: receive_weights before join_weight_group")
        stream = receive_weights(self._group, manifest, device=self.device.torch_device())
        try:
            load = check_version(self._newest(), version)
        except StaleVersionError:
            for _ in stream:
                pass
            raise
        if load:
            return self._accept(version, lambda: stream, manifest.adapter, stream=True)
        for _ in stream:
            pass
        return self._newest()

    @ray.method(concurrency_group="weights")
    def leave_weight_group(self) -> None:
        if self._group is not None:
            leave_group(self._group)
            self._group = None

    @ray.method(concurrency_group="health")
    def metrics(self) -> dict:
        return {"worker_id": self.worker_id, "version": self.version, "samples": self._samples,
                "tokens": self._tokens, "gen_s": self._gen_s,
                "engine_steps": self._engine_steps,
                "tokens_per_s": self._tokens / self._gen_s if self._gen_s else 0.0}


# ping/metrics run on their own thread so a health check answers while a long generate runs; the
# weight calls on another, so a version can arrive mid-generate (it is staged, see the module doc).
RolloutWorker = ray.remote(max_restarts=0, max_task_retries=0,
                           concurrency_groups={"health": 1, "weights": 1})(Worker)
