"""How cost grows with the rollout fleet: 1, 4, 16 and 64 workers, on one box.

  .venv/bin/python benchmarks/scale.py [--workers 1,4,16,64] [--steps 5] [--chunk-s 0.5] [--sizes-mb 10,100]
                                       [--out benchmarks/RESULTS_scale.md]

SIMULATION. This box cannot hold 64 vLLM engines, so every rollout worker here runs
`SimulatedEngine` (benchmarks/scale_sim.py, with the other stand-ins; used nowhere else): it answers a chunk after sleeping a set time per generated token and returns
well-formed rows; it never runs a model. It plugs in through `RolloutPool(engine_factory=...)` and
exists only in this file. Everything around it is the real code: `RolloutPool` (token-balanced
chunks, dispatch, exactly-once assembly) with real `RolloutWorker` actors (one process each),
`TrainingLoop` driving steps (Parquet, metrics, publish) and `WeightSync` with both transports
(`contract.weights` buckets over a gloo group, `PackedStateDict` through the object store). The
learner and the reward service are stand-ins too (`SimulatedLearner`: rank 0 holds N MB of float32
weights and trains in no time; `ConstantReward` scores 0), so what a step costs beyond the simulated
generation is the loop's and the pool's own work, and that is what is measured.

Weak scaling: every worker gets one chunk of `--chunk-s` seconds per step (prompts per step =
4 x workers, n=4, 32 tokens), so the ideal step time is flat; what grows with the fleet is
overhead. One pool serves every fleet size (grown with `add_workers`), so 64 processes start once.
Per fleet size:
  * pool overhead per step: the loop's `gen_s` (pool.generate) minus the simulated chunk time, as a
    share of the step's wall time (target <= 5% at 64 workers with 0.5 s chunks), for the pool's
    dispatch loop and for the floor beside it: bare Ray calls to the same workers;
  * dispatch latency per chunk: dispatch to result in hand, minus the chunk's engine time;
  * this process's own time dispatching chunks per step, and its CPU time (all threads, Ray's too)
    over the whole `pool.generate`: the pool's serial cost, which on a cluster is all the driver
    pays, while here the wall-clock overhead also holds the 64 worker processes' CPU on two cores;
  * weight publish to every worker, object store and broadcast, at each size (target: object store
    at 64 workers <= 3x its time at 1 worker). The simulated engine takes the tensors as they arrive
    and copies nothing (a real engine's reload is per worker, on its own device, in parallel).
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # `python benchmarks/scale.py`: the stand-ins are benchmarks.scale_sim

from benchmarks import scale_sim  # noqa: E402
from benchmarks.scale_sim import BUCKET_MB, ConstantReward, SimulatedEngine, SimulatedLearner  # noqa: E402

# Broadcast receive buffers in flight at once (workers x bucket, MB) this box can hold beside the workers:
# the first run's 100 MB broadcast to 64 workers (2 GB of buckets plus gloo's own, beside 64 processes
# of ~250 MB) set off Ray's memory monitor on this 23 GB box. Larger cases are left out of the table.
MAX_BROADCAST_MB = 1024

PROMPTS_PER_WORKER, N, TOKENS = 4, 4, 32


def timed_chunk_run(bare_ray: bool = False):
    """The pool's ChunkRun, timing this process's own work per call (constructor and dispatches).
    `bare_ray`: the floor of a dispatch loop that makes one Ray call per chunk: each chunk one call to a
    worker, all submitted at once and read with one `ray.get`; no polling, no timeouts, no retries, no
    freeing of workers as they finish. (Its dispatch latency per chunk is not comparable: every chunk's
    result is in hand only when the last one is.) Everything else in `pool.generate` (tokenizing, chunking, the exactly-once
    assembly) is the same, so the difference between the two rows is the dispatch loop's own cost."""
    import ray

    from actors.dispatch import ChunkRun

    class Timed(ChunkRun):
        def __init__(self, *a):
            t0 = time.perf_counter()
            super().__init__(*a)
            self.driver_s = time.perf_counter() - t0

        def _dispatch(self):
            t0 = time.perf_counter()
            super()._dispatch()
            self.driver_s += time.perf_counter() - t0

        if bare_ray:
            def run(self):
                handles = [h for _, h in self.pool.workers()]
                t0 = time.perf_counter()
                sent = [(handles[i % len(handles)].generate.remote(self._slice(c.rows), self.sampling),
                         time.monotonic()) for i, c in enumerate(self.queue)]
                self.driver_s += time.perf_counter() - t0
                self.results = ray.get([ref for ref, _ in sent], timeout=self.cfg.request_timeout_s)
                now = time.monotonic()
                self.accepted = [(t, now) for _, t in sent]
                return self.results

    return Timed


# ---- measurements ----------------------------------------------------------------------------------
def job_config(workers: int, steps: int, model_dir: str, prompts: str):
    from cluster.config import JobConfig

    return JobConfig.model_validate({
        "name": f"scale-{workers}", "device": "cpu", "model": {"policy": model_dir},
        "data": {"prompts": prompts, "prompts_per_step": PROMPTS_PER_WORKER * workers},
        "rollout": {"num_workers": 1, "cpus_per_worker": 0.01, "request_timeout_s": 600, "start_timeout_s": 1200,
                    "sampling": {"n": N, "max_new_tokens": TOKENS}},
        "reward": {"functions": [{"path": "reward_service.functions:colour_fraction"}]},
        "learner": {"weight_sync": "object_store", "sync_timeout_s": 600},
        "loop": {"steps": steps, "mode": "sync", "checkpoint_every": 0}})


def run_steps(services, cfg, tmp: Path, tag: str, variant) -> dict:
    """`cfg.loop.steps` real TrainingLoop steps; medians over all but the first (warm-up)."""
    import actors.pool
    from cluster.job.loop import LoopState, TrainingLoop
    from cluster.outputs.run_dir import RunDir
    from contract.datasets import PromptIterator, load_prompts

    actors.pool.ChunkRun = variant
    pool, calls = services.pool, []
    orig = pool.generate

    def generate(*a, **kw):
        cpu0 = time.process_time()
        out = orig(*a, **kw)
        r = pool.last_run
        calls.append(([got - sent - gen for (sent, got), gen in zip(r.accepted, r.engine_s())], r.driver_s,
                      time.process_time() - cpu0))
        return out

    pool.generate = generate
    try:
        run = RunDir(tmp / f"run-{tag}").create("{}")
        TrainingLoop(cfg, run, services, PromptIterator(load_prompts(cfg.data.prompts), seed=0), LoopState(),
                     log=lambda m: None).run_loop()
    finally:
        del pool.generate
    rows, calls = run.read_metrics()[1:], calls[1:]
    chunk_s = PROMPTS_PER_WORKER * N * TOKENS * services.per_token
    lat = sorted(x for c, _, _ in calls for x in c)
    med = statistics.median
    return {"step_s": med(r["wall_s"] for r in rows), "gen_s": med(r["gen_s"] for r in rows), "chunk_s": chunk_s,
            "pool_s": med(r["gen_s"] - chunk_s for r in rows),
            "pool_share": med((r["gen_s"] - chunk_s) / r["wall_s"] for r in rows),
            "other_s": med(r["wall_s"] - r["gen_s"] for r in rows),
            "dispatch_ms": 1e3 * med(lat), "dispatch_p95_ms": 1e3 * lat[int(0.95 * (len(lat) - 1))],
            "driver_ms": 1e3 * med(d for _, d, _ in calls),
            "driver_cpu_s": med(c for _, _, c in calls),
            "driver_cpu_share": med(c / r["wall_s"] for (_, _, c), r in zip(calls, rows))}


def publish_s(services, learner, transport: str, versions: list[int], reps: int = 2) -> float:
    """Median seconds of WeightSync.publish to the whole pool, a new version each time (the first
    publish, which forms the broadcast group, is left out)."""
    from cluster.job.weight_sync import WeightSync

    sync = WeightSync(learner, transport, "gloo", 600, log=print)
    times = []
    try:
        for _ in range(reps + 1):
            versions[0] += 1
            learner.version = versions[0]
            times.append(sync.publish(services.pool))
    finally:
        sync.leave(services.pool)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", default="1,4,16,64")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--chunk-s", type=float, default=0.5, help="simulated generation time of one chunk (s)")
    ap.add_argument("--sizes-mb", default="10,100")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    fleets, sizes = [int(w) for w in args.workers.split(",")], [int(s) for s in args.sizes_mb.split(",")]
    per_token = args.chunk_s / (PROMPTS_PER_WORKER * N * TOKENS)

    import ray
    import ray.cloudpickle

    from actors.pool import RolloutPool
    from cluster.demo.tiny_models import make_tiny_models
    from cluster.job.services import Services
    from cluster.job.weight_sync import WeightSync
    from cluster.plan import make_job_plan
    from contract.devices import DeviceProfile

    ray.cloudpickle.register_pickle_by_value(scale_sim)  # shipped by value: workers need no path to benchmarks/
    ray.init(address="local", num_cpus=4, object_store_memory=3 << 30, include_dashboard=False,
             log_to_driver=False, namespace="bench-scale")
    t_start, results = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmpdir:
        tmp = Path(tmpdir)
        model_dir = str(make_tiny_models(tmp / "models")["policy"])
        learners = {mb: SimulatedLearner(mb) for mb in sizes}
        (tmp / "none.jsonl").write_text(json.dumps({"id": "q", "prompt": "red"}) + "\n")
        cfg0 = job_config(1, args.steps, model_dir, str(tmp / "none.jsonl"))
        services = Services(make_job_plan(cfg0), reward=ConstantReward(), learner=learners[sizes[0]])
        services.per_token = per_token
        services.sync = WeightSync(services.learner, "object_store", "gloo", 600, log=print)
        timed, floor, versions = timed_chunk_run(), timed_chunk_run(bare_ray=True), [0]
        t0 = time.perf_counter()
        services.pool = RolloutPool(cfg0.rollout, model_dir, DeviceProfile("cpu"),
                                    weights_source=services.current_weights, name_prefix="sim",
                                    engine_factory=functools.partial(SimulatedEngine, per_token=per_token))
        try:
            for w in fleets:
                services.pool.add_workers(w - services.pool.num_workers)
                r = {"workers": w, "grow_s": time.perf_counter() - t0}
                prompts = tmp / f"prompts-{w}.jsonl"
                prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"red cat {i} sat on the blue mat"})
                                           + "\n" for i in range(PROMPTS_PER_WORKER * w * (args.steps + 1))))
                cfg = job_config(w, args.steps, model_dir, str(prompts))
                services.learner.version = versions[0]
                r["steps"] = run_steps(services, cfg, tmp, str(w), timed)
                r["floor"] = run_steps(services, cfg, tmp, f"{w}-bare", floor)
                versions[0] = services.learner.version
                for mb in sizes:
                    for transport in ("object_store", "broadcast"):
                        if transport == "broadcast" and w * min(mb, BUCKET_MB) > MAX_BROADCAST_MB:
                            continue  # see MAX_BROADCAST_MB
                        r[f"publish {transport} {mb}"] = publish_s(services, learners[mb], transport, versions)
                services.learner = learners[sizes[0]]  # what workers added next load
                services.sync = WeightSync(services.learner, "object_store", "gloo", 600, log=print)
                print(json.dumps(r), flush=True)
                t0 = time.perf_counter()
                results.append(r)
        finally:
            services.pool.shutdown()
    ray.shutdown()
    report = render(results, args, sizes, time.perf_counter() - t_start)
    print(report)
    if args.out:
        Path(args.out).write_text(report)


def render(results: list[dict], args, sizes: list[int], total_s: float) -> str:
    cmd = "python benchmarks/scale.py " + " ".join(sys.argv[1:])
    base = results[0]
    lines = [f"Command: `{cmd}` ({total_s:.0f} s in all). Medians over steps 2..{args.steps}; ratios are to "
             f"{base['workers']} worker(s) in the same run.", "",
             "workers | dispatched by | step s | sim chunk s | pool overhead s (share of step) | rest of step s | "
             "dispatch ms/chunk (median, p95) | this process dispatching, ms/step | this process's CPU in generate s "
             "(share of step)", "---|---|---|---|---|---|---|---|---"]
    for r in results:
        for key, how in (("steps", "the pool's ChunkRun"), ("floor", "bare Ray calls (floor)")):
            a = r[key]
            lines.append(f"{r['workers']} | {how} | {a['step_s']:.3f} | {a['chunk_s']:.3f} | {a['pool_s']:.3f} "
                         f"({100 * a['pool_share']:.1f}%) | {a['other_s']:.3f} | {a['dispatch_ms']:.1f}, "
                         f"{a['dispatch_p95_ms']:.1f} | {a['driver_ms']:.1f} | {a['driver_cpu_s']:.3f} "
                         f"({100 * a['driver_cpu_share']:.1f}%)")
    keys = [f"publish {t} {mb}" for mb in sizes for t in ("object_store", "broadcast")]
    lines += ["", "workers | " + " | ".join(f"publish {k.split()[1]} {k.split()[2]} MB s (x 1 worker)" for k in keys),
              "---|" + "---|" * len(keys)]
    for r in results:
        lines.append(f"{r['workers']} | " + " | ".join(f"{r[k]:.3f} ({r[k] / base[k]:.1f}x)" if k in r else
                                                      "not run (memory)" for k in keys))
    lines += ["", "Seconds to start the workers added for each fleet size (one process each): "
              + ", ".join(f"{r['workers']}: {r['grow_s']:.0f}" for r in results)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
