"""Learning table: does each algorithm / mode actually learn the demo task, and how fast?

    python -m benchmarks.learning [--rows all|NAME,NAME] [--steps 60] [--out benchmarks/RESULTS_learning.md]

Every row is the demo job's RL stage (`rlhf train` with no config: tiny policy, reward model trained
on gold-ranked pairs, 16 prompts x 4 samples per step) with a few overrides, from the raw policy (the
demo fine-tunes it first; RL from the raw policy is where the algorithms differ), run through the real
stack (local Ray, vLLM worker, reward Serve app, DeepSpeed rank) one after the other in this
process. For each: gold score at step 0 and at the end, the first step whose gold mean reaches
0.8, and the final KL to the reference. Targets (issue 14): every row reaches gold >= 0.8 within
the demo's budget; async GRPO with staleness 2 and correction needs <= 1.2x the steps of sync GRPO.
Writes the table to --out and the gold curves to the PNG beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

GOLD_TARGET = 0.8
GRPO = ["learner.rl.algorithm=grpo", "learner.rl.kl_coef=0.01"]
ASYNC2 = ["loop.mode=async", "loop.max_staleness=2"]
ROWS: dict[str, list[str]] = {
    "sync PPO (the demo's RL settings)": [],
    "sync GRPO": GRPO,
    "sync RLOO": ["learner.rl.algorithm=rloo", "learner.rl.kl_coef=0.01"],
    "sync REINFORCE++": ["learner.rl.algorithm=reinforce_pp"],
    "sync GRPO, temperature 0.7": GRPO + ["rollout.sampling.temperature=0.7"],
    "async GRPO, staleness 2, no correction": GRPO + ASYNC2 + ["learner.rl.rollout_correction.mode=off"],
    "async GRPO, staleness 2, TIS correction": GRPO + ASYNC2 + ["learner.rl.rollout_correction.mode=tis"],
    "DAPO-style GRPO (clip-higher, token-mean, dynamic sampling, overlong penalty)": GRPO + [
        "learner.rl.clip_low=0.2", "learner.rl.clip_high=0.28", "learner.rl.loss_aggregation=token_mean",
        "loop.dynamic_sampling.enabled=true", "learner.rl.overlong.mode=penalty"],
}


def run_row(name: str, overrides: list[str], base: dict, steps: int, work: Path) -> dict:
    from cluster.config import load_config
    from cluster.job.loop import LoopState, TrainingLoop
    from cluster.job.services import start_services, stop_services
    from cluster.outputs.run_dir import RunDir
    from contract.datasets import PromptIterator, load_prompts
    from contract.devices import resolve_device

    cfg = load_config(None, [f"loop.steps={steps}", "loop.checkpoint_every=0", *overrides], base=base)
    slug = "".join(c if c.isalnum() else "-" for c in name.lower())[:40]
    run = RunDir(work / slug).create("")
    t0 = time.perf_counter()
    services = start_services(cfg, resolve_device("cpu"), str(work / slug / "store"), log=lambda m: None)
    try:
        loop = TrainingLoop(cfg, run, services, PromptIterator(load_prompts(cfg.data.prompts), seed=cfg.seed),
                            LoopState(), log=lambda m: None)
        loop.run_loop()
    finally:
        stop_services(services)
    rows = [r for r in run.read_metrics() if "gold_mean" in r]
    gold = [r["gold_mean"] for r in rows]
    reached = next((r["step"] for r in rows if r["gold_mean"] >= GOLD_TARGET), None)
    return {"name": name, "overrides": overrides, "gold_0": gold[0], "gold_end": gold[-1],
            "gold_best": max(gold), "steps_to_target": reached, "kl_end": rows[-1].get("kl", float("nan")),
            "curve": gold, "wall_s": time.perf_counter() - t0,
            "train_rows": [r for r in run.read_metrics() if "train_s" in r]}  # every step's metrics (not stored)


def write(results: list[dict], out: Path, steps: int) -> None:
    sync_grpo = next((r for r in results if r["name"] == "sync GRPO"), None)
    cpus = sorted({r.get("cpu", "not recorded") for r in results})
    commits = sorted({r.get("commit", "not recorded") for r in results})
    lines = [f"# Learning on the demo task ({steps} steps, 16 prompts x 4 samples per step, tiny models)", "",
             "Each row ran in one process, rows one after another, with the command, commit and time in its last "
             "columns (`python -m benchmarks.learning` runs them all; `--rows` reruns some and keeps the others, "
             "from RESULTS_learning.json). Wall times depend on what else the box ran. RL starts from the raw "
             "tiny policy (the demo job fine-tunes it first).", "",
             f"Commit{'s' if len(commits) > 1 else ''}: {', '.join(commits)}  ", f"CPU: {'; '.join(cpus)}", "",
             f"Target: gold >= {GOLD_TARGET} within the budget; async with correction <= 1.2x the steps of sync GRPO.",
             "", "| row | gold step 0 | gold end | best | steps to gold 0.8 | final KL | wall | met? | command | commit | when |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        met = r["steps_to_target"] is not None
        if "correction" in r["name"] and "TIS" in r["name"] and sync_grpo and sync_grpo["steps_to_target"]:
            met = met and r["steps_to_target"] <= 1.2 * sync_grpo["steps_to_target"]
        lines.append(f"| {r['name']} | {r['gold_0']:.3f} | {r['gold_end']:.3f} | {r['gold_best']:.3f} | "
                     f"{r['steps_to_target'] if r['steps_to_target'] is not None else 'not reached'} | "
                     f"{r['kl_end']:.4f} | {r['wall_s']:.0f} s | {'yes' if met else 'no'} | `{r.get('command', '')}` | "
                     f"{r.get('commit', '')} | {r.get('date', '')} |")
    lines += ["", "Overrides per row (on top of the demo config, `rlhf config` shows every key):", ""]
    lines += [f"- {r['name']}: `{' '.join(r['overrides']) or '(none)'}`" for r in results]
    lines += ["", f"Curves: `{out.with_suffix('.png').name}`."]
    out.write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for r in results:
        ax.plot(range(len(r["curve"])), r["curve"], label=r["name"][:48])
    ax.axhline(GOLD_TARGET, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("gold score (share of colour words)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=90)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="all", help="comma-separated row names (substring match) or all")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", default="benchmarks/RESULTS_learning.md")
    a = p.parse_args()
    import ray

    from benchmarks.provenance import cpu_line, git_commit
    from cluster.demo.task import build_demo
    from contract.devices import resolve_device

    work = Path(tempfile.mkdtemp(prefix="bench-learning-"))
    base = build_demo(work / "demo", sft=False)  # RL from the raw policy: where the algorithms differ
    chosen = {k: v for k, v in ROWS.items() if a.rows == "all" or any(s in k for s in a.rows.split(","))}
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             runtime_env={"env_vars": resolve_device("cpu").actor_env(1)})
    # Every finished row is kept in the JSON beside --out (curves included); a run of some --rows
    # replaces those and keeps the others, so the table always lists every row measured at this --steps.
    store = Path(a.out).with_suffix(".json")
    kept = json.loads(store.read_text()) if store.is_file() else {}
    kept = {k: v for k, v in kept.items() if v.get("steps") == a.steps and k in ROWS}
    try:
        for name, overrides in chosen.items():
            r = run_row(name, overrides, base, a.steps, work)
            r.pop("train_rows")
            print(json.dumps({k: v for k, v in r.items() if k != "curve"}), flush=True)
            kept[name] = {**r, "steps": a.steps, "command": "python -m benchmarks.learning " + " ".join(
                f"--{k} '{v}'" for k, v in (("rows", a.rows), ("steps", a.steps)) if v != p.get_default(k)),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git_commit(), "cpu": cpu_line()}
            store.write_text(json.dumps(kept, indent=1) + "\n")
            write([kept[k] for k in ROWS if k in kept], Path(a.out), a.steps)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
