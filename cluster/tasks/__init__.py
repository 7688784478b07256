"""Verifiable tasks: prompt files with a reference `answer` per prompt, made from a seed.

Each task writes `train.jsonl` and `heldout.jsonl` (rows: `id`, `messages` with one user turn,
`answer`), disjoint by construction: every problem has a key (its template and numbers, or its
text), a key is hashed into exactly one split, and no held-out key ever appears in train. The
verifier that scores a task's answers is named beside it (`reward.verifier.name`).

| task | prompt | answer | verifier |
|---|---|---|---|
| arithmetic | a one- or two-step word problem over small integers | the number | math (math-verify) |
| reverse_text | reverse a few common words character by character | the reversed text | lcs |

`rlhf make-task NAME OUT_DIR [--train N] [--heldout M] [--seed S]` writes them.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from contract.atomic import write_atomically

Problem = tuple[str, str, str]  # (key, question, answer)


def split_of(key: str, heldout_share: float) -> str:
    """'heldout' or 'train', a pure function of the problem's key (the same on every machine)."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "heldout" if h < heldout_share else "train"


def collect(problems: Iterator[Problem], n_train: int, n_heldout: int, heldout_share: float,
            task: str) -> dict[str, list[dict]]:
    """Draw problems until both splits are full; a key is used once and lands in one split."""
    want = {"train": n_train, "heldout": n_heldout}
    out: dict[str, list[dict]] = {"train": [], "heldout": []}
    seen: set[str] = set()
    for tries, (key, question, answer) in enumerate(problems):
        if tries > 200 * (n_train + n_heldout) + 10_000:
            raise ValueError(f"{task}: only {len(out['train'])} train / {len(out['heldout'])} held-out distinct "
                             f"problems could be drawn; ask for fewer")
        if key in seen:
            continue
        seen.add(key)
        split = split_of(key, heldout_share)
        if len(out[split]) < want[split]:
            out[split].append({"id": f"{task}-{split}-{len(out[split])}", "key": key,
                               "messages": [{"role": "user", "content": question}], "answer": answer})
        if all(len(out[s]) >= want[s] for s in out):
            return out
    raise ValueError(f"{task}: the generator ran out of problems")


def tasks() -> dict[str, Callable[[int], Iterator[Problem]]]:
    from cluster.tasks.arithmetic import arithmetic_problems
    from cluster.tasks.reverse_text import reverse_text_problems

    return {"arithmetic": arithmetic_problems, "reverse_text": reverse_text_problems}


def make_task(name: str, out_dir: str | Path, n_train: int = 2000, n_heldout: int = 200, seed: int = 0,
              heldout_share: float = 0.2) -> dict[str, Path]:
    """Write OUT_DIR/train.jsonl and OUT_DIR/heldout.jsonl; returns their paths."""
    gens = tasks()
    if name not in gens:
        raise ValueError(f"make-task: unknown task {name!r}; expected one of {sorted(gens)}")
    splits = collect(gens[name](seed), n_train, n_heldout, heldout_share, name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in splits.items():
        paths[split] = out / f"{split}.jsonl"
        write_atomically(paths[split], "".join(json.dumps(r) + "\n" for r in rows))
    return paths
