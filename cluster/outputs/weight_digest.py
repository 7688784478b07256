"""Digests of a saved model's tensors, and what a replay needs to match them: what a checkpoint
records (RUN/weights.jsonl) and `rlhf replay` compares bit for bit.

One SHA-256 per tensor, over its dtype, shape and raw bytes as the safetensors export holds them
(read back tensor by tensor: a large model is never all in memory), and one over those for the
whole model. Two exports have equal digests exactly when every tensor is bit-identical.
"""
from __future__ import annotations

import hashlib
from pathlib import Path


def tensor_digests(model_dir: str | Path) -> dict[str, str]:
    """name -> sha256 hex of every tensor in MODEL_DIR's *.safetensors files (the top level only: a
    LoRA export's adapter/ subdirectory is not the model)."""
    import torch
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors export to digest")
    out: dict[str, str] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                t = st.get_tensor(name).contiguous()
                h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
                out[name] = h.hexdigest()
    return dict(sorted(out.items()))


def model_digest(tensors: dict[str, str]) -> str:
    """One sha256 over the per-tensor digests, in name order."""
    return hashlib.sha256("".join(f"{n}={d}\n" for n, d in sorted(tensors.items())).encode()).hexdigest()


def first_difference(want: dict[str, str], got: dict[str, str]) -> str | None:
    """The first tensor name (in name order) whose digest differs or that only one side has; None if equal."""
    for name in sorted(set(want) | set(got)):
        if want.get(name) != got.get(name):
            return name
    return None


def replay_requirements(cfg, device_kind: str) -> dict:
    """What must be the same for a replay to reproduce a run's weights bit for bit, as recorded with
    each checkpoint's digests: the learner's device, ranks, ZeRO stage, dtype and threads (the CPU
    kernels' summation order follows the thread count), and the torch and DeepSpeed builds."""
    from importlib.metadata import version

    lc = cfg.learner
    return {"device": device_kind, "learner.num_ranks": lc.num_ranks, "learner.zero_stage": lc.zero_stage,
            "learner.dtype": lc.dtype, "learner.cpus_per_rank": lc.cpus_per_rank,
            "torch": version("torch"), "deepspeed": version("deepspeed")}
