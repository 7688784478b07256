"""Which sampling temperature gives GRPO a signal on a real model: the base model's reward and the
share of prompt groups with mixed rewards (a group all right or all wrong has zero advantage).

    python -m benchmarks.real_temperature [--task arithmetic] [--prompts 24] [--n 8] [--temps 0.6 1.0]

Prints one line per temperature; the shipped configs' rollout.sampling.temperature cites it.
"""
from __future__ import annotations

import argparse
import tempfile

import numpy as np

from benchmarks.real_learning import TASK_VERIFIER


def main() -> None:
    import pyarrow as pa
    from transformers import AutoTokenizer

    from actors.config import SamplingConfig
    from benchmarks.real_eval import _engine
    from cluster.launch.gguf_import import cached_smollm2_dir
    from cluster.tasks import make_task
    from contract.datasets import load_prompts
    from reward_service.verifiers import VerifierPool

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(TASK_VERIFIER), default="arithmetic")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temps", type=float, nargs="+", default=[0.6, 1.0])
    a = ap.parse_args()
    model = str(cached_smollm2_dir())
    task = make_task(a.task, tempfile.mkdtemp(), n_train=256, n_heldout=64, seed=0)
    prompts = load_prompts(str(task["train"]), tokenizer=AutoTokenizer.from_pretrained(model)).slice(0, a.prompts)
    refs = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("reference").to_pylist()))
    engine = _engine(model, "float32", 256)
    pool = VerifierPool(TASK_VERIFIER[a.task], timeout_s=10.0, processes=1)
    try:
        for t in a.temps:
            sampling = SamplingConfig(n=a.n, temperature=t, max_new_tokens=a.max_new_tokens, seed=0)
            rows = pa.Table.from_batches([engine.generate(prompts, sampling, 0, "probe")])
            v = pool.verify(rows.column("response").to_pylist(),
                            [refs[p] for p in rows.column("prompt_id").to_pylist()])
            r = np.asarray(v.values, dtype=float).reshape(-1, a.n)
            cut = np.mean([f == "length" for f in rows.column("finish_reason").to_pylist()])
            print(f"{a.task} T={t}: reward {np.nanmean(r):.3f}, groups with mixed rewards "
                  f"{np.mean(np.nanstd(r, axis=1) > 0):.2f}, truncated {cut:.2f}", flush=True)
    finally:
        pool.close()


if __name__ == "__main__":
    main()
