"""How much host memory a job on an embedded cluster needs at least, checked before anything starts.

`rlhf train job.yaml rollout.num_workers=40` on a 24 GiB box once passed every check and spent
minutes starting 40 vLLM engines that could never fit. The estimate is a floor, so a refusal is
certain: each role's process as measured here with a tiny model (what Python, torch, vLLM or
DeepSpeed cost before any weight), plus, where the device profile keeps them in host memory, its
weights, KV cache and optimizer state at the job's dtypes; plus Ray's own node processes.
Measured on the 2-core box (ps RSS, tiny models, 2026-12): a rollout worker 0.72 GiB, a learner
rank 0.6, a reward replica 0.2 (and its feedback store 0.2), the controller 0.6, the driver 0.5,
a Ray node with dashboard and Serve 2.5 (../shared/STACK.md).
"""
from __future__ import annotations

import json
from pathlib import Path

GiB = 1 << 30
BASE = {"rollout": 0.72 * GiB, "learner": 0.6 * GiB, "reward": 0.2 * GiB}
FIXED = (2.5 + 0.6 + 0.5 + 0.2) * GiB  # Ray node, controller, driver, the reward app's feedback store
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def parameters(model_dir: str) -> int:
    """Parameters of an HF directory, from its weight files' sizes and its stored dtype (a floor:
    tied weights are stored once)."""
    d = Path(model_dir)
    files = list(d.glob("*.safetensors")) or list(d.glob("*.bin"))
    try:
        hf = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        hf = {}
    stored = BYTES.get(str(hf.get("torch_dtype") or hf.get("dtype") or "float32"), 4)
    return sum(f.stat().st_size for f in files) // stored


def roles(cfg, plan, device) -> list[tuple[str, int, float]]:
    """(count key, count, bytes each at least) per role."""
    from actors.engine import kv_cache_bytes

    host = device.weights_in_host_memory
    policy = parameters(cfg.model.policy)
    engine = plan.rollout.engine  # as the workers get it (lora_rank from learner.lora)
    worker = BASE["rollout"] + (policy * BYTES.get(engine.dtype, 4) + kv_cache_bytes(cfg.model.policy, engine)
                                if host else 0)
    lc = cfg.learner
    b = BYTES.get(lc.dtype, 4)
    trained = 2 * b + 8 / (lc.num_ranks if lc.zero_stage >= 1 else 1)  # weights, gradients, AdamW's two fp32
    # moments (sharded from ZeRO-1 on), per trained parameter
    if lc.lora is not None:  # frozen base weights; the adapters and their optimizer are small
        per_param = b
    else:  # + the frozen reference
        per_param = trained + (b if lc.rl.kl_coef > 0 else 0)
    rank = BASE["learner"] + (policy * per_param if host else 0)
    if lc.rl.algorithm == "ppo" and host:  # the critic: weights, gradients and moments
        rank += parameters(lc.critic_model or cfg.model.policy) * trained
    replica = BASE["reward"] + (parameters(cfg.reward.model_dir) * 4 if cfg.reward.model_dir and host else 0)
    return [("rollout.num_workers", plan.rollout.num_workers, worker), ("learner.num_ranks", lc.num_ranks, rank),
            ("reward.num_replicas", plan.reward_replicas, replica)]


def check_memory(cfg, plan, device, available: float) -> list[str]:
    """One line if the job cannot fit in `available` bytes of host memory, naming the biggest role."""
    parts = roles(cfg, plan, device)
    need = FIXED + sum(n * each for _, n, each in parts)
    if need <= available:
        return []
    key, n, _ = max(parts, key=lambda p: p[1] * p[2])
    shown = ", ".join(f"{k.split('.')[0]} {c} x {each / GiB:.2f}" for k, c, each in parts)
    return [f"{key}={n}: the job needs at least {need / GiB:.1f} GiB of memory ({shown}, Ray and the driver "
            f"{FIXED / GiB:.1f}) but this machine has {available / GiB:.1f} GiB available; ask for less, or attach "
            f"to a bigger cluster (--address)"]
