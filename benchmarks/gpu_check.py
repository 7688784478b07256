"""One prepared check of the learner's update on a lent GPU: one process, no Ray, no vLLM.

A random Qwen2.5-0.5B-shaped policy (Qwen2Config: hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocab 151936, tied embeddings), one GRPO update with a KL reference in bf16 on a
ragged batch, run by the learner's own code: `learner.rank.LearnerRank` in this process (DeepSpeed
ZeRO-0 and ZeRO-2, world size 1) when deepspeed imports, else learner/local.py's LocalLearner (the
same learner/update.py, torch AdamW, bf16 autocast; the report says which). Each with and
without activation checkpointing and token-budget micro-batches, against a plain torch step (HF
forward, log-softmax, masked policy-gradient loss, AdamW) on the same batch: tokens/s and peak
memory. Then the weight-packing bandwidth of `contract.weights.PackedStateDict.pack`.

    python -m benchmarks.gpu_check [--tiny] [--steps 3] [--out FILE]

--tiny: a small Qwen2 and batch, on CPU unless a GPU is there (what tests/test_benchmarks_gpu_check.py
runs). On the lent H200 (python3 3.12 with torch, transformers, pyarrow, peft; no pydantic, no
deepspeed), carry those as wheels, from the repo root here:

    echo /.whl/ >> .git/info/exclude
    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \\
        pydantic pydantic-core annotated-types typing-inspection hjson
    DS_BUILD_OPS=0 pip wheel --no-deps -w .whl deepspeed==0.19.8   # pure Python, a few MB

and run (carry [".whl"], timeout_s 600):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 && python3 -m benchmarks.gpu_check --out $OUT/gpu_check.md
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from contract.devices import DeviceProfile, resolve_device  # noqa: E402
from contract.experience import EXPERIENCE_SCHEMA  # noqa: E402
from contract.weights import PackedStateDict  # noqa: E402
from learner import algorithm as alg  # noqa: E402
from learner.batch import Batch, prepare  # noqa: E402
from learner.config import LearnerConfig  # noqa: E402

QWEN05 = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
              intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=256)
# samples, prompt tokens, response tokens U[lo, hi], micro-batch size
SHAPES = {"full": (64, 128, (64, 512), 8), "tiny": (8, 4, (2, 12), 2)}


def build_model(arch: dict, out: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**arch)).save_pretrained(out, safe_serialization=True)
    return out


def experience(shape, vocab: int, seed: int = 0) -> pa.Table:
    n, prompt, (lo, hi), _ = shape
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        rows.append(dict(prompt_id=f"p{i // 4}", sample_idx=i % 4, prompt="", response="", finish_reason="length",
                         prompt_ids=torch.randint(4, vocab, (prompt,), generator=g).tolist(),
                         response_ids=torch.randint(4, vocab, (k,), generator=g).tolist(), logprobs=[-8.0] * k,
                         policy_version=0, worker_id="w", gen_s=0.0, reward=float(i % 3), reward_valid=True,
                         reward_parts={}))
    return pa.Table.from_pylist(rows, schema=EXPERIENCE_SCHEMA)


def learner_config(shape, budget: bool, ckpt: bool, stage: int) -> LearnerConfig:
    n, prompt, (_, hi), mb = shape
    cfg = LearnerConfig(num_ranks=1, zero_stage=stage, dtype="bfloat16", lr=1e-6, gradient_checkpointing=ckpt,
                        max_tokens_per_micro_batch=mb * (prompt + hi) if budget else None)
    cfg.rl.algorithm, cfg.rl.kl_coef, cfg.rl.minibatch_size, cfg.rl.micro_batch_size = "grpo", 0.05, n, mb
    return cfg


def timed(fn, steps: int, device: DeviceProfile) -> tuple[float, float]:
    """(median seconds of `steps` calls after a warm-up, peak MiB over them)."""
    fn()
    sync(device)
    device.reset_peak_memory()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), device.peak_memory_mb()


def sync(device: DeviceProfile) -> None:
    if device.kind == "cuda":
        torch.cuda.synchronize()


def free(device: DeviceProfile) -> None:
    import gc

    gc.collect()
    if device.kind == "cuda":
        torch.cuda.empty_cache()


# ---- the three ways to run a step ----------------------------------------------------------------


def plain_step(model, opt, b: Batch, mb: int, dev: str) -> None:
    """A minimal policy-gradient step in plain torch: no learner code, full logits, bf16 autocast."""
    adv = (b.score - b.score.mean()).to(dev)
    for s in range(0, len(b), mb):
        ids, att, resp = (b.input_ids[s:s + mb].to(dev), b.attention_mask[s:s + mb].to(dev),
                          b.response_ids[s:s + mb].to(dev))
        with torch.autocast(device_type=dev.split(":")[0], dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=att).logits
        idx = alg.response_hidden_index(b.rows(slice(s, s + mb))).to(dev)
        at = logits[torch.arange(len(idx), device=dev).unsqueeze(1), idx]  # [b, T, V]: each response position
        tok = torch.log_softmax(at.float(), -1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)
        mask = b.mask[s:s + mb].to(dev)
        loss = -((tok * mask).sum(1) / mask.sum(1).clamp(min=1) * adv[s:s + mb]).sum() / len(b)
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def autocast_step(local, b: Batch, dev: str) -> None:
    """LocalLearner's update with bf16 autocast forwards (fp32 master weights, torch AdamW)."""
    with torch.autocast(device_type=dev.split(":")[0], dtype=torch.bfloat16):
        local.train_batch(b, int(b.real.sum()))


def learner_rank(cfg: LearnerConfig, model_dir: Path, device: DeviceProfile):
    """`LearnerRank` (DeepSpeed) set up in this process, world size 1."""
    from contract.net import free_port
    from learner.algorithm import make_plan
    from learner.rank import LearnerRank

    rank = LearnerRank(0, cfg.model_dump_json(), str(model_dir), None, device.kind, seed=0, plan=make_plan(cfg.rl))
    rank.setup("127.0.0.1", free_port())
    return rank


# ---- the check ---------------------------------------------------------------------------------------


def run(args) -> list[str]:
    from transformers import AutoModelForCausalLM

    from learner import models

    device = resolve_device("auto")
    dev = device.torch_device()
    shape = SHAPES["tiny" if args.tiny else "full"]
    arch = TINY if args.tiny else QWEN05
    try:
        if args.torch_only:
            raise ImportError("--torch-only")
        importlib.import_module("deepspeed")

        optimizer = "DeepSpeed (learner.rank.LearnerRank, AdamW)"
        stages = [0, 2]
    except ImportError as e:
        optimizer = f"deepspeed not used ({e}): learner/local.py's LocalLearner, torch AdamW, bf16 autocast"
        stages = [None]
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    model_dir = build_model(arch, work / "model")
    b = prepare(experience(shape, arch["vocab_size"]), 0, 0, shape[0]).batch
    tokens = int(b.attention_mask[b.real > 0].sum())
    lines = [f"# gpu_check ({'tiny' if args.tiny else 'Qwen2.5-0.5B-shaped'}, {device.kind}"
             f"{', ' + torch.cuda.get_device_name() if device.kind == 'cuda' else ''}, torch {torch.__version__})", "",
             f"{shape[0]} samples x ({shape[1]} prompt + U{list(shape[2])} response) tokens = {tokens} real tokens "
             f"(padded to {b.input_ids.shape[1]}: {b.input_ids.numel()}), GRPO + KL reference, bf16, micro-batch "
             f"{shape[3]} or a budget of {shape[3] * (shape[1] + shape[2][1])} tokens; median of {args.steps} steps "
             f"after a warm-up. Optimizer: {optimizer}.", "",
             "| step | checkpointing | micro-batches | step s | tokens/s | peak MiB |", "|---|---|---|---|---|---|"]

    def row(name, ck, budget, t, peak):
        lines.append(f"| {name} | {'on' if ck else 'off'} | {'token budget' if budget else 'fixed count'} | {t:.3f} | "
                     f"{tokens / t:,.0f} | {peak:,.0f} |")
        print(lines[-1], flush=True)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    row("plain torch", False, False, *timed(lambda: plain_step(model, opt, b, shape[3], dev), args.steps, device))
    model = opt = None
    free(device)
    # One set-up per optimizer path (model load, DeepSpeed init); the knobs are switched in place:
    # checkpointing on after the runs without it, the token budget read from the config each step.
    for stage in stages:
        cfg = learner_config(shape, False, False, stage or 0)
        if stage is None:  # learner/local.py: the same update (learner/update.py), torch AdamW, bf16 autocast
            from learner.local import LocalLearner

            local = LocalLearner(cfg.model_copy(update={"dtype": "float32"}), str(model_dir), device=dev)
            cfg, module, name = local.cfg, local.actor, "LocalLearner (learner/update.py), torch AdamW"
            step = lambda: autocast_step(local, b, dev)  # noqa: E731
        else:
            rank = learner_rank(cfg, model_dir, device)
            cfg, module, name = rank.cfg, rank.actor.module, f"LearnerRank ZeRO-{stage}"
            step = lambda: rank.train_step(b, int(b.real.sum()), 0)  # noqa: E731
        for ck in (False, True):
            if ck:
                models.enable_checkpointing(module)
            for budget in (False, True):
                cfg.max_tokens_per_micro_batch = learner_config(shape, budget, ck, 0).max_tokens_per_micro_batch
                row(name, ck, budget, *timed(step, args.steps, device))
        del step, module, cfg
        local = rank = None
        free(device)
    lines += ["", pack_line(model_dir, dev, device)]
    print(lines[-1], flush=True)
    return lines


def pack_line(model_dir: Path, dev: str, device: DeviceProfile) -> str:
    """PackedStateDict.pack of the bf16 weights on `dev` (includes the device-to-host copy)."""
    from transformers import AutoModelForCausalLM

    sd = {n: p.detach() for n, p in
          AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(dev).named_parameters()}
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    t, _ = timed(lambda: PackedStateDict.pack(sd), 3, device)
    return (f"Weight packing (contract.weights.PackedStateDict.pack, bf16 on {device.kind}, to host byte arrays): "
            f"{nbytes / 1e9:.3f} GB in {t:.3f} s = {nbytes / 1e9 / t:.2f} GB/s.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="a small Qwen2 and batch (CPU-friendly; the test's)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--torch-only", action="store_true", help="the torch AdamW path even if deepspeed imports")
    ap.add_argument("--out", default=None, help="also write the report here (markdown)")
    args = ap.parse_args()
    torch.set_num_threads(min(os.cpu_count() or 1, 16))
    lines = run(args)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
