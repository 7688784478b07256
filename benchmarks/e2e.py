"""End-to-end iteration speed: our loop (sync and one-step-off async) vs TRL's GRPOTrainer.

Same model (tiny: our overhead; m100: ~110M parameters, compute), prompts, group size, max new
tokens and reward function (colour_fraction) on this box, measured in one process, TRL first. Ours runs the real stack (local Ray, a vLLM worker,
the reward Serve app, a DeepSpeed rank) through `cluster.job.loop.TrainingLoop`, exactly what `rlhf train`
runs inside its controller. Reports seconds per iteration, samples/s, the ratio to TRL, and the
share of wall time per stage (rollout, reward, learner, weight sync, learner idle).

    python -m benchmarks.e2e [--size tiny|m100] [--dtype float32|bfloat16] [--trl-dtype float32|bfloat16]
                             [--steps 20] [--warmup 3] [--prompts 8] [--group 4] [--max-new-tokens 32] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def trl_grpo(models: dict, prompts: list[str], a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from reward_service.functions import colour_fraction

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(models["policy"])
    tok.padding_side = "left"

    def gold(prompts, completions, **_):
        return colour_fraction(prompts, completions)

    class Timer(TrainerCallback):
        def __init__(self):
            self.t = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kw):
            self.t.append(time.perf_counter())

    batch = a.prompts * a.group
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-"), use_cpu=True, bf16=a.trl_dtype == "bfloat16",
                     use_vllm=False,
                     num_generations=a.group, max_completion_length=a.max_new_tokens,
                     per_device_train_batch_size=batch, gradient_accumulation_steps=1, max_steps=a.steps,
                     learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
                     gradient_checkpointing=False, dataloader_num_workers=0, temperature=1.0, seed=0)
    timer = Timer()
    trainer = GRPOTrainer(model=str(models["policy"]), processing_class=tok, reward_funcs=gold, args=cfg,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), callbacks=[timer])
    trainer.train()
    steps = [b - a_ for a_, b in zip(timer.t, timer.t[1:])][a.warmup:]
    s = statistics.median(steps)
    return {"s_per_iter": s, "samples_per_s": batch / s}


def ours(models: dict, prompts_file: str, a, mode: str, work: Path) -> dict:
    import ray

    from cluster.job.services import start_services, stop_services
    from cluster.config import load_config
    from cluster.job.loop import LoopState, TrainingLoop
    from cluster.outputs.run_dir import RunDir
    from contract.datasets import PromptIterator, load_prompts
    from contract.devices import resolve_device

    batch = a.prompts * a.group
    cfg = load_config(None, [], base={
        "name": f"bench-{mode}", "model": {"policy": str(models["policy"])},
        "data": {"prompts": prompts_file, "prompts_per_step": a.prompts},
        "rollout": {"num_workers": a.workers, "threads_per_worker": a.rollout_threads or max(1, 2 // a.workers),
                    "engine": {"dtype": a.dtype}, "sampling": {"n": a.group, "max_new_tokens": a.max_new_tokens}},
        "reward": {"functions": [{"path": "reward_service.functions:colour_fraction"}], "max_batch_size": batch},
        "learner": {"num_ranks": 1, "cpus_per_rank": 2, "dtype": a.dtype, "lr": 1e-3,
                    "rl": {"algorithm": "grpo", "kl_coef": 0.0, "minibatch_size": batch, "micro_batch_size": batch}},
        "loop": {"steps": a.steps, "mode": mode, "max_staleness": 1},
    })
    device = resolve_device("cpu")
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             runtime_env={"env_vars": device.actor_env(1)})
    run = RunDir(work / mode).create("")
    services = start_services(cfg, device, str(work / mode / "store"), log=lambda m: None)
    try:
        trainer = TrainingLoop(cfg, run, services, PromptIterator(load_prompts(prompts_file)), LoopState(),
                          log=lambda m: None)
        trainer.run_loop()
    finally:
        stop_services(services)
        ray.shutdown()
    # The last async iteration has no next rollout to overlap, so it is not steady state; dropped
    # in both modes alike.
    rows = run.read_metrics()[a.warmup:-1]
    wall = sum(r["wall_s"] for r in rows)
    share = {k: sum(r[f"{k}_s"] for r in rows) / wall for k in ("gen", "reward", "train", "sync")}
    share["learner_idle"] = sum(r["learner_idle_frac"] * r["wall_s"] for r in rows) / wall
    s = statistics.median(r["wall_s"] for r in rows)
    return {"s_per_iter": s, "samples_per_s": batch / s, "share": share}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=["tiny", "m100"], default="tiny")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="our engine and learner")
    p.add_argument("--trl-dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: --dtype (the headline compares like with like)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="first iterations pay for lazy inits; not timed")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--workers", type=int, default=1, help="rollout workers in our runs")
    p.add_argument("--rollout-threads", type=int, default=0, help="threads per rollout worker (0: 2 cores / workers)")
    p.add_argument("--runs", default="trl,sync,async", help="which of trl, sync, async to run")
    p.add_argument("--out", default="benchmarks/RESULTS_e2e.md")
    a = p.parse_args()
    a.trl_dtype = a.trl_dtype or a.dtype
    t_start, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    from benchmarks.provenance import cpu_line, git_commit
    from cluster.demo.task import demo_prompts, write_jsonl
    from cluster.demo.tiny_models import make_tiny_models

    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    models = make_tiny_models(work / "models", size=a.size)
    rows = demo_prompts(64)
    prompts_file = str(write_jsonl(work / "prompts.jsonl", rows))
    results = {}
    runs = a.runs.split(",")
    if "trl" in runs:
        results["TRL GRPOTrainer"] = trl_grpo(models, [r["prompt"] for r in rows], a)
    for mode in ("sync", "async"):
        if mode in runs:
            results[f"ours {mode}"] = ours(models, prompts_file, a, mode, work)
    print(json.dumps(results, indent=1))
    base = results.get("TRL GRPOTrainer", {}).get("samples_per_s")
    import sys

    commit = git_commit()
    lines = [f"# e2e: one GRPO iteration, ours vs TRL GRPOTrainer, {a.size} model", "",
             f"Command: `python -m benchmarks.e2e {' '.join(sys.argv[1:])}` (commit {commit}, started {started}, "
             f"{(time.perf_counter() - t_start) / 60:.0f} min; written by the script)  ", f"CPU: {cpu_line()}  ",
             f"Box load (1-min average at the end): {os.getloadavg()[0]:.1f}", "",
             f"## e2e: one GRPO iteration, {a.size} model ({a.prompts} prompts x {a.group} samples, "
             f"{a.max_new_tokens} new tokens, {a.steps} steps, median after {a.warmup} warm-up; "
             f"TRL {a.trl_dtype}; ours {a.dtype} with {a.workers} rollout worker(s))", "",
             "| run | s/iter | samples/s | vs TRL | rollout | reward | learner | weight sync | learner idle |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        sh = r.get("share", {})
        ratio = f"{r['samples_per_s'] / base:.2f}x" if base else "-"
        cells = [f"{100 * sh[k]:.0f}%" if k in sh else "-" for k in ("gen", "reward", "train", "sync", "learner_idle")]
        lines.append(f"| {name} | {r['s_per_iter']:.3f} | {r['samples_per_s']:.1f} | {ratio} | " + " | ".join(cells) + " |")
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
