"""The two floors our job's throughput is held against, measured on one of its own recorded steps.

- generation: bare `vllm.LLM.generate` (no Ray, no pool, no Arrow) on that step's prompts with the
  same engine and sampling settings, vs the step's `rollout_tokens_per_s`;
- learner: a plain torch step of the same update (learner/local.py: update.py with torch AdamW, no
  DeepSpeed, no Ray) on that step's trained rows, vs the step's `train_s`.
Each floor runs twice and keeps the faster (the first pays one-time costs).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


def _recorded_step(run_dir: Path) -> tuple[dict, "object"]:
    import pyarrow.parquet as pq

    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    m = [x for x in metrics if "train_s" in x][-2]  # a late step, not the last (which also saves)
    table = pq.read_table(run_dir / "rollouts" / f"step={m['step']:06d}.parquet")
    return m, table


def bare_vllm_tokens_per_s(model_dir: Path, table, cfg: dict, dtype: str) -> float:
    import vllm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from actors.config import EngineConfig
    from actors.engine import LOGPROBS_MODE, kv_cache_bytes
    from contract.devices import resolve_device

    device = resolve_device("auto")
    for k, v in device.actor_env(threads=int(cfg["rollout"].get("threads_per_worker", 1))).items():
        os.environ[k] = v
    ecfg = EngineConfig(**{**cfg["rollout"].get("engine", {}), "dtype": dtype})
    llm = vllm.LLM(model=str(model_dir), dtype=dtype, max_model_len=ecfg.max_model_len, seed=0,
                   logprobs_mode=LOGPROBS_MODE, **device.vllm_engine_kwargs(kv_cache_bytes(str(model_dir), ecfg),
                                                                           ecfg.gpu_memory_utilization))
    s = cfg["rollout"]["sampling"]
    first = table.filter(table.column("sample_idx").to_numpy() == 0) if "sample_idx" in table.column_names else table
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in first.column("prompt_ids").to_pylist()]
    params = SamplingParams(n=s["n"], temperature=s["temperature"], max_tokens=s["max_new_tokens"], logprobs=0)
    best = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        best = max(best, sum(len(c.token_ids) for o in outs for c in o.outputs) / dt)
    del llm
    return best


def plain_torch_train_s(model_dir: Path, table, cfg: dict) -> float:
    import pyarrow as pa

    from learner.config import LearnerConfig
    from learner.algorithm import make_plan
    from learner.local import LocalLearner

    lcfg = LearnerConfig.model_validate({**cfg["learner"], "dtype": "float32"})
    s = cfg["rollout"]["sampling"]
    trained = table.filter(pa.array(table.column("trained").to_pylist()))
    # a fresh learner is at version 0: the recorded step's samples are made current (only speed is measured)
    i = trained.schema.get_field_index("policy_version")
    trained = trained.set_column(i, "policy_version", pa.array([0] * trained.num_rows, pa.int64()))
    best = float("inf")
    for _ in range(2):
        learner = LocalLearner(lcfg, str(model_dir), plan=make_plan(lcfg.rl, temperature=s["temperature"],
                                                                     max_new_tokens=s["max_new_tokens"]))
        t0 = time.perf_counter()
        learner.train_step(trained)
        best = min(best, time.perf_counter() - t0)
        del learner
    return best


def floors(model_dir: Path, task_dir: Path, run_dir: Path, cfg: dict, dtype: str) -> dict:
    import torch

    m, table = _recorded_step(run_dir)
    out = {"step": m["step"], "ours_rollout_tokens_per_s": m["rollout_tokens_per_s"], "ours_train_s": m["train_s"]}
    out["bare_vllm_tokens_per_s"] = bare_vllm_tokens_per_s(model_dir, table, cfg, dtype)
    torch.set_num_threads(int(cfg["learner"].get("cpus_per_rank", 1)))
    out["plain_torch_train_s"] = plain_torch_train_s(model_dir, table, cfg) if dtype == "float32" else None
    out["generation_ratio"] = out["ours_rollout_tokens_per_s"] / out["bare_vllm_tokens_per_s"]
    if out["plain_torch_train_s"]:
        out["learner_ratio"] = out["plain_torch_train_s"] / out["ours_train_s"]  # tokens/s ours / plain
    return out
