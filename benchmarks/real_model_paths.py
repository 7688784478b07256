"""Every path besides GRPO's learning, once and small, on the real model: SmolLM2-135M-Instruct.

    python -m benchmarks.real_model_paths [--out benchmarks/RESULTS_real_model_paths.md] [--work DIR]

On the arithmetic task (`rlhf make-task arithmetic`), each through the CLI in a subprocess with a
timeout, as a user runs it:
  - SFT: `rlhf train-sft cluster/configs/train_sft.yaml` on demonstrations made from the train split
    (the user turn + the answer as the assistant's reply), one rank; held-out loss before/after.
  - Reward model: `rlhf train-rm cluster/configs/train_rm.yaml` with base_model = SmolLM2 (a causal
    LM: its body gets a new score head) on pairs chosen = the right answer, rejected = a wrong one;
    train-rm's held-out accuracy, then the saved model through the job preflight's reward-model
    check and the reward service's `RewardModel` on pairs from the held-out split, next to the
    untrained head on the same pairs.
  - LoRA with adapter sync: `rlhf train cluster/configs/smollm2_arithmetic.yaml` for 2 GRPO steps
    with `learner.lora.r=8` (sync: adapter), the math verifier as the reward; sync_bytes against
    the full weights, logprob_gap (engine vs learner on the sampled tokens) and KL to the frozen base
    from metrics.jsonl, and whether the adapter moved (the final checkpoint's lora_B).
  - The review page of that job, while it runs: GET /reward/review and /reward/samples with the
    token from RUN/reward_store/token (and without it), the listed samples compared with the step's
    Parquet, their reward parts including verifier:math.
Writes the RESULTS file itself (never edit it by hand); logs and outputs stay under --work.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from benchmarks.provenance import cpu_line, git_commit
from benchmarks.real_model_paths_report import report
from contract.atomic import write_atomically
from contract.net import free_port

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "cluster" / "configs"
N_SFT, N_SFT_EVAL, N_PAIRS, N_PAIRS_EVAL = 64, 16, 80, 32


def cli_env() -> dict:
    """No cluster to attach to and no reward token from outside: the job makes its own (RUN/reward_store/token)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return {k: v for k, v in env.items() if k not in ("RAY_ADDRESS", "RLHF_REWARD_TOKEN")}


RAY_DID_NOT_START = "raylet did not register"  # Ray's fixed 30 s, missed on a busy box: worth one more try


def cli(args: list[str], log: Path, timeout_s: float, tries: int = 2) -> tuple[int, str, float]:
    """`rlhf ARGS` as a subprocess: (exit code, its output, seconds); once more if Ray did not start."""
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, env=cli_env(), timeout=timeout_s,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        rc, out = r.returncode, r.stdout
    except subprocess.TimeoutExpired as e:
        rc, out = 124, (e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or "") + "\n[timed out]"
    log.write_text(out)
    if rc != 0 and RAY_DID_NOT_START in out and tries > 1:
        log.rename(log.with_suffix(".first_try.log"))
        return cli(args, log, timeout_s, tries - 1)
    return rc, out, time.perf_counter() - t0


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


def failed(what: str, rc: int, out: str, log: Path) -> dict:
    tail = [x for x in out.splitlines() if x.strip()][-3:]
    return {"ok": False, "error": f"{what} exited {rc}; last lines: {' | '.join(tail)[-600:]} (log: {log})"}


# ---- SFT ------------------------------------------------------------------------------------------

def demos(task_rows: list[dict]) -> list[dict]:
    return [{"messages": [*r["messages"], {"role": "assistant", "content": r["answer"]}]} for r in task_rows]


def run_sft(model: Path, task: dict, work: Path) -> dict:
    data = write_jsonl(work / "sft_train.jsonl", demos(rows(task["train"])[:N_SFT]))
    held = write_jsonl(work / "sft_heldout.jsonl", demos(rows(task["heldout"])[:N_SFT_EVAL]))
    args = ["train-sft", str(CONFIGS / "train_sft.yaml"), f"base_model={model}", f"data={data}", f"eval_data={held}",
            f"output_dir={work / 'sft_model'}", "epochs=1", "lr=1e-4", "batch_size=16", "micro_batch_size=4",
            "max_length=256", "cpus_per_rank=2", f"ray.dashboard_port={free_port()}", "ray.namespace=paths-sft"]
    rc, out, wall = cli(args, work / "sft.log", 1500)
    m = re.search(r"held-out loss ([0-9.]+) -> ([0-9.]+) \((\d+) held-out, (\d+) training examples, (\d+) steps, "
                  r"(\d+)s\)", out)
    if rc != 0 or not m:
        return failed("rlhf train-sft", rc, out, work / "sft.log")
    return {"ok": True, "args": args, "ray_retried": (work / "sft.first_try.log").exists(),
            "loss_before": float(m[1]), "loss_after": float(m[2]), "num_eval": int(m[3]),
            "num_train": int(m[4]), "steps": int(m[5]), "train_s": float(m[6]), "process_s": wall}


# ---- reward model ---------------------------------------------------------------------------------

def wrong(answer: str, rng: random.Random) -> str:
    """A wrong number near the right one (1-10 off, never negative)."""
    a = int(answer)
    while True:
        b = a + rng.choice([-1, 1]) * rng.randint(1, 10)
        if b >= 0:
            return str(b)


def pairs(task_rows: list[dict], seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": r["messages"], "chosen": r["answer"], "rejected": wrong(r["answer"], rng)} for r in task_rows]


def served_accuracy(rm_dir: Path, base: Path, held: list[dict]) -> dict:
    """The saved model as the reward service loads it, and the untrained head, on held-out pairs."""
    import torch

    from cluster.launch.preflight import check_reward_model
    from reward_service.model import RewardModel, load_tokenizer
    from reward_service.train_rm import Scorer, load_base

    problems: list[str] = []
    check_reward_model("reward.model_dir", str(rm_dir), problems)
    msgs = [json.dumps(p["prompt"]) for p in held]
    prompts = [""] * len(held)
    rm = RewardModel(rm_dir, max_length=256)
    chosen = rm.score(prompts, [p["chosen"] for p in held], msgs)
    rejected = rm.score(prompts, [p["rejected"] for p in held], msgs)
    tok = load_tokenizer(base)
    score = Scorer(load_base(str(base), tok.pad_token_id, 0, lambda _: None).eval(), tok, 256)
    with torch.no_grad():
        c0 = score(prompts, [p["chosen"] for p in held], msgs).numpy()
        r0 = score(prompts, [p["rejected"] for p in held], msgs).numpy()
    return {"preflight_problems": problems, "served_accuracy": float((chosen > rejected).mean()),
            "untrained_accuracy": float((c0 > r0).mean()), "scores_finite": bool(abs(chosen).max() < float("inf")),
            "num_served_pairs": len(held)}


def run_reward_model(model: Path, task: dict, work: Path) -> dict:
    data = write_jsonl(work / "rm_pairs.jsonl", pairs(rows(task["train"])[:N_PAIRS], seed=1))
    held = pairs(rows(task["heldout"])[:N_PAIRS_EVAL], seed=2)
    args = ["train-rm", str(CONFIGS / "train_rm.yaml"), f"base_model={model}", f"data={data}",
            f"output_dir={work / 'rm_model'}", "epochs=1", "batch_size=16", "lr=1e-5", "eval_fraction=0.2",
            "max_length=256"]
    rc, out, wall = cli(args, work / "rm.log", 1500)
    m = re.search(r"held-out pairwise accuracy ([0-9.]+)", out)
    if rc != 0 or not m:
        return failed("rlhf train-rm", rc, out, work / "rm.log")
    said = next((x for x in out.splitlines() if "is a causal LM" in x), None)
    return {"ok": True, "args": args, "accuracy": float(m[1]), "process_s": wall, "said": said,
            "num_pairs": N_PAIRS, **served_accuracy(work / "rm_model", model, held)}


# ---- LoRA job and its review page -----------------------------------------------------------------

class ReviewProbe(threading.Thread):
    """Asks the running job's review endpoints until a page of samples comes back."""

    def __init__(self, base_url: str, token_file: Path, proc: subprocess.Popen):
        super().__init__(daemon=True)
        self.base, self.token_file, self.proc, self.result = base_url, token_file, proc, None

    def run(self) -> None:
        import requests

        while self.proc.poll() is None and self.result is None:
            time.sleep(0.5)
            try:
                auth = {"Authorization": f"Bearer {self.token_file.read_text().strip()}"}
                got = requests.get(f"{self.base}/samples?limit=100", headers=auth, timeout=10)
                if got.status_code != 200 or not got.json()["samples"]:
                    continue
                page = requests.get(f"{self.base}/review", headers=auth, timeout=10)
                self.result = {"samples": got.json(), "no_token_status": requests.get(
                    f"{self.base}/samples", timeout=10).status_code, "page_status": page.status_code,
                    "page_type": page.headers.get("content-type", ""), "page_html": "<html" in page.text.lower(),
                    "curves": requests.get(f"{self.base}/curves", headers=auth, timeout=10).json()}
            except (OSError, ValueError, requests.RequestException):
                continue


def full_weight_bytes(model: Path, dtype: str) -> int:
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), "pt") as f:
        numel = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return numel * (2 if dtype == "bfloat16" else 4)


def adapter_moved(run: Path) -> float | None:
    """max |lora_B| in the final checkpoint's adapter (B starts at zero: > 0 means an update reached it)."""
    from safetensors.torch import load_file

    files = sorted((run / "ckpt").glob("**/adapter_model.safetensors"))
    if not files:
        return None
    return max(float(v.abs().max()) for k, v in load_file(str(files[-1])).items() if "lora_B" in k)


def sample_key(r: dict) -> tuple:
    reward = r["reward"] if r["reward"] is not None and math.isfinite(r["reward"]) else None
    return r["prompt_id"], r["sample_idx"], r["response"], None if reward is None else round(reward, 6)


def review_check(probe: dict | None, run: Path) -> dict:
    import pyarrow.parquet as pq

    if probe is None:
        return {"ok": False, "error": "the review endpoints never listed a sample while the job ran"}
    listed = probe["samples"]["samples"]
    step = listed[0]["step"]
    table = pq.read_table(run / "rollouts" / f"step={step:06d}.parquet").to_pylist()
    on_disk = {sample_key(r) for r in table}
    shown = {sample_key(r) for r in listed if r["step"] == step}
    return {"ok": True, "step": step, "listed": len(listed), "listed_this_step": len(shown),
            "parquet_rows": len(table), "match_parquet": shown == on_disk,
            "parts": sorted({k for r in listed for k in r["reward_parts"]}),
            "verifier_math_listed": all("verifier:math" in r["reward_parts"] for r in listed),
            "verifier_math_equals_reward": all(abs(r["reward_parts"]["verifier:math"] - r["reward"]) < 1e-9
                                               for r in listed if r["reward_valid"]),
            "example": {k: listed[0][k] for k in ("prompt", "response", "reward", "reward_parts", "policy_version")},
            "no_token_status": probe["no_token_status"], "page_status": probe["page_status"],
            "page_type": probe["page_type"], "page_html": probe["page_html"],
            "curve_rows": len(probe["curves"].get("rows", []))}


def lora_job_args(model: Path, task: dict, run: Path, port: int) -> list[str]:
    return ["train", str(CONFIGS / "smollm2_arithmetic.yaml"), f"model.policy={model}",
            f"data.prompts={task['train']}", "eval.prompts=null", "data.prompts_per_step=2", "rollout.sampling.n=4",
            "rollout.sampling.max_new_tokens=16", "loop.steps=2", "loop.checkpoint_every=0",
            "loop.dynamic_sampling.enabled=true", "loop.dynamic_sampling.max_draws=6", "learner.lora.r=8",
            "learner.lora.sync=adapter", "learner.lr=1e-3", "learner.rl.minibatch_size=8",
            "learner.rl.micro_batch_size=8", "rollout.engine.kv_cache_seqs=16", f"run_dir={run}",
            f"reward.http_port={port}", f"ray.dashboard_port={free_port()}", "ray.namespace=paths-lora"]


def run_lora_job(model: Path, task: dict, work: Path, tries: int = 2) -> tuple[dict, dict]:
    run, port, log = work / "lora_run", free_port(), work / "lora.log"
    args = lora_job_args(model, task, run, port)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, env=cli_env(), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        probe = ReviewProbe(f"http://127.0.0.1:{port}/reward", run / "reward_store" / "token", proc)
        probe.start()
        try:
            rc = proc.wait(timeout=1800)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the job's own session: the process this script started and its children
            rc = 124
        probe.join(timeout=15)
    if rc != 0 and RAY_DID_NOT_START in log.read_text() and tries > 1:
        log.rename(log.with_suffix(".first_try.log"))
        if run.is_dir():
            run.rename(work / "lora_run.first_try")
        return run_lora_job(model, task, work, tries - 1)
    out = log.read_text()
    review = review_check(probe.result, run) if run.is_dir() else {"ok": False, "error": "no run directory"}
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] \
        if (run / "metrics.jsonl").is_file() else []
    steps = [m for m in metrics if "train_s" in m]
    if rc != 0 or len(steps) != 2:
        return failed("rlhf train (LoRA)", rc, out, log), review
    dtype_line = next((x.strip() for x in out.splitlines() if re.search(r"dtype: (float32|bfloat16)", x)), "")
    learner = re.search(r"learner (float32|bfloat16)", dtype_line) or re.search(r"dtype: (\w+)", dtype_line)
    learner_dtype = learner[1] if learner else "float32"
    keys = ("reward_mean", "sampling_draws", "uniform_groups", "trained_samples", "policy_version", "kl",
            "logprob_gap", "sync_bytes", "sync_s", "gen_s", "train_s", "wall_s")
    return {"ok": True, "args": args, "process_s": time.perf_counter() - t0, "dtype_line": dtype_line,
            "ray_retried": (work / "lora.first_try.log").exists(),
            "full_bytes": full_weight_bytes(model, learner_dtype), "learner_dtype": learner_dtype,
            "adapter_max_abs_B": adapter_moved(run), "steps": [{k: m.get(k) for k in keys} for m in steps]}, review


def main() -> None:
    ap = argparse.ArgumentParser(description="SFT, reward model, LoRA sync and the review page on SmolLM2")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS_real_model_paths.md"))
    ap.add_argument("--work", default=None, help="where data, models, runs and logs go (default: a new temp dir)")
    a = ap.parse_args()
    from cluster.launch.gguf_import import cached_smollm2_dir
    from cluster.tasks import make_task

    work = Path(a.work or tempfile.mkdtemp(prefix="real_model_paths_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {work}", flush=True)
    t0 = time.perf_counter()
    model = cached_smollm2_dir()
    task = make_task("arithmetic", work / "task", n_train=max(N_SFT, N_PAIRS), n_heldout=N_PAIRS_EVAL, seed=1)
    r = {"command": "python -m benchmarks.real_model_paths", "cpu": cpu_line(), "model": str(model),
         "commit": git_commit(),
         "task_sizes": f"{max(N_SFT, N_PAIRS)} train / {N_PAIRS_EVAL} held-out problems",
         "load": " ".join(Path("/proc/loadavg").read_text().split()[:3])}
    for name, fn in (("sft", run_sft), ("rm", run_reward_model)):
        print(f"{name} ...", flush=True)
        r[name] = fn(model, task, work)
        print(f"{name}: {json.dumps(r[name])[:400]}", flush=True)
    print("lora job + review page ...", flush=True)
    r["lora"], r["review"] = run_lora_job(model, task, work)
    print(f"lora: {json.dumps(r['lora'])[:600]}\nreview: {json.dumps(r['review'])[:600]}", flush=True)
    r["wall_s"] = time.perf_counter() - t0
    write_atomically(work / "results.json", json.dumps(r, indent=1, default=str))
    write_atomically(a.out, report(r))
    print(f"wrote {a.out}", flush=True)


if __name__ == "__main__":
    main()
