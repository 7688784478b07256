"""Built-in reward functions (batched: `fn(prompts, responses) -> list[float]`).

`colour_fraction` is the gold score of the demo task: the share of a response's words that are
colour names. It is the stand-in for what human labellers prefer: the demo trains a reward model
on preference pairs ranked by it, runs PPO against that model, and reports this gold score
beside the model's (proxy) reward so reward hacking would be visible.
"""
from __future__ import annotations

import re

COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white")
FILLER = ("the", "cat", "dog", "runs", "jumps", "over", "a", "lazy", "fox", "quick", "model", "weight",
          "train", "step", "rank", "ray", "actor", "token", "hello", "world", "sky", "sea", "tree", "house",
          "is", "and", "with", "under", "big", "small", "happy", "sad", "river", "stone", "bird", "song")
_WORD = re.compile(r"[a-z]+")


def colour_fraction(prompts: list[str], responses: list[str]) -> list[float]:
    """Fraction of words in each response that are colour names (0 for a response with no words)."""
    out = []
    for r in responses:
        words = _WORD.findall(r.lower())
        out.append(sum(w in COLOURS for w in words) / len(words) if words else 0.0)
    return out
