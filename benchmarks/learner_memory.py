"""Issue 15's learner knobs, each against the default update in the same run, on a ragged batch:
token-budget vs fixed-count micro-batches (step time), activation checkpointing vs none (peak
memory), LoRA vs full fine-tuning (bytes per weight sync, step time, peak memory).

    python -m benchmarks.learner_memory [--reps 3] [--size tiny|100m] [--micro 4] [--out benchmarks/RESULTS_memory.md]
    python -m benchmarks.learner_memory --sync-only   # the bytes-per-sync table alone, printed

The update is learner/update.py run by learner/local.py's LocalLearner in this process (torch
AdamW): the same function, modules (learner/models.py) and micro-batch plans (learner/micro.py) a
DeepSpeed rank runs (tests/test_learner_local.py and test_learner_memory_group.py check that ranks
and LocalLearner end a step with the same weights), without Ray or rank start-up, so the whole run
takes a few minutes on 2 cores. Model: a random Llama (hidden 128, 6 layers, vocab 4096, tied
embeddings) built here; batch: 16 samples x (16 prompt + U[4, 112] response) tokens, GRPO with a
KL reference, one minibatch of 16, micro-batch 4 or a budget of 4 x 128 tokens (the padded
micro-batch's own size: the same memory bound). Each knob's learner and a default one
are alive together and step alternately (median of --reps after a warm-up each), so load from
other processes hits both alike. Writes --out (replacing it) with the command that produced it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from contract.devices import DeviceProfile  # noqa: E402
from contract.experience import EXPERIENCE_SCHEMA  # noqa: E402
from contract.weights import PackedStateDict  # noqa: E402
from learner import models  # noqa: E402
from learner.config import LearnerConfig  # noqa: E402
from learner.local import LocalLearner  # noqa: E402

# --size: the model and the response-length range. tiny: seconds per step here; 100m: issue 15's size
# (a Qwen2.5-0.5B-like shape scaled to ~110M parameters, 16..64 new tokens), tens of seconds per step on 2 cores.
SIZES = {
    "tiny": (dict(hidden_size=128, intermediate_size=344, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=4096, max_position_embeddings=512, tie_word_embeddings=True),
             4, 112),
    "100m": (dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=12, vocab_size=32000, max_position_embeddings=512, tie_word_embeddings=True),
             16, 64),
}
ARCH, MIN_NEW, MAX_NEW = SIZES["tiny"]
BATCH, PROMPT_LEN, MICRO = 16, 16, 4
BUDGET = MICRO * (PROMPT_LEN + MAX_NEW)


def use_size(name: str, micro: int = MICRO) -> None:
    """Set the module's model shape, response lengths and micro-batch (what every function here reads)."""
    global ARCH, MIN_NEW, MAX_NEW, MICRO, BUDGET
    ARCH, MIN_NEW, MAX_NEW = SIZES[name]
    MICRO = micro
    BUDGET = MICRO * (PROMPT_LEN + MAX_NEW)
LORA = {"r": 16, "alpha": 32.0}
CPU = DeviceProfile("cpu")


def build_model(out: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**ARCH)).save_pretrained(out, safe_serialization=True)
    return out


def ragged_experience(version: int, seed: int) -> pa.Table:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(BATCH):
        n = int(torch.randint(MIN_NEW, MAX_NEW + 1, (1,), generator=g))
        rows.append(dict(prompt_id=f"p{i // 4}", sample_idx=i % 4, prompt="", response="", finish_reason="length",
                         prompt_ids=torch.randint(4, ARCH["vocab_size"], (PROMPT_LEN,), generator=g).tolist(),
                         response_ids=torch.randint(4, ARCH["vocab_size"], (n,), generator=g).tolist(),
                         logprobs=[-9.0] * n, policy_version=version, worker_id="w", gen_s=0.0,
                         reward=float(i % 3), reward_valid=True, reward_parts={}))
    return pa.Table.from_pylist(rows, schema=EXPERIENCE_SCHEMA)


def config(**kw) -> LearnerConfig:
    cfg = LearnerConfig(lr=1e-5, **kw)
    cfg.rl.algorithm, cfg.rl.kl_coef, cfg.rl.minibatch_size, cfg.rl.micro_batch_size = "grpo", 0.05, BATCH, MICRO
    return cfg


def resident_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def step(local: LocalLearner, seed: int) -> tuple[float, float, float]:
    """(seconds, peak_mem_mb, MiB the step added over the resident set at its start)."""
    table = ragged_experience(local.version, seed)
    CPU.reset_peak_memory()
    start = resident_mb()
    t0 = time.perf_counter()
    m = local.train_step(table)
    return time.perf_counter() - t0, m["peak_mem_mb"], m["peak_mem_mb"] - start


def paired(model_dir: str, knob: dict, reps: int) -> dict:
    """The default learner and one with `knob`, stepping alternately on the same batches."""
    learners = {"default": LocalLearner(config(), model_dir), "knob": LocalLearner(config(**knob), model_dir)}
    out = {k: {"s": [], "peak": [], "added": []} for k in learners}
    for rep in range(reps + 1):
        for k, local in learners.items():
            s, peak, added = step(local, seed=rep)
            print(f"{knob} {k} rep {rep}: {s:.2f} s, peak {peak:.0f} MiB, added {added:.0f} MiB", flush=True)
            if rep:  # the first is the warm-up (optimizer state allocated)
                for name, v in (("s", s), ("peak", peak), ("added", added)):
                    out[k][name].append(v)
    res = {k: {name: statistics.median(v) for name, v in d.items()} for k, d in out.items()}
    a, b = learners["default"].state_dict(), learners["knob"].state_dict()
    res["max_weight_diff"] = max((a[n] - b[n]).abs().max().item() for n in a)
    res["learners"] = learners
    return res


def sync_bytes(local: LocalLearner, sync: str | None = None) -> tuple[int, float]:
    """(bytes of what a publish sends, seconds to build and pack it): `models.sync_state_dict` as a
    rank publishes it (full weights; LoRA: the adapter alone, or with `sync` "merged" the merged
    weights), packed by `PackedStateDict.pack`."""
    cfg = local.cfg
    if sync is not None:
        cfg = cfg.model_copy(update={"lora": cfg.lora.model_copy(update={"sync": sync})})
    named = {n: p.detach() for n, p in local.actor.named_parameters()}
    t0 = time.perf_counter()
    packed = PackedStateDict.pack(models.sync_state_dict(local.actor, named, cfg))
    return packed.total_bytes, time.perf_counter() - t0


def sync_rows(full: LocalLearner, adapted: LocalLearner) -> list[str]:
    """The bytes-per-sync table: full fine-tuning, LoRA merged, LoRA adapter (each measured)."""
    (full_b, full_s), (merged_b, merged_s) = sync_bytes(full), sync_bytes(adapted, "merged")
    adapter_b, adapter_s = sync_bytes(adapted, "adapter")
    return [
        "| training | bytes per sync | vs full | build + pack time |",
        "|---|---|---|---|",
        f"| full fine-tuning | {full_b / 1e6:.2f} MB | 1.00x | {full_s:.3f} s |",
        f"| LoRA, `learner.lora.sync: merged`: W + (alpha/r) BA under the base names | {merged_b / 1e6:.2f} MB | "
        f"{merged_b / full_b:.3f}x | {merged_s:.3f} s |",
        f"| LoRA, `learner.lora.sync: adapter` (default): the adapter alone, served by vLLM's runtime LoRA | "
        f"{adapter_b / 1e6:.2f} MB | {adapter_b / full_b:.3f}x | {adapter_s:.3f} s |",
    ]


def sync_only() -> None:
    """`--sync-only`: print the bytes-per-sync table alone (no step timings, so seconds on any load)."""
    model_dir = str(build_model(Path(tempfile.mkdtemp(prefix="bench-memory-")) / "policy"))
    full, adapted = LocalLearner(config(), model_dir), LocalLearner(config(lora=LORA), model_dir)
    adapted.train_step(ragged_experience(0, 0))  # a trained (non-zero) adapter; the bytes do not depend on it
    print("\n".join(sync_rows(full, adapted)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model shape and response lengths")
    ap.add_argument("--micro", type=int, default=MICRO, help="samples per padded micro-batch (the token budget is "
                                                             "this many rows of the longest length)")
    ap.add_argument("--out", default=None, help="default: benchmarks/RESULTS_memory.md (tiny), "
                                                "RESULTS_memory_100m.md (100m)")
    ap.add_argument("--sync-only", action="store_true", help="print only the bytes-per-sync table; writes nothing")
    args = ap.parse_args()
    use_size(args.size, args.micro)
    args.out = args.out or str(Path(__file__).with_name("RESULTS_memory.md" if args.size == "tiny"
                                                         else f"RESULTS_memory_{args.size}.md"))
    if args.sync_only:
        return sync_only()
    torch.set_num_threads(2)
    model_dir = str(build_model(Path(tempfile.mkdtemp(prefix="bench-memory-")) / "policy"))
    load0, t0 = os.getloadavg()[0], time.time()
    budget = paired(model_dir, {"max_tokens_per_micro_batch": BUDGET}, args.reps)
    ckpt = paired(model_dir, {"gradient_checkpointing": True}, args.reps)
    lo = paired(model_dir, {"lora": LORA}, args.reps)
    n_params = sum(p.numel() for p in lo["learners"]["default"].actor.parameters())
    n_train = len(models.trainable(lo["learners"]["knob"].actor))
    lines = report(args, budget, ckpt, lo, sync_rows(lo["learners"]["default"], lo["learners"]["knob"]), n_params,
                   n_train, load0, os.getloadavg()[0], time.time() - t0)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def report(args, budget, ckpt, lo, sync: list[str], n_params, n_train, load0, load1, wall) -> list[str]:

    def row(name: str, r: dict, setting: str) -> str:
        d, k = r["default"], r["knob"]
        return (f"| {name} | {setting} | {d['s']:.2f} s | {k['s']:.2f} s | {k['s'] / d['s']:.2f}x | "
                f"{d['peak']:.0f} / {d['added']:.0f} | {k['peak']:.0f} / {k['added']:.0f} | "
                f"{k['added'] / d['added']:.2f}x | {r['max_weight_diff']:.1e} |")

    cmd = "python -m benchmarks.learner_memory" + "".join(f" {a}" for a in sys.argv[1:])
    return [
        "# Learner memory knobs (issue 15): each against the default update in the same run",
        "",
        f"Command: `{cmd}` ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {wall:.0f} s). "
        f"LocalLearner (learner/update.py, the update a DeepSpeed rank runs) in one process, 2 torch threads, "
        f"fp32; a random Llama of {n_params / 1e6:.1f}M parameters ({ARCH['num_hidden_layers']} layers, hidden "
        f"{ARCH['hidden_size']}, vocab {ARCH['vocab_size']}); {BATCH} samples x ({PROMPT_LEN} prompt + U[{MIN_NEW}, "
        f"{MAX_NEW}] response) tokens, GRPO + KL reference, one minibatch of {BATCH}, micro-batch {MICRO}. Each "
        f"row: the knob's learner and a default one alive together, stepping alternately on the same batches, "
        f"median of {args.reps} steps after a warm-up. Load average {load0:.1f} at the start, {load1:.1f} at the "
        "end, on 2 shared cores: absolute times are noisy, the ratios are the result.",
        "",
        "| knob | setting | default step | knob step | time ratio | default peak / added MiB | knob peak / added "
        "MiB | added-memory ratio | max weight diff after |",
        "|---|---|---|---|---|---|---|---|---|",
        row("token budget", budget, f"{BUDGET} tokens (= {MICRO} x {PROMPT_LEN + MAX_NEW}) vs {MICRO} padded rows"),
        row("activation checkpointing", ckpt, "on vs off"),
        row("LoRA", lo, f"r={LORA['r']} alpha={LORA['alpha']:g} all-linear ({n_train} adapter tensors) vs full"),
        "",
        "Peak: the step's `peak_mem_mb` (this process's resident high-water mark, holding both learners); "
        "added: that peak minus the resident set right before the step (activations, gradients, temporaries: "
        "what the knobs act on). Max weight diff: the two learners' published weights after the last step "
        "(token budget and checkpointing take the same update, so float noise only; LoRA trains other weights).",
        "",
        "Weight sync per publish (what a rank sends each worker, `learner.models.sync_state_dict`, packed by "
        "`contract.weights.PackedStateDict.pack`; a job logs it per step as `sync_bytes`):",
        "",
        *sync,
    ]


if __name__ == "__main__":
    main()
