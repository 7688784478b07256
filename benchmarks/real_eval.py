"""Held-out accuracy of a model directory on a verifiable task, the same way for every system compared.

`evaluate(model_dir, task_file, verifier)` samples every held-out prompt on the rollout engine
(vLLM, the one our jobs use) greedily once (pass@1) and `k` times at T=1 (mean accuracy over the
samples), and scores each response with the task's verifier in the verifier process pool. Any
checkpoint, ours or TRL's, is an HF directory, so both are measured by exactly this code.

    python -m benchmarks.real_eval MODEL_DIR TASK.jsonl [--verifier math] [--k 4]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def _engine(model_dir: str, dtype: str, max_model_len: int):
    from actors.config import EngineConfig
    from actors.engine import RolloutEngine
    from contract.devices import resolve_device

    device = resolve_device("auto")
    for k, v in device.actor_env(threads=os.cpu_count() or 1).items():
        os.environ.setdefault(k, v)
    return RolloutEngine(model_dir, EngineConfig(dtype=dtype, max_model_len=max_model_len, kv_cache_seqs=128), device)


def evaluate(model_dir: str, task_file: str, verifier: str = "math", k: int = 4, max_new_tokens: int = 48,
             dtype: str = "float32", seed: int = 1234, limit: int | None = None) -> dict:
    """{'greedy': pass@1, 'sampled': mean accuracy of k samples at T=1, 'tokens', 'eval_s', ...}."""
    import pyarrow as pa
    from transformers import AutoTokenizer

    from actors.config import SamplingConfig
    from contract.datasets import load_prompts
    from reward_service.verifiers import VerifierPool

    t0 = time.perf_counter()
    prompts = load_prompts(task_file, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    if limit:
        prompts = prompts.slice(0, limit)
    engine = _engine(model_dir, dtype, max_model_len=256)
    pool = VerifierPool(verifier, timeout_s=10.0, processes=1)
    refs = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("reference").to_pylist()))
    out: dict = {"model_dir": str(model_dir), "prompts": prompts.num_rows}
    try:
        for name, sampling in (("greedy", SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens)),
                               ("sampled", SamplingConfig(n=k, temperature=1.0, max_new_tokens=max_new_tokens,
                                                          seed=seed))):
            rows = pa.Table.from_batches([engine.generate(prompts, sampling, 0, "eval")])
            responses = rows.column("response").to_pylist()
            v = pool.verify(responses, [refs[p] for p in rows.column("prompt_id").to_pylist()])
            ok = np.asarray([o == "ok" for o in v.outcomes])
            out[name] = float(np.nanmean(np.where(ok, v.values, 0.0)))
            out[f"{name}_failed_checks"] = int((~ok).sum())
            out[f"{name}_response_tokens"] = float(np.mean([len(x) for x in rows.column("response_ids").to_pylist()]))
            out[f"{name}_examples"] = responses[:3]
    finally:
        pool.close()
        del engine
    out["eval_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("task_file")
    ap.add_argument("--verifier", default="math")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    print(json.dumps(evaluate(a.model_dir, a.task_file, a.verifier, a.k, a.max_new_tokens, a.dtype, limit=a.limit),
                     indent=1))


if __name__ == "__main__":
    main()
