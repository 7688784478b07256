"""Reverse-text: write a few common words backwards, character by character.

The answer is the reversed text; the `lcs` verifier scores a response by its longest common
subsequence with it (2 * LCS / (len(a) + len(b)): partial credit for near misses), the reward other
RL systems use for this task. The key is the text itself.
"""
from __future__ import annotations

import random
from collections.abc import Iterator

WORDS = ("cat", "dog", "sun", "tree", "blue", "river", "stone", "green", "light", "house", "music", "paper",
         "water", "apple", "cloud", "bread", "chair", "smile", "train", "grass", "ocean", "night", "dream",
         "table", "happy", "small", "quick", "brown", "fox", "red", "moon", "star", "book", "road", "wind")
PROMPT = "Reverse the following text character by character and reply with only the reversed text: {text}"


def reverse_text_problems(seed: int) -> Iterator[tuple[str, str, str]]:
    """An endless stream of (key, question, answer) from `seed`: 2-3 words, reversed."""
    rng = random.Random(seed)
    while True:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 3)))
        yield text, PROMPT.format(text=text), text[::-1]
