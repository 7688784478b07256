"""Reward benchmark: pairs scored per second through the Serve app (DeploymentHandle and HTTP) vs
the same reward model called directly in this process, with the same batch size and threads.

  .venv/bin/python benchmarks/reward.py [--sizes tiny,m100] [--reps 5] [--out benchmarks/RESULTS_reward.md]

One replica with 1 torch thread against a direct model with 1 torch thread (on this shared 2-core
box, 2 threads per side measured 50-270 pairs/s for the same direct call from one run to the next:
OpenMP threads fighting other processes; 1 thread was steady); runs alternate
(A B C A B C ...) so background load hits every side alike; medians after one warm-up.
Target (issue 5): handle path >= 0.8x direct at batch 32.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import ray  # noqa: E402
from contract.net import free_port  # noqa: E402
import requests  # noqa: E402

from cluster.demo.tiny_models import make_tiny_models  # noqa: E402
from reward_service.app import deploy, shutdown  # noqa: E402
from reward_service.config import RewardConfig  # noqa: E402
from reward_service.functions import COLOURS, FILLER  # noqa: E402
from reward_service.model import RewardModel  # noqa: E402

WORK = Path(os.environ.get("BENCH_DIR", "/tmp/bench-reward"))
BATCH, THREADS, WORDS = 32, 1, 48
PAIRS = {"tiny": 1024, "m100": 64}


def bench_pairs(n: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(0)
    words = list(COLOURS + FILLER)
    return ([f"question {i}: describe the sky." for i in range(n)],
            [" " + " ".join(rng.choice(words, size=WORDS)) for _ in range(n)])


def alternate(runs: dict, reps: int, n: int) -> dict[str, float]:
    """Median pairs/s per side over interleaved reps after one warm-up each."""
    for fn in runs.values():
        fn()
    got: dict[str, list] = {k: [] for k in runs}
    for _ in range(reps):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            got[k].append(n / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in got.items()}


def measure(size: str, reps: int) -> dict[str, float]:
    model_dir = make_tiny_models(WORK / size, size=size)["reward"]
    prompts, responses = bench_pairs(PAIRS[size])
    cfg = RewardConfig(model_dir=str(model_dir), max_batch_size=BATCH, cpus_per_replica=THREADS,
                       http_port=free_port(), token_env="", request_timeout_s=600)
    client = deploy(cfg, WORK / "store", name=f"reward_bench_{size}")
    direct = RewardModel(model_dir, threads=THREADS)
    chunks = [(prompts[i:i + BATCH], responses[i:i + BATCH]) for i in range(0, len(prompts), BATCH)]
    session = requests.Session()
    pool = ThreadPoolExecutor(8)

    def post(chunk):
        r = session.post(client.http_url + "/score", json={"prompts": chunk[0], "responses": chunk[1]}, timeout=600)
        r.raise_for_status()
        return r.json()["reward"]

    runs = {"direct (in process)": lambda: [direct.score(*c) for c in chunks],
            "Serve handle (RewardClient.score)": lambda: client.score(prompts, responses),
            "Serve HTTP (POST /score, 8 clients)": lambda: list(pool.map(post, chunks))}
    try:
        return alternate(runs, reps, len(prompts))
    finally:
        pool.shutdown()
        shutdown(f"reward_bench_{size}")


def report(results: dict, reps: int) -> str:
    lines = ["# Reward benchmark (benchmarks/reward.py)", "",
             f"Box: {os.cpu_count()} cores, CPU only, fp32. Pairs of a short prompt + {WORDS}-word response; "
             f"batch {BATCH}; one Serve replica with {THREADS} torch thread(s) vs the same model in the benchmark "
             f"process with {THREADS} thread(s). Medians of {reps} interleaved runs after one warm-up; "
             f"load average {os.getloadavg()[0]:.1f} at the end. Ratios are within one process.", ""]
    for size, r in results.items():
        base = r["direct (in process)"]
        lines += [f"## {size} ({PAIRS[size]} pairs per run)", "", "| path | pairs/s | vs direct |", "|---|---|---|"]
        lines += [f"| {k} | {v:.3g} | {v / base:.2f}x |" for k, v in r.items()]
        lines += ["", f"Handle / direct at batch {BATCH}: **{r['Serve handle (RewardClient.score)'] / base:.2f}x** "
                  "(target >= 0.8x).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,m100")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS_reward.md")))
    args = ap.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    results = {}
    try:
        for size in args.sizes.split(","):
            results[size] = measure(size, args.reps)
            Path(args.out).write_text(report(results, args.reps) + "\n")  # keep what is done if a later size dies
    finally:
        ray.shutdown()
    print(report(results, args.reps))


if __name__ == "__main__":
    main()
