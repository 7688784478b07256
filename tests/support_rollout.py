"""Shared test helpers (not a test module): rollout configs, prompt tables, published weights and a weight sender."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import ray
import torch

from actors.config import EngineConfig, RolloutConfig, SamplingConfig
from contract.weights import PackedStateDict, join_group, leave_group, make_manifest, send_weights, specs_of


GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12, n=1)


def rollout_cfg(**kw) -> RolloutConfig:
    base = dict(num_workers=1, threads_per_worker=1, request_timeout_s=120.0,
                engine=EngineConfig(max_model_len=128, kv_cache_bytes=16 << 20),
                sampling=SamplingConfig(max_new_tokens=8, n=2, seed=0))
    return RolloutConfig(**(base | kw))


def prompts(n: int, prefix: str = "p", words: int = 4) -> pa.Table:
    vocab = ["red", "blue", "green", "the", "cat", "sat", "on", "mat", "yellow", "dog"]
    texts = [" ".join(vocab[(i * 7 + j * 3) % len(vocab)] for j in range(words + i % 5)) for i in range(n)]
    return pa.table({"prompt_id": [f"{prefix}{i}" for i in range(n)], "prompt": texts})


def keys(table) -> list[tuple[str, int]]:
    return list(zip(table["prompt_id"].to_pylist(), table["sample_idx"].to_pylist()))


def hf_state(model_dir, perturb_seed: int | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's HF-named float32 tensors, optionally with seeded noise added."""
    from transformers import AutoModelForCausalLM

    sd = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    if perturb_seed is not None:
        g = torch.Generator().manual_seed(perturb_seed)
        sd = {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in sd.items()}
    return {k: v.contiguous() for k, v in sd.items()}


def put_state(model_dir, perturb_seed: int | None = None) -> ray.ObjectRef:
    """What the learner publishes on the object-store transport, for these weights."""
    return ray.put(PackedStateDict.pack(hf_state(model_dir, perturb_seed)))


@ray.remote(num_cpus=0)
class WeightSender:
    """Stands in for learner rank 0: holds transformers weights, joins the side group as rank 0."""

    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.group = None

    def manifest(self, perturb_seed):
        return make_manifest(specs_of(hf_state(self.model_dir, perturb_seed).items()), bucket_bytes=64 << 10)

    def send(self, addr, manifest, perturb_seed):
        self.group = join_group(addr, 0)
        send_weights(self.group, manifest, hf_state(self.model_dir, perturb_seed))
        return True

    def leave(self):
        leave_group(self.group)
        self.group = None


def start_sender(model_dir):
    # The actor's process imports this module from tests/, which is not an installed package.
    env = {"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}}
    return WeightSender.options(runtime_env=env).remote(str(model_dir))
