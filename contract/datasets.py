"""Dataset readers (prompts, preference pairs, human feedback) and a resumable prompt iterator.

All go through pyarrow. Every problem is a `DatasetError` whose message names the file and the
column or line, because a bad data file found two hours into a cluster job is the worst kind.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq


class DatasetError(ValueError):
    pass


def read_table(path: str | Path) -> pa.Table:
    """A Parquet (.parquet) or JSON-lines (.jsonl/.json) file as an Arrow table."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"{p}: file not found")
    suffix = p.suffix.lower()
    try:
        if suffix == ".parquet":
            table = pq.read_table(p)
        elif suffix in (".jsonl", ".json"):
            raw = p.read_bytes()
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(f"{p}: not valid UTF-8 (byte {e.start})") from None
            if not raw.strip():
                raise DatasetError(f"{p}: file is empty")
            table = pajson.read_json(p)
        else:
            raise DatasetError(f"{p}: unsupported extension {suffix!r}; expected .parquet or .jsonl")
    except pa.ArrowInvalid as e:
        raise DatasetError(f"{p}: cannot be parsed: {str(e).splitlines()[0]}") from None
    if table.num_rows == 0:
        raise DatasetError(f"{p}: file has no rows")
    return table


def require_text(table: pa.Table, path, columns: list[str]) -> None:
    for c in columns:
        if c not in table.column_names:
            raise DatasetError(f"{path}: missing column {c!r}; expected columns {columns} (found {table.column_names})")
        col = table.column(c)
        if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
            raise DatasetError(f"{path}: column {c!r} must be text (found {col.type})")
        nulls = pc.indices_nonzero(pc.is_null(col)).to_pylist()
        if nulls:
            raise DatasetError(f"{path}: column {c!r} is null in row(s) {nulls[:5]}")


def load_prompts(path: str | Path) -> pa.Table:
    """Columns: `prompt_id` (from an `id` column if present, else the row number), `prompt`."""
    table = read_table(path)
    require_text(table, path, ["prompt"])
    if "id" in table.column_names:
        ids = pc.cast(table.column("id"), pa.string())
        if pc.any(pc.is_null(ids)).as_py():
            raise DatasetError(f"{path}: column 'id' has nulls")
        if pc.count_distinct(ids).as_py() != table.num_rows:
            raise DatasetError(f"{path}: column 'id' has duplicate values")
    else:
        ids = pa.array([str(i) for i in range(table.num_rows)])
    return pa.table({"prompt_id": ids, "prompt": table.column("prompt").cast(pa.string())})


def load_preferences(path: str | Path) -> pa.Table:
    """Pairwise preferences: `prompt`, `chosen`, `rejected` (the Bradley-Terry training set)."""
    table = read_table(path)
    require_text(table, path, ["prompt", "chosen", "rejected"])
    return table.select(["prompt", "chosen", "rejected"])


def load_labels(path: str | Path) -> pa.Table:
    """Pointwise like/dislike: `prompt`, `response`, `label` in {0, 1}."""
    table = read_table(path)
    require_text(table, path, ["prompt", "response"])
    labels = _numeric(table, path, "label")
    if not all(v in (0.0, 1.0) for v in labels):
        raise DatasetError(f"{path}: column 'label' must be 0 or 1")
    return pa.table({"prompt": table["prompt"], "response": table["response"], "label": labels})


def validate_feedback(rec: dict, where: str = "feedback") -> dict:
    """One human feedback record {prompt, response, score in [-1, 1]} or a DatasetError."""
    if not isinstance(rec, dict):
        raise DatasetError(f"{where}: expected an object with prompt, response, score")
    for k in ("prompt", "response"):
        if not isinstance(rec.get(k), str):
            raise DatasetError(f"{where}: field {k!r} must be a string")
    s = rec.get("score")
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not -1 <= s <= 1:
        raise DatasetError(f"{where}: field 'score' must be a number in [-1, 1] (got {s!r})")
    return {"prompt": rec["prompt"], "response": rec["response"], "score": float(s)}


def load_feedback(path: str | Path) -> list[dict]:
    """Human feedback records from a JSON-lines or Parquet file, each validated."""
    p = Path(path)
    if p.suffix.lower() in (".jsonl", ".json") and p.is_file():
        recs = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    recs.append(validate_feedback(json.loads(line), f"{p}:{i}"))
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{p}:{i}: invalid JSON ({e.msg})") from None
        return recs
    return [validate_feedback(r, f"{p}:{i}") for i, r in enumerate(read_table(p).to_pylist(), 1)]


def _numeric(table: pa.Table, path, column: str) -> list[float]:
    if column not in table.column_names:
        raise DatasetError(f"{path}: missing column {column!r}")
    try:
        values = pc.cast(table.column(column), pa.float64()).to_pylist()
    except pa.ArrowInvalid:
        raise DatasetError(f"{path}: column {column!r} must be numeric") from None
    if any(v is None for v in values):
        raise DatasetError(f"{path}: column {column!r} has nulls")
    return values


@dataclass
class PromptIterator:
    """Endless, seeded, epoch-reshuffled batches of prompts whose position can be saved and restored.

    The order depends only on (seed, epoch), so a resumed run replays exactly the prompts an
    uninterrupted one would have seen.
    """

    table: pa.Table
    seed: int = 0
    epoch: int = 0
    position: int = 0

    def __post_init__(self) -> None:
        if self.table.num_rows == 0:
            raise DatasetError("prompt dataset is empty")
        self._order = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.table.num_rows)

    def next_batch(self, size: int) -> pa.Table:
        idx: list[int] = []
        while len(idx) < size:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(size - len(idx), len(self._order) - self.position)
            idx.extend(self._order[self.position:self.position + take].tolist())
            self.position += take
        return self.table.take(pa.array(idx))

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "num_rows": self.table.num_rows}

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != self.table.num_rows or state["seed"] != self.seed:
            raise DatasetError("prompt iterator state does not match this dataset (rows or seed differ)")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)
