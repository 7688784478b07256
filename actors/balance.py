"""Split a prompt batch into chunks of near-equal expected work.

Work of a prompt = its prompt tokens (prefill) + max_new_tokens * n (decode upper bound): a
batch of a few long prompts and many short ones then splits evenly in work, not in count.
"""
from __future__ import annotations

import heapq


def expected_tokens(prompt_lens: list[int], max_new_tokens: int, n: int) -> list[int]:
    return [p + max_new_tokens * n for p in prompt_lens]


def split_balanced(costs: list[int], k: int) -> list[list[int]]:
    """Longest-processing-time-first: row indices in k chunks (fewer if fewer rows), each chunk in
    input order, chunks largest first. Deterministic for the same input."""
    k = max(1, min(k, len(costs)))
    heap = [(0, i) for i in range(k)]
    chunks: list[list[int]] = [[] for _ in range(k)]
    for row in sorted(range(len(costs)), key=lambda r: (-costs[r], r)):
        load, c = heapq.heappop(heap)
        chunks[c].append(row)
        heapq.heappush(heap, (load + costs[row], c))
    loads = [sum(costs[r] for r in ch) for ch in chunks]
    order = sorted(range(k), key=lambda c: -loads[c])
    return [sorted(chunks[c]) for c in order]
