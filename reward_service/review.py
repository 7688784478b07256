"""What the review page shows, read from the files a job writes: samples and the run's curves.

The reward service does not know the run-directory layout (it imports only `contract`): the
caller of `deploy` passes the directory of the per-step rollout files (`step=NNNNNN.parquet`,
every sample with prompt, response, reward and its parts, policy version, worker, step) and the
metrics file (one JSON object per step). Files are read newest first and only as far as needed
for one page of samples; a file already read is kept until it changes (its mtime and size).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from contract.datasets import DatasetError

SAMPLE_COLUMNS = ("prompt_id", "sample_idx", "prompt", "response", "reward", "reward_valid", "reward_parts",
                  "policy_version", "worker_id", "step", "trained", "gold", "reward_model_version")
CURVES = ("reward_mean", "gold_mean", "kl", "eval_reward_mean", "eval_gold_mean", "reward_model_version",
          "policy_version")
MAX_LIMIT, MAX_FILES = 500, 2000  # rows per answer; files scanned for one filtered answer


def _finite(v):
    return v if not isinstance(v, float) or math.isfinite(v) else None


def parse_query(params: dict) -> dict:
    """?step=&prompt=&limit= -> typed filters, or a one-line DatasetError."""
    out = {"step": None, "prompt": (params.get("prompt") or "").strip(), "limit": 50}
    for key, lo, hi in (("step", 0, None), ("limit", 1, MAX_LIMIT)):
        raw = params.get(key)
        if raw in (None, ""):
            continue
        try:
            v = int(raw)
        except ValueError:
            raise DatasetError(f"samples: '{key}' must be an integer (got {raw[:40]!r})") from None
        if v < lo or (hi is not None and v > hi):
            raise DatasetError(f"samples: '{key}' must be >= {lo}" + (f" and <= {hi}" if hi else "") + f" (got {v})")
        out[key] = v
    if len(out["prompt"]) > 1000:
        raise DatasetError("samples: 'prompt' filter is longer than 1000 characters")
    return out


class ReviewSource:
    def __init__(self, rollouts_dir: str | Path | None, metrics_file: str | Path | None):
        self.rollouts = Path(rollouts_dir) if rollouts_dir else None
        self.metrics_file = Path(metrics_file) if metrics_file else None
        self._cache: dict[Path, tuple[tuple, list[dict]]] = {}

    def _files(self) -> list[tuple[int, Path]]:
        if self.rollouts is None or not self.rollouts.is_dir():
            return []
        out = []
        for f in self.rollouts.glob("step=*.parquet"):
            try:
                out.append((int(f.stem.removeprefix("step=")), f))
            except ValueError:
                continue
        return sorted(out, reverse=True)

    def _rows(self, path: Path) -> list[dict]:
        st = path.stat()
        key = (st.st_mtime_ns, st.st_size)
        hit = self._cache.get(path)
        if hit and hit[0] == key:
            return hit[1]
        table = pq.read_table(path)
        table = table.select([c for c in SAMPLE_COLUMNS if c in table.column_names])
        order = pc.sort_indices(table, sort_keys=[("prompt_id", "ascending"), ("sample_idx", "ascending")])
        rows = []
        for r in table.take(order).to_pylist():
            r["reward_parts"] = {k: _finite(v) for k, v in (r.get("reward_parts") or [])}
            rows.append({k: _finite(v) for k, v in r.items()})
        if len(self._cache) > 4 * MAX_FILES:
            self._cache.clear()
        self._cache[path] = (key, rows)
        return rows

    def samples(self, step: int | None = None, prompt: str = "", limit: int = 50) -> dict:
        """Newest step first, each step's samples by prompt then sample index; `prompt` matches
        as a case-insensitive substring. Also the newest step on disk (for the page's step field)."""
        files = self._files()
        latest = files[0][0] if files else None
        if step is not None:
            files = [(s, f) for s, f in files if s == step]
        needle = prompt.lower()
        out: list[dict] = []
        for _, f in files[:MAX_FILES]:
            try:
                rows = self._rows(f)
            except (OSError, ValueError):  # removed by a resume's truncate between glob and read
                continue
            out += [r for r in rows if needle in r.get("prompt", "").lower()] if needle else rows
            if len(out) >= limit:
                break
        return {"samples": out[:limit], "latest_step": latest, "num_files": len(files)}

    def metrics(self) -> dict:
        """Per-step curves the page draws (keys absent in a run are left out)."""
        rows = []
        if self.metrics_file is not None and self.metrics_file.is_file():
            for line in self.metrics_file.read_text(encoding="utf-8").splitlines():
                try:
                    m = json.loads(line)
                except ValueError:
                    continue  # a line being written
                rows.append({k: _finite(m[k]) for k in ("step", *CURVES) if k in m})
        return {"rows": rows}
