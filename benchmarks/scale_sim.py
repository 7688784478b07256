"""SIMULATION stand-ins for benchmarks/scale.py, and for nothing else: a rollout engine that sleeps a
set time per token, a learner that trains in no time but holds and sends real weight tensors, and a
reward that scores 0. The pool, workers, loop and weight sync they plug into are the real ones.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

BUCKET_MB = 32  # broadcast bucket (the learner's default is 256): 64 receivers x 1 bucket must fit in RAM here


class SimulatedEngine:
    """SIMULATION, benchmark only: sleeps `per_token` s per generated token (the whole chunk's tokens,
    as one batched engine call), then returns ROLLOUT_SCHEMA rows of fixed tokens."""

    def __init__(self, model_dir: str, cfg, device, per_token: float = 0.001):
        self.per_token = per_token

    def generate(self, prompts, sampling, version: int, worker_id: str, between_steps=None):
        import pyarrow as pa

        from contract.experience import ROLLOUT_SCHEMA

        t0 = time.perf_counter()
        rows, n, tokens = prompts.num_rows, sampling.n, sampling.max_new_tokens
        time.sleep(self.per_token * rows * n * tokens)
        # Column by column (a few Arrow calls, not a dict per row): this stand-in's own CPU is kept small,
        # since on this box 64 of them share two cores with the driver that is being measured.
        each = pa.array([i for i in range(rows) for _ in range(n)], pa.int32())
        flat = [prompts.column(c).take(each) for c in ("prompt_id", "prompt", "prompt_ids")]
        total = rows * n
        cols = flat[:2] + [pa.array(list(range(n)) * rows, pa.int32())]
        cols = [cols[0], cols[2], cols[1], flat[2],
                pa.array(["sim"] * total), pa.array([[7] * tokens] * total, pa.list_(pa.int32())),
                pa.array([[-1.0] * tokens] * total, pa.list_(pa.float32())), pa.array(["length"] * total),
                pa.array([version] * total, pa.int64()), pa.array([worker_id] * total),
                pa.array([time.perf_counter() - t0] * total, pa.float64()), pa.nulls(total, pa.string())]
        return pa.RecordBatch.from_arrays(cols, schema=ROLLOUT_SCHEMA)

    def load_weights(self, named) -> None:
        for _ in named:  # a broadcast receives as this iterates; object-store views map without a copy
            pass


def _rank_cls():
    import ray

    @ray.remote(num_cpus=0)
    class SimulatedLearnerRank:
        """Learner rank 0 stand-in: `mb` MB of float32 weights in 10 tensors, sent the way
        `learner.rank.LearnerRank` sends them (contract.weights)."""

        def __init__(self, mb: int):
            import torch

            from contract.weights import make_manifest, specs_of

            self.sd = {f"layer{i}.weight": torch.randn(mb * (1 << 20) // 40) for i in range(10)}
            self.manifest = make_manifest(specs_of(self.sd.items()), bucket_bytes=BUCKET_MB << 20)
            self.group = None

        def get_manifest(self):
            return self.manifest

        def endpoint(self):
            from contract.net import free_port

            return ray.util.get_node_ip_address(), free_port("0.0.0.0")

        def join(self, addr):
            from contract.weights import join_group

            self.group = join_group(addr, 0)

        def leave(self):
            from contract.weights import leave_group

            if self.group is not None:
                leave_group(self.group)
                self.group = None

        def broadcast(self) -> None:
            from contract.weights import send_weights

            send_weights(self.group, self.manifest, self.sd)

        def put(self) -> list:
            from contract.weights import PackedStateDict

            return [ray.put(PackedStateDict.pack(self.sd))]

    return SimulatedLearnerRank


class SimulatedLearner:
    """SIMULATION: `learner.group.LearnerGroup`'s calls the loop and `WeightSync` make; a train step
    takes no time and bumps the version."""

    def __init__(self, mb: int):
        import ray

        self._ray, self.mb, self.version = ray, mb, 0
        self.rank = _rank_cls().remote(mb)
        self._manifest = ray.get(self.rank.get_manifest.remote(), timeout=300)

    def train_step(self, experience) -> dict:
        self.version += 1
        return {"num_samples": experience.num_rows}

    def weight_manifest(self):
        return self._manifest

    def weight_group_endpoint(self):
        return self._ray.get(self.rank.endpoint.remote(), timeout=60)

    def join_weight_group(self, addr):
        return self.rank.join.remote(addr)

    def broadcast_weights(self):
        return self.rank.broadcast.remote()

    def leave_weight_group(self) -> None:
        self._ray.get(self.rank.leave.remote(), timeout=60)

    def publish_object_store(self):
        return self.version, self._ray.get(self.rank.put.remote(), timeout=300)[0]

    def save_checkpoint(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "version.json").write_text(json.dumps({"version": self.version}))


class ConstantReward:
    """SIMULATION: the reward client's `score`; every sample scores 0, valid."""

    def score(self, prompts, responses, messages=None):
        import numpy as np

        from reward_service.client import to_table

        n = len(prompts)
        return to_table([{"reward": np.zeros(n), "valid": np.ones(n, bool), "parts": {}, "errors": [],
                          "rm_version": np.zeros(n, np.int64)}])
