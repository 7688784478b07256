"""The built-in demo: tiny local models, a synthetic task with a known gold score."""
from __future__ import annotations

import json
from pathlib import Path

from cluster.tiny_models import make_tiny_models, synthetic_corpus


def write_demo_prompts(path: Path, n: int = 64, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = synthetic_corpus(n_lines=n, seed=seed + 1)
    with open(path, "w", encoding="utf-8") as f:
        for i, line in enumerate(lines):
            f.write(json.dumps({"id": f"p{i}", "prompt": " ".join(line.split()[:4])}) + "\n")
    return path


def demo_config(work: Path) -> dict:
    models = make_tiny_models(work / "models")
    prompts = write_demo_prompts(work / "data" / "prompts.jsonl")
    return {
        "name": "demo",
        "model": {"policy": str(models["policy"])},
        "data": {"prompts": str(prompts), "prompts_per_step": 8},
        "reward": {"model_dir": str(models["reward"])},
    }
