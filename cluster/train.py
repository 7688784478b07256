"""`rlhf train`: load the config (or the demo's) and run the job."""
from __future__ import annotations

from pathlib import Path

from cluster.config import dump_config, load_config


def train_command(config: str | None, overrides: list[str], resume: str | None = None,
                  run_dir: str | None = None, address: str | None = None) -> int:
    if config is None:
        from cluster.demo import demo_config

        cfg = load_config(None, overrides, base=demo_config(Path(run_dir or "runs/demo")))
    else:
        cfg = load_config(config, overrides)
    print("rlhf train: the training loop is not built yet; the job would run:")
    print(dump_config(cfg))
    return 0
