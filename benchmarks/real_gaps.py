"""Where our job's generation and learner time goes, against the floors of benchmarks/real_floors.py,
measured piece by piece on one recorded step of a real-model run.

    python -m benchmarks.real_gaps RUN_DIR [--out benchmarks/RESULTS_real_gaps.md]

RUN_DIR: the `ours` run directory of benchmarks/real_learning.py (its config.yaml, metrics.jsonl and
rollouts/). Each row adds one thing our job does on top of the row before, on the same prompts or
the same trained rows, on this box now:

generation (one vLLM engine, one process, then the job's pool):
  1. bare `vllm.LLM.generate`, unseeded (the floor real_floors.py reports)
  2. + one seed per request (what `rollout.sampling.seed` makes the job do: reproducible samples)
  3. + our engine's path: `RolloutEngine.generate` (token ids in, Arrow rows with logprobs out)
  4. + Ray: a RolloutPool of one worker actor (the job's path, chunks and all)
learner (each in a fresh process, since OpenMP reads its settings once):
  1. plain torch (learner/local.py: update.py with torch AdamW), the shell's environment
  2. + the actors' environment (contract.devices.DeviceProfile.actor_env: OMP_WAIT_POLICY=PASSIVE ...)
  3. + DeepSpeed: one LearnerRank (ZeRO-0, world 1, gloo) in this process
  4. + Ray: a LearnerGroup of one rank actor (the job's path: the batch through the object store)
Each variant runs twice and keeps the faster. The recorded job figures are shown beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REUSED: list[str] = []  # variants whose result an earlier run of this command measured


def _setup(run_dir: Path):
    import yaml

    from benchmarks.real_floors import _recorded_step

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    m, table = _recorded_step(run_dir)
    return cfg, m, table


def _trained_rows(table):
    import pyarrow as pa

    trained = table.filter(pa.array(table.column("trained").to_pylist()))
    i = trained.schema.get_field_index("policy_version")  # a fresh learner is at version 0
    return trained.set_column(i, "policy_version", pa.array([0] * trained.num_rows, pa.int64()))


def _best(fn, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def generation(run_dir: Path) -> dict:
    """Rows 1-3 on one engine (tokens/s), then row 4 through Ray."""
    import pyarrow as pa
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from actors.config import EngineConfig, RolloutConfig, SamplingConfig
    from actors.engine import RolloutEngine, prompt_seed, sampling_params
    from contract.devices import resolve_device

    cfg, m, table = _setup(run_dir)
    device = resolve_device("auto")
    threads = int(cfg["rollout"].get("threads_per_worker", 1))
    for k, v in device.actor_env(threads=threads).items():
        os.environ[k] = v
    rollout = RolloutConfig.model_validate(cfg["rollout"])
    ecfg = EngineConfig.model_validate({**cfg["rollout"]["engine"], "lora_rank": 0})
    sampling = rollout.sampling
    first = table.filter(pa.array([s == 0 for s in table.column("sample_idx").to_pylist()]))
    ids, token_ids = first.column("prompt_id").to_pylist(), first.column("prompt_ids").to_pylist()
    prompts = [TokensPrompt(prompt_token_ids=t) for t in token_ids]
    engine = RolloutEngine(cfg["model"]["policy"], ecfg, device)
    out: dict = {}

    def run(name, fn):
        tokens: list[int] = []
        best = _best(lambda: tokens.append(fn()))
        out[name] = tokens[-1] / best  # the same tokens every run: seeded, or the same count within noise
        print(f"generation {name}: {out[name]:.1f} tok/s", file=sys.stderr, flush=True)

    unseeded = SamplingParams(n=sampling.n, temperature=sampling.temperature, max_tokens=sampling.max_new_tokens,
                              logprobs=0)
    run("1 bare vLLM, unseeded", lambda: sum(len(c.token_ids) for o in engine.llm.generate(
        prompts, unseeded, use_tqdm=False) for c in o.outputs))
    seeded = [sampling_params(sampling, prompt_seed(sampling.seed, p)) for p in ids]
    run("2 + a seed per request", lambda: sum(len(c.token_ids) for o in engine.llm.generate(
        prompts, seeded, use_tqdm=False) for c in o.outputs))
    batch = pa.table({"prompt_id": ids, "prompt": first.column("prompt").to_pylist(),
                      "prompt_ids": pa.array(token_ids, pa.list_(pa.int32()))})
    run("3 + RolloutEngine.generate (Arrow rows, logprobs)", lambda: sum(
        len(x) for x in engine.generate(batch, sampling, 0, "w").column("response_ids").to_pylist()))
    del engine
    out["job (recorded)"] = m["rollout_tokens_per_s"]
    return out


def generation_pool(run_dir: Path) -> dict:
    import pyarrow as pa
    import ray

    from actors.config import RolloutConfig
    from actors.pool import RolloutPool
    from contract.devices import resolve_device

    cfg, m, table = _setup(run_dir)
    device = resolve_device("auto")
    rollout = RolloutConfig.model_validate({**cfg["rollout"], "num_workers": 1})
    first = table.filter(pa.array([s == 0 for s in table.column("sample_idx").to_pylist()]))
    prompts = pa.table({"prompt_id": first.column("prompt_id").to_pylist(),
                        "prompt": first.column("prompt").to_pylist()})
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": device.actor_env(threads=1)})
    pool = RolloutPool(rollout, cfg["model"]["policy"], device, namespace="bench-gaps")
    try:
        tokens = []
        best = _best(lambda: tokens.append(sum(len(x) for x in pool.generate(prompts).column(
            "response_ids").to_pylist())))
    finally:
        pool.shutdown()
        ray.shutdown()
    return {"4 + Ray: a RolloutPool of one worker": tokens[-1] / best}


def learner(run_dir: Path, variant: str) -> dict:
    from learner.algorithm import make_plan
    from learner.batch import prepare
    from learner.config import LearnerConfig

    cfg, m, table = _setup(run_dir)
    lcfg = LearnerConfig.model_validate({**cfg["learner"], "dtype": "float32"})
    s = cfg["rollout"]["sampling"]
    plan = make_plan(lcfg.rl, temperature=s["temperature"], max_new_tokens=s["max_new_tokens"])
    rows, policy = _trained_rows(table), cfg["model"]["policy"]
    import torch

    torch.set_num_threads(int(lcfg.cpus_per_rank))
    if variant in ("plain", "plain_actor_env"):
        from learner.local import LocalLearner

        learners = iter([LocalLearner(lcfg, policy, plan=plan) for _ in range(2)])  # a fresh one per run
        return {"train_s": _best(lambda: next(learners).train_step(rows))}
    if variant == "deepspeed":
        from contract.net import free_port
        from learner.rank import LearnerRank

        rank = LearnerRank(0, lcfg.model_dump_json(), policy, None, "cpu", 0, plan)
        rank.setup("127.0.0.1", free_port("127.0.0.1"))
        prep = prepare(rows, 0, 0, multiple_of=lcfg.rl.minibatch_size)
        return {"train_s": _best(lambda: rank.train_step(prep.batch, prep.num_samples, 0))}
    import ray

    from contract.devices import resolve_device
    from learner.group import LearnerGroup

    device = resolve_device("auto")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    group = LearnerGroup(lcfg, policy, device, plan=plan, namespace="bench-gaps")
    try:
        def step():
            group.version = 0  # the same rows, current again
            group.train_step(rows)
        return {"train_s": _best(step)}
    finally:
        group.shutdown()
        ray.shutdown()


def _child(args: list[str], env: dict | None = None) -> dict:
    """One variant in a fresh process; its result is kept beside the run (`.real_gaps/`), so a rerun
    after a failure measures only what is missing."""
    done = Path(args[-1]) / ".real_gaps" / (args[1].replace(":", "_") + ".json")
    if done.is_file():
        REUSED.append(f"{args[1]} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(done.stat().st_mtime))})")
        return json.loads(done.read_text())
    out = subprocess.run([sys.executable, "-m", "benchmarks.real_gaps", *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, cwd=ROOT)
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"real_gaps {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    done.parent.mkdir(exist_ok=True)
    done.write_text(lines[-1])
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS_real_gaps.md"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    run_dir = Path(a.run_dir)
    if a.child:
        kind, _, variant = a.child.partition(":")
        res = generation(run_dir) if kind == "generation" else (
            generation_pool(run_dir) if kind == "pool" else learner(run_dir, variant))
        print(json.dumps(res), flush=True)
        return
    from benchmarks.provenance import cpu_line, git_commit
    from contract.devices import resolve_device

    t0 = time.perf_counter()
    cfg, m, _ = _setup(run_dir)
    threads = {"OMP_NUM_THREADS": str(int(cfg["learner"].get("cpus_per_rank", 1)))}
    actor_env = {**resolve_device("auto").actor_env(threads=1), **threads}
    gen = _child(["--child", "generation", str(run_dir)])
    gen.update(_child(["--child", "pool", str(run_dir)]))
    gen["job (recorded)"] = gen.pop("job (recorded)")  # last, as in the learner table
    learn = {"1 plain torch": _child(["--child", "learner:plain", str(run_dir)], threads)["train_s"],
             "2 + the actors' environment": _child(["--child", "learner:plain_actor_env", str(run_dir)],
                                                   actor_env)["train_s"],
             "3 + DeepSpeed (ZeRO-0, world 1)": _child(["--child", "learner:deepspeed", str(run_dir)],
                                                      actor_env)["train_s"],
             "4 + Ray: a LearnerGroup of one rank": _child(["--child", "learner:group", str(run_dir)])["train_s"]}
    learn["job (recorded)"] = m["train_s"]
    commit = git_commit()
    floor_gen, floor_learn = gen["1 bare vLLM, unseeded"], learn["1 plain torch"]
    lines = ["# Where generation and learner time goes: one recorded step of a real-model run, piece by piece", "",
             f"Command: `python -m benchmarks.real_gaps {' '.join(sys.argv[1:])}` (commit {commit}, "
             f"{(time.perf_counter() - t0) / 60:.0f} min)  ", f"CPU: {cpu_line()}  ",
             *([f"Measured by an earlier run of this command, an earlier commit (kept in RUN_DIR/.real_gaps; delete "
                f"it to measure again): {', '.join(REUSED)}  "] if REUSED else []),
             f"Recorded step: {m['step']} of `{run_dir}` (SmolLM2-135M-Instruct; see RESULTS_real_learning.md)", "",
             "## Generation (tokens/s; ratio to bare vLLM unseeded)", "", "| what runs | tokens/s | ratio |",
             "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {v / floor_gen:.2f}x |" for k, v in gen.items()]
    lines += ["", "## Learner step (seconds; ratio = plain torch time / this time, i.e. tokens/s relative)", "",
              "| what runs | train s | ratio |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {floor_learn / v:.2f}x |" for k, v in learn.items()]
    Path(a.out).write_text("\n".join(lines) + "\n")
    Path(a.out).with_suffix(".json").write_text(json.dumps({"generation": gen, "learner": learn, "commit": commit,
                                                            "cpu": cpu_line(), "step": m["step"]}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
