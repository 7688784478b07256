"""The SFT warm-up of benchmarks/real_learning.py: `rlhf train-sft` on worked examples of the task.

Other systems' reverse-text recipe (a 0.6B model, about 0.05 -> 0.8 reward in 20 RL steps) starts RL
from a model fine-tuned on solved examples: RL then sharpens a behaviour the model already has
instead of searching for it with 8 samples a prompt. Here the examples are the last `n` rows of the
task's train split with their reference answer as the assistant turn (the held-out split is disjoint
by construction, so nothing evaluated is ever trained on), fine-tuned by our own SFT stage (DeepSpeed
rank on an embedded Ray cluster), in a process of its own. Both systems' RL starts from its output.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml


def sft_rows(train_file: Path, n: int) -> list[dict]:
    """The last `n` train problems as chat conversations: the user's question, the answer as the reply."""
    rows = [json.loads(x) for x in train_file.read_text().splitlines() if x.strip()]
    if n > len(rows):
        raise ValueError(f"--sft-examples {n}: {train_file} has only {len(rows)} problems")
    return [{"messages": [*r["messages"], {"role": "assistant", "content": r["answer"]}]} for r in rows[-n:]]


def sft_warmup(model_dir: Path, train_file: Path, out: Path, n: int, epochs: int, lr: float, dtype: str,
               seed: int, root: Path) -> dict:
    """Fine-tune `model_dir` on `n` solved train problems into out/model; the run's summary, with its wall
    time. An earlier run's finished output in `out` is reused (--reuse)."""
    from contract.net import free_port

    summary = out / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())
    out.mkdir(parents=True, exist_ok=True)
    data = out / "examples.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(train_file, n)))
    cfg = {"base_model": str(model_dir), "data": str(data), "output_dir": str(out / "model"), "epochs": epochs,
           "lr": lr, "batch_size": 16, "micro_batch_size": 8, "max_length": 256, "num_ranks": 1,
           "cpus_per_rank": 2, "dtype": dtype, "seed": seed, "ray": {"dashboard_port": free_port()}}
    (out / "sft.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    with open(out / "sft.log", "w") as log:
        rc = subprocess.call([sys.executable, "-m", "cluster.cli", "train-sft", str(out / "sft.yaml")], stdout=log,
                             stderr=subprocess.STDOUT, cwd=root)
    if rc != 0:
        raise SystemExit(f"the SFT warm-up failed (exit {rc}); see {out / 'sft.log'}")
    line = [x for x in (out / "sft.log").read_text().splitlines() if x.startswith("rlhf train-sft: saved")][-1]
    result = {"model_dir": str(out / "model"), "wall_s": time.perf_counter() - t0, "examples": n, "epochs": epochs,
              "lr": lr, "summary": line}
    summary.write_text(json.dumps(result))
    return result
