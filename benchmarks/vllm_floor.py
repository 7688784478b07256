"""The vLLM floor of one e2e iteration at the tiny size: the engine alone, called in-process, on the
iteration's 8 prompts x 4 samples x 32 new tokens, with the sampling options our workers use and
with each of them turned off (detokenization, per-request seeds, sampled-token logprobs).

    python benchmarks/vllm_floor.py [--prompts 8] [--max-new-tokens 32] [--reps 5]

If even the bare engine takes longer than TRL's whole iteration, no loop around it can reach a
multiple of TRL's speed at this size (benchmarks/RESULTS_e2e.md).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_WAIT_POLICY="PASSIVE", VLLM_CPU_OMP_THREADS_BIND="nobind",
                  OMP_NUM_THREADS="2", TORCHDYNAMO_DISABLE="1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()

    import vllm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from cluster.demo.tiny_models import make_tiny_models

    model = make_tiny_models(Path(tempfile.mkdtemp(prefix="vllm-floor-")))["policy"]
    llm = vllm.LLM(model=str(model), dtype="float32", enforce_eager=True, max_model_len=512,
                   kv_cache_memory_bytes=64 << 20, seed=0)
    tok = llm.get_tokenizer()
    prompts = [TokensPrompt(prompt_token_ids=tok(f"red blue green {i} the cat sat")["input_ids"])
               for i in range(a.prompts)]
    ours = dict(n=4, temperature=1.0, max_tokens=a.max_new_tokens, logprobs=0)
    variants = {"as our workers call it (seed per prompt, logprobs=0, detokenize)": (ours, True),
                "detokenize=False": ({**ours, "detokenize": False}, True),
                "no per-request seed": (ours, False),
                "no logprobs": ({k: v for k, v in ours.items() if k != "logprobs"}, True),
                "none of the three": ({**{k: v for k, v in ours.items() if k != "logprobs"}, "detokenize": False}, False)}
    for name, (kw, seeded) in variants.items():
        times = []
        for r in range(a.reps + 1):  # the first call warms up
            params = [SamplingParams(**kw, seed=1000 * r + i if seeded else None) for i in range(a.prompts)]
            t0 = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            times.append(time.perf_counter() - t0)
        print(f"| {name} | {statistics.median(times[1:]):.3f} s |")


if __name__ == "__main__":
    main()
