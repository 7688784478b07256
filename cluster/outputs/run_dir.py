"""The run directory: everything a run leaves behind, each file written atomically.

    RUN/config.yaml                    the resolved config (what `--resume` reloads)
    RUN/metrics.jsonl                  one JSON object per step
    RUN/tb/                            TensorBoard events of the same scalars
    RUN/rollouts/step=000012.parquet   every sample of step 12 with its provenance
    RUN/ckpt/step=000010/              learner state + controller.json (step, version, prompt order)
                                       + rollouts_in_flight/ (generated, not yet trained: async/inflight)
    RUN/weights.jsonl                  per checkpoint: the policy's tensor digests (`rlhf replay` checks them)
    RUN/report.png                     curves drawn at the end

A checkpoint directory is built under a temporary name and renamed into place, so `latest_checkpoint`
only ever sees complete ones: a crash mid-save leaves the previous checkpoint as the resume point.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from contract.atomic import replace_dir, staged_file, write_atomically

CKPT_PREFIX = "step="


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._tb = None

    def create(self, config_yaml: str) -> "RunDir":
        for sub in ("rollouts", "ckpt", "tb"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        write_atomically(self.root / "config.yaml", config_yaml)
        return self

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    # -- per-step outputs ------------------------------------------------------------------------
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.root / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.root / "tb"))
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def read_metrics(self) -> list[dict]:
        p = self.root / "metrics.jsonl"
        if not p.is_file():
            return []
        return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]

    def truncate(self, after_step: int) -> None:
        """On resume: forget the metrics and rollouts of steps after the checkpoint, which the
        resumed run redoes (or, with a smaller loop.steps, never reaches), and any half-written
        checkpoint a crash left behind."""
        for staging in (self.root / "ckpt").glob(f".{CKPT_PREFIX}*.tmp"):
            shutil.rmtree(staging, ignore_errors=True)
        kept = [m for m in self.read_metrics() if m["step"] <= after_step]
        write_atomically(self.root / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in kept))
        ledger = [e for e in self.read_weight_ledger() if e["step"] <= after_step + 1]  # the resumed checkpoint's
        write_atomically(self.root / "weights.jsonl", "".join(json.dumps(e) + "\n" for e in ledger))
        for f in (self.root / "rollouts").glob("*step=*.parquet"):  # train and eval files
            if int(f.stem.rsplit("step=", 1)[1]) > after_step:
                f.unlink()

    def rollout_path(self, step: int, split: str = "train") -> Path:
        prefix = "step=" if split == "train" else f"{split}_step="
        return self.root / "rollouts" / f"{prefix}{step:06d}.parquet"

    def write_rollouts(self, step: int, table: pa.Table, split: str = "train") -> Path:
        path = self.rollout_path(step, split)
        with staged_file(path) as tmp:
            pq.write_table(table, tmp)
        return path

    def read_rollouts(self, split: str = "train") -> pa.Table:
        prefix = "step=" if split == "train" else f"{split}_step="
        files = sorted((self.root / "rollouts").glob(f"{prefix}*.parquet"))
        return pa.concat_tables([pq.read_table(f) for f in files]) if files else pa.table({})

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoint_staging(self, step: int) -> Path:
        """An empty directory to save into; `commit_checkpoint` makes it visible."""
        tmp = self.root / "ckpt" / f".{CKPT_PREFIX}{step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit_checkpoint(self, staging: Path, step: int, state: dict) -> Path:
        write_atomically(staging / "controller.json", json.dumps(state, indent=1))
        final = self.root / "ckpt" / f"{CKPT_PREFIX}{step:06d}"
        replace_dir(staging, final)
        return final

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        done = [p for p in (self.root / "ckpt").glob(f"{CKPT_PREFIX}*") if (p / "controller.json").is_file()]
        return sorted(done, key=lambda p: int(p.name.removeprefix(CKPT_PREFIX)))

    def latest_checkpoint(self) -> Path | None:
        done = self.checkpoints()
        return done[-1] if done else None

    def record_weights(self, step: int, version: int, tensors: dict[str, str], requirements: dict) -> None:
        """One weights.jsonl line for the checkpoint at `step` (replacing an earlier line for it)."""
        from cluster.outputs.weight_digest import model_digest

        ledger = [e for e in self.read_weight_ledger() if e["step"] != step]
        ledger.append({"step": step, "policy_version": version, "sha256": model_digest(tensors),
                       "requirements": requirements, "tensors": tensors})
        write_atomically(self.root / "weights.jsonl", "".join(json.dumps(e) + "\n" for e in ledger))

    def read_weight_ledger(self) -> list[dict]:
        p = self.root / "weights.jsonl"
        if not p.is_file():
            return []
        return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]

    def prune_checkpoints(self, keep: int) -> None:
        """Delete all but the newest `keep` complete checkpoints (0: keep everything)."""
        if keep > 0:
            for old in self.checkpoints()[:-keep]:
                shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
