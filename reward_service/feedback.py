"""Human feedback: an append-only JSON-lines store and the n-gram match that turns it into a reward.

Stated similarity: the Jaccard overlap of the lower-cased word n-grams (`ngram` words) of two
responses, |A & B| / |A | B| (a response shorter than n words is its one shorter gram). A record
matches a new response when the overlap is >= `threshold`; r_feedback is the overlap-weighted
mean score of the matching records, 0 when none matches. Prompts are not compared: a person rates
what the policy said, and the demo's prompts are interchangeable.

Durability: a batch of records is validated as a whole, then written as one `write` under an
exclusive file lock, then fsync'ed, so a bad batch stores nothing and a crash mid-write leaves at
most a torn last line, which the next open cuts off. Each batch carries a request id; a retried
batch whose id is already stored is acknowledged without storing it again.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
from collections import defaultdict
from pathlib import Path

from contract.datasets import DatasetError, load_feedback, validate_feedback

_WORD = re.compile(r"\w+")
FILE_NAME = "feedback.jsonl"


def ngrams(text: str, n: int) -> frozenset[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return frozenset([tuple(words)]) if words else frozenset()
    return frozenset(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def validate_batch(records, where: str = "feedback") -> list[dict]:
    """All records valid, or a DatasetError naming the first bad one (so nothing is half-stored)."""
    if not isinstance(records, list) or not records:
        raise DatasetError(f"{where}: expected a non-empty list of records {{prompt, response, score}}")
    return [validate_feedback(r, f"{where}[{i}]") for i, r in enumerate(records)]


class FeedbackIndex:
    """In-memory n-gram inverted index over the stored records."""

    def __init__(self, ngram: int, threshold: float):
        self.n, self.threshold = ngram, threshold
        self.grams: list[frozenset] = []
        self.scores: list[float] = []
        self.postings: dict[tuple, list[int]] = defaultdict(list)

    def add(self, rec: dict) -> None:
        g = ngrams(rec["response"], self.n)
        idx = len(self.grams)
        self.grams.append(g)
        self.scores.append(rec["score"])
        for gram in g:
            self.postings[gram].append(idx)

    def match(self, response: str) -> float:
        q = ngrams(response, self.n)
        shared: dict[int, int] = defaultdict(int)
        for gram in q:
            for idx in self.postings.get(gram, ()):
                shared[idx] += 1
        num = den = 0.0
        for idx, k in shared.items():
            sim = k / (len(q) + len(self.grams[idx]) - k)
            if sim >= self.threshold:
                num += sim * self.scores[idx]
                den += sim
        return num / den if den else 0.0


class FeedbackStore:
    """`store_dir/feedback.jsonl` plus its index; re-opening reads every stored record back."""

    def __init__(self, store_dir: str | Path, ngram: int, threshold: float, seed_file: str | None = None):
        self.path = Path(store_dir) / FILE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.index = FeedbackIndex(ngram, threshold)
        self.request_ids: set[str] = set()
        if seed_file:
            for rec in load_feedback(seed_file):
                self.index.add(rec)
        cut_torn_tail(self.path)
        if self.path.is_file():
            for i, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
                raw = json.loads(line)
                self.index.add(validate_feedback(raw, f"{self.path}:{i}"))
                self.request_ids.add(raw.get("request_id", ""))

    def __len__(self) -> int:
        return len(self.index.scores)

    def add(self, records, request_id: str | None = None) -> int:
        """Validate then append; returns how many records this call stored (0 for a replayed id)."""
        recs = validate_batch(records)
        if request_id and request_id in self.request_ids:
            return 0
        extra = {"request_id": request_id} if request_id else {}
        append_lines(self.path, [{**r, **extra} for r in recs])
        for r in recs:
            self.index.add(r)
        if request_id:
            self.request_ids.add(request_id)
        return len(recs)

    def match(self, responses: list[str]) -> list[float]:
        return [self.index.match(r) for r in responses]


def append_lines(path: Path, rows: list[dict]) -> None:
    """Append JSON lines as one `write` under an exclusive lock, then fsync: all of them or (after a
    crash) a torn last line that `cut_torn_tail` removes on the next open."""
    blob = "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")
    with open(path, "ab") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cut_torn_tail(path: Path) -> None:
    """Drop a last line without its newline (what a crash mid-append can leave)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
