"""Ratings a person gives on the review page, and the preference dataset they accumulate into.

A rating is one JSON object:
    {"kind": "like",  "prompt": P, "response": R, "value": true | false}
    {"kind": "score", "prompt": P, "response": R, "value": 1..5}
    {"kind": "pick",  "prompt": P, "chosen": A, "rejected": B}
with an optional `rating_id` (the page sends one; a retried POST with the same id is stored once)
and an optional `step` (of the rated sample, kept as provenance).

Each becomes reward now and training data later:
    like / dislike -> feedback score +1 / -1;      labels.jsonl {prompt, response, label 1 / 0}
    score s        -> feedback score (s - 3) / 2;  labels.jsonl label 1 if s >= 4, 0 if s <= 2 (3: none)
    pick A over B  -> feedback +0.5 for A, -0.5 for B;  pairs.jsonl {prompt, chosen, rejected}
The feedback records go to the feedback store (fused from the next scoring call on); the dataset
lines go to `<ratings dir>/pairs.jsonl` and `labels.jsonl`, exactly the files `rlhf train-rm`
reads (objectives bradley_terry and bce). Both are appended the way the feedback store appends:
one write under a lock, fsync'ed, a torn last line cut on the next open; each keeps the ids it
holds, so a retry completes whatever half of a rating a crash left out, and stores nothing twice.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

from contract.datasets import DatasetError
from reward_service.feedback import append_lines, cut_torn_tail

PAIRS, LABELS = "pairs.jsonl", "labels.jsonl"
KINDS = ("like", "score", "pick")
MAX_TEXT = 100_000  # characters per text field: a rating is a person's click, not a bulk upload
_ID = re.compile(r"^[\w.:-]{1,80}$")


def _text(r: dict, key: str, where: str) -> str:
    v = r.get(key)
    if not isinstance(v, str):
        raise DatasetError(f"{where}: field {key!r} must be a string")
    if len(v) > MAX_TEXT:
        raise DatasetError(f"{where}: field {key!r} is longer than {MAX_TEXT} characters")
    return v


def validate_rating(r, where: str = "rating") -> dict:
    """The rating normalized (kind, texts, value, rating_id, step), or a one-line DatasetError."""
    if not isinstance(r, dict):
        raise DatasetError(f"{where}: expected an object with 'kind' (one of {', '.join(KINDS)})")
    kind = r.get("kind")
    if kind not in KINDS:
        raise DatasetError(f"{where}: field 'kind' must be one of {', '.join(KINDS)} (got {kind!r})")
    out = {"kind": kind, "prompt": _text(r, "prompt", where)}
    if kind == "pick":
        out["chosen"], out["rejected"] = _text(r, "chosen", where), _text(r, "rejected", where)
    else:
        out["response"] = _text(r, "response", where)
        v = r.get("value")
        if kind == "like" and not isinstance(v, bool):
            raise DatasetError(f"{where}: a like needs 'value' true (like) or false (dislike) (got {v!r})")
        if kind == "score" and (isinstance(v, bool) or v not in (1, 2, 3, 4, 5)):
            raise DatasetError(f"{where}: a score needs 'value' an integer 1-5 (got {v!r})")
        out["value"] = v if kind == "like" else int(v)
    rid = r.get("rating_id")
    if rid is not None and (not isinstance(rid, str) or not _ID.match(rid)):
        raise DatasetError(f"{where}: field 'rating_id' must be 1-80 characters of letters, digits, '.', ':', '_', '-'")
    out["rating_id"] = rid or uuid.uuid4().hex
    step = r.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise DatasetError(f"{where}: field 'step' must be a non-negative integer (got {step!r})")
    out["step"] = step
    return out


def feedback_records(r: dict) -> list[dict]:
    """What a validated rating adds to the feedback store (score in [-1, 1])."""
    if r["kind"] == "pick":
        return [{"prompt": r["prompt"], "response": r["chosen"], "score": 0.5},
                {"prompt": r["prompt"], "response": r["rejected"], "score": -0.5}]
    score = (1.0 if r["value"] else -1.0) if r["kind"] == "like" else (r["value"] - 3) / 2
    return [{"prompt": r["prompt"], "response": r["response"], "score": score}]


def dataset_line(r: dict) -> tuple[str, dict] | None:
    """(file name, line) of the preference dataset for a validated rating; None for a neutral score."""
    meta = {"rating_id": r["rating_id"], "time": round(time.time(), 3), "step": r["step"]}
    if r["kind"] == "pick":
        return PAIRS, {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], **meta}
    label = int(r["value"]) if r["kind"] == "like" else (1 if r["value"] >= 4 else 0 if r["value"] <= 2 else None)
    if label is None:
        return None
    return LABELS, {"prompt": r["prompt"], "response": r["response"], "label": label, **meta}


class RatingStore:
    """`<root>/pairs.jsonl` and `<root>/labels.jsonl`, appended one rating at a time."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.ids: dict[str, set[str]] = {}
        for name in (PAIRS, LABELS):
            path = self.root / name
            cut_torn_tail(path)
            lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
            self.ids[name] = {json.loads(line).get("rating_id", "") for line in lines if line.strip()}

    def counts(self) -> dict[str, int]:
        return {"pairs": len(self.ids[PAIRS]), "labels": len(self.ids[LABELS])}

    def add(self, rating) -> dict:
        """Validate and store one rating; returns it normalized with `file` (where its dataset line
        went, None for a neutral score) and `feedback` (the records for the feedback store)."""
        r = validate_rating(rating)
        line = dataset_line(r)
        if line is not None:
            name, row = line
            if r["rating_id"] not in self.ids[name]:
                append_lines(self.root / name, [row])
                self.ids[name].add(r["rating_id"])
        return {**r, "file": line[0] if line else None, "feedback": feedback_records(r)}

    def read(self, name: str) -> list[dict]:
        path = self.root / name
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
