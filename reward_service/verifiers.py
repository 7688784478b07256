"""Verifiers: a response checked against the prompt's reference answer, in a pool of processes.

Built-ins (`reward.verifier.name`):
- `math`: `math-verify` (Hugging Face) parses the reference and the response (LaTeX, plain
  numbers, expressions) and compares them symbolically: 1.0 if equal, else 0.0.
- `exact`: 1.0 if the response equals the reference after trimming and collapsing whitespace.
- `lcs`: 2 * LCS(response, reference) / (len(response) + len(reference)), the longest common
  subsequence of characters: partial credit for near misses (reverse-text).

Why processes: math-verify bounds its own parsing with SIGALRM, and signals work only on a
process's main thread; inside a Ray actor or a Serve replica a verifier runs on some other thread,
where other systems saw it score a silent 0 or hang. Here each call runs in a worker process of a
`pebble.ProcessPool` (spawned, so no Ray or torch state is forked), on that process's main thread,
with a hard per-call timeout: a call past `timeout_s` has its process killed and replaced. A call
that times out or raises is never a silent 0: its value is NaN (the reward row is invalid, so it is
not trained on) and its outcome, `timeout` or `error`, is recorded per sample with the verifier's
name and version, and counted in the step's metrics.
"""
from __future__ import annotations

import importlib.metadata
import multiprocessing
import re
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np

OK, TIMEOUT, ERROR = "ok", "timeout", "error"
_SPACE = re.compile(r"\s+")


def verify_math(response: str, reference: str) -> float:
    from math_verify import parse, verify

    gold = parse(reference)
    if not gold:
        raise ValueError(f"math verifier: the reference {reference[:60]!r} has no parsable answer")
    return 1.0 if verify(gold, parse(response)) else 0.0


def verify_exact(response: str, reference: str) -> float:
    return 1.0 if _SPACE.sub(" ", response).strip() == _SPACE.sub(" ", reference).strip() else 0.0


def lcs_length(a: str, b: str) -> int:
    """Longest common subsequence of characters (dynamic programming over one row)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for ca in a:
        prev = 0
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if ca == cb else max(row[j], row[j - 1])
    return row[-1]


def verify_lcs(response: str, reference: str) -> float:
    r, g = response.strip(), reference.strip()
    return 2.0 * lcs_length(r, g) / (len(r) + len(g)) if r or g else 1.0


VERIFIERS = {"math": (verify_math, "math-verify"), "exact": (verify_exact, None), "lcs": (verify_lcs, None)}


def verifier_version(name: str) -> str:
    """`name` plus the version of the package it runs on, e.g. 'math (math-verify 0.9.0)'."""
    fn, package = VERIFIERS[name]
    if package is None:
        from importlib.metadata import version

        return f"{name} (rlhf-actor-learner {version('rlhf-actor-learner')})"
    return f"{name} ({package} {importlib.metadata.version(package)})"


def _run(fn, response: str, reference: str) -> float:
    """What a worker process runs: one verifier call on its main thread."""
    return float(fn(response, reference))


@dataclass
class Verified:
    values: np.ndarray     # float64 per sample; NaN where the outcome is not `ok`
    outcomes: list[str]    # ok | timeout | error per sample
    errors: list[str]      # a few messages, for the step's log


class VerifierPool:
    """`verify(responses, references)` over `processes` spawned workers, `timeout_s` per call."""

    def __init__(self, name: str, timeout_s: float, processes: int, fn=None):
        """`fn`: a module-level function to run instead of the built-in `name` (tests inject faults)."""
        if name not in VERIFIERS:
            raise ValueError(f"reward.verifier.name: unknown verifier {name!r}; expected one of {sorted(VERIFIERS)}")
        self.name, self.timeout_s, self.processes = name, timeout_s, processes
        self.fn = fn or VERIFIERS[name][0]
        self.version = verifier_version(name)
        self._pool = None
        self._lock = threading.Lock()

    def _get_pool(self):
        from pebble import ProcessPool

        with self._lock:
            if self._pool is None or not self._pool.active:
                self._pool = ProcessPool(max_workers=self.processes, context=multiprocessing.get_context("spawn"))
            return self._pool

    def verify(self, responses: list[str], references: list[str | None]) -> Verified:
        pool = self._get_pool()
        n = len(responses)
        values, outcomes, errors = np.full(n, np.nan), [ERROR] * n, []
        futures = {}
        for i, (resp, ref) in enumerate(zip(responses, references)):
            if ref is None:
                errors.append(f"verifier:{self.name}: sample {i} has no reference answer")
                continue
            futures[i] = pool.schedule(_run, args=(self.fn, resp, ref), timeout=self.timeout_s)
        for i, fut in futures.items():
            try:
                # pebble's timeout counts from when the call starts; the extra margin covers its queue
                values[i] = fut.result(timeout=self.timeout_s * (1 + n / self.processes) + 30)
                outcomes[i] = OK
            except (FutureTimeout, TimeoutError):
                fut.cancel()
                outcomes[i] = TIMEOUT
                errors.append(f"verifier:{self.name}: sample {i} timed out after {self.timeout_s:g}s (process killed)")
            except Exception as e:  # noqa: BLE001 - the verifier's own failure, recorded per sample
                errors.append(f"verifier:{self.name}: sample {i}: {type(e).__name__}: {str(e)[:120]}")
        return Verified(values, outcomes, errors)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.stop()
                self._pool.join(timeout=10)
                self._pool = None
