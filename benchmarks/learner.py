"""Learner benchmarks: (1) one PPO step of the DeepSpeed LearnerGroup vs the same update in one
process with plain torch (learner/local.py's LocalLearner: learner/update.py with torch AdamW), same batch; (2) weight
publish by each transport vs a raw torch.distributed broadcast of the same bytes.

    python -m benchmarks.learner [--sizes tiny,m100] [--publish m100,m500] [--reps 3]

(as a module: run as a script, this file would shadow the `learner` package).

Writes benchmarks/RESULTS_learner.md. Medians over --reps after one warm-up. Targets (issue 6):
group step <= 1.2x plain step; publish bandwidth >= 0.5x raw broadcast.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pyarrow as pa  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from contract.devices import DeviceProfile  # noqa: E402
from contract.experience import EXPERIENCE_SCHEMA  # noqa: E402
from contract.weights import GroupAddress  # noqa: E402
from contract.net import free_port  # noqa: E402
from learner.config import LearnerConfig  # noqa: E402
from learner.group import LearnerGroup  # noqa: E402
from learner.local import LocalLearner  # noqa: E402

CPU = DeviceProfile("cpu")
WORK = Path(os.environ.get("BENCH_DIR", "/tmp/bench-learner"))
BATCH, PROMPT_LEN, RESPONSE_LEN = 16, 16, 48


def experience(version: int, vocab: int) -> pa.Table:
    g = torch.Generator().manual_seed(0)
    rows = [dict(prompt_id=f"p{i // 4}", sample_idx=i % 4, prompt="", response="", finish_reason="length",
                 prompt_ids=torch.randint(4, vocab, (PROMPT_LEN,), generator=g).tolist(),
                 response_ids=torch.randint(4, vocab, (RESPONSE_LEN,), generator=g).tolist(),
                 logprobs=[-5.0] * RESPONSE_LEN, policy_version=version, worker_id="w", gen_s=0.0,
                 reward=float(i % 3), reward_valid=True, reward_parts={}) for i in range(BATCH)]
    return pa.Table.from_pylist(rows, schema=EXPERIENCE_SCHEMA)


def step_config(ranks: int, stage: int) -> LearnerConfig:
    cfg = LearnerConfig(num_ranks=ranks, zero_stage=stage, cpus_per_rank=2 // ranks, lr=1e-5, critic_lr=1e-5)
    cfg.rl.minibatch_size, cfg.rl.micro_batch_size = BATCH, 8
    return cfg


def median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- (1) PPO step ---------------------------------------------------------------------------


def bench_step(size: str, reps: int) -> list[str]:
    from transformers import AutoConfig

    from cluster.demo.tiny_models import make_tiny_models

    policy_dir = make_tiny_models(WORK / size, size=size)["policy"]
    vocab = AutoConfig.from_pretrained(policy_dir).vocab_size
    torch.set_num_threads(2)
    local = LocalLearner(step_config(1, 0), str(policy_dir))  # the update in this process (learner/local.py)
    plain = median_time(lambda: local.train_step(experience(local.version, vocab)), reps)
    rows = [f"| {size} | LocalLearner (plain torch), 1 process, 2 threads | {plain:.3f} s | 1.00x |"]
    for ranks, stage in [(1, 0), (2, 2)]:
        group = LearnerGroup(step_config(ranks, stage), str(policy_dir), CPU, namespace=f"bench-{uuid.uuid4().hex[:6]}")
        try:
            t = median_time(lambda: group.train_step(experience(group.version, vocab)), reps)
        finally:
            group.shutdown()
        rows.append(f"| {size} | LearnerGroup {ranks} rank(s) ZeRO-{stage}, {2 // ranks} thread(s) each | "
                    f"{t:.3f} s | {t / plain:.2f}x |")
    return rows


# ---- (2) weight publish ---------------------------------------------------------------------


@ray.remote(num_cpus=1)
class Peer:
    """One end of a side group: the receiver of every transport, or the raw-broadcast sender."""

    def join(self, addr: GroupAddress, rank: int) -> None:
        from contract.weights import join_group

        self.group = join_group(addr, rank)

    def leave(self) -> None:
        from contract.weights import leave_group

        leave_group(self.group)

    def receive(self, manifest) -> int:
        from contract.weights import receive_weights

        return sum(t.numel() * t.element_size() for _, t in receive_weights(self.group, manifest))

    def fetch(self, wrapped: list) -> int:
        return sum(t.numel() * t.element_size() for _, t in ray.get(wrapped[0], timeout=600).tensors())

    def raw(self, numel: int, rank: int) -> int:
        """Raw baseline: one flat fp32 buffer, allocated before the clock starts on the caller's side."""
        import torch.distributed as dist

        flat = torch.ones(numel) if rank == 0 else torch.empty(numel)
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        t0 = time.perf_counter()
        self.group.pg.broadcast([flat], opts).wait()
        return time.perf_counter() - t0


def m500_dir() -> Path:
    """~494M parameters, Llama (hidden 1536, 14 layers, head_dim 128, vocab 32000, untied)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = WORK / "m500"
    if not (out / "config.json").is_file():
        cfg = LlamaConfig(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=14,
                          num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False)
        LlamaForCausalLM(cfg).save_pretrained(out.with_suffix(".tmp"), safe_serialization=True)
        out.with_suffix(".tmp").rename(out)
    return out


def bench_publish(size: str, reps: int) -> list[str]:
    from cluster.demo.tiny_models import make_tiny_models

    policy_dir = m500_dir() if size == "m500" else make_tiny_models(WORK / size, size=size)["policy"]
    cfg = LearnerConfig(num_ranks=1, zero_stage=0, cpus_per_rank=1)
    cfg.rl.algorithm, cfg.rl.kl_coef = "grpo", 0.0  # policy only: the transport is what is measured
    group = LearnerGroup(cfg, str(policy_dir), CPU, namespace=f"bench-{uuid.uuid4().hex[:6]}")
    sink, sender = Peer.remote(), Peer.remote()
    try:
        manifest = group.weight_manifest()
        nbytes, numel = manifest.total_bytes, sum(s.numel for s in manifest.specs)
        # raw: a flat fp32 broadcast of the same bytes between two plain peers
        addr = GroupAddress("127.0.0.1", free_port(), 2, f"raw-{uuid.uuid4().hex}")
        ray.get([sender.join.remote(addr, 0), sink.join.remote(addr, 1)], timeout=120)
        raw = statistics.median(ray.get([sender.raw.remote(numel, 0), sink.raw.remote(numel, 1)], timeout=600)[0]
                                for _ in range(reps + 1))
        ray.get([sender.leave.remote(), sink.leave.remote()], timeout=60)
        addr = GroupAddress("127.0.0.1", free_port(), 2, f"pub-{uuid.uuid4().hex}")
        ray.get([group.join_weight_group(addr), sink.join.remote(addr, 1)], timeout=120)
        bcast = median_time(lambda: ray.get([group.broadcast_weights(), sink.receive.remote(manifest)], timeout=600), reps)
        group.leave_weight_group()
        store = median_time(lambda: ray.get(sink.fetch.remote([group.publish_object_store()[1]]), timeout=600), reps)
    finally:
        group.shutdown()
        ray.kill(sink)
        ray.kill(sender)
    gb = nbytes / 1e9
    return [f"| {size} ({numel / 1e6:.0f}M, {gb:.2f} GB fp32) | raw flat gloo broadcast | {raw:.2f} s | "
            f"{gb / raw:.2f} GB/s | 1.00x |",
            f"| | LearnerGroup broadcast (bucketed, incl. ray calls) | {bcast:.2f} s | {gb / bcast:.2f} GB/s | "
            f"{raw / bcast:.2f}x |",
            f"| | LearnerGroup object store (ray.put + worker ray.get, zero-copy) | {store:.2f} s | "
            f"{gb / store:.2f} GB/s | {raw / store:.2f}x |"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,m100")
    ap.add_argument("--publish", default="m100,m500")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS_learner.md")))
    args = ap.parse_args()
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        lines = ["# Learner benchmarks", "", f"Box: {os.cpu_count()} cores, CPU only, gloo. Median of {args.reps} after a "
                 f"warm-up. PPO step: {BATCH} samples x ({PROMPT_LEN} prompt + {RESPONSE_LEN} response) tokens, "
                 "policy + critic + reference (kl_coef 0.05), 1 epoch, minibatch 16, micro-batch 8, fp32.", "",
                 "## PPO step (target: group <= 1.2x plain)", "", "| model | implementation | step | vs plain |",
                 "|---|---|---|---|"]
        for size in filter(None, args.sizes.split(",")):
            lines += bench_step(size, args.reps)
        lines += ["", "## Weight publish, learner rank 0 -> 1 receiver (target: >= 0.5x raw bandwidth)", "",
                  "| model | transport | time | bandwidth | vs raw |", "|---|---|---|---|---|"]
        for size in filter(None, args.publish.split(",")):
            lines += bench_publish(size, args.reps)
    finally:
        ray.shutdown()
    out = Path(args.out)
    out.with_suffix(".tmp").write_text("\n".join(lines) + "\n")
    out.with_suffix(".tmp").rename(out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
