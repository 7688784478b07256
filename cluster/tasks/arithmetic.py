"""Arithmetic word problems over small integers, drawn from a seed (GSM8K's shape, one or two steps).

Every problem's key is its template and numbers, so two problems that differ only in the name or
the object counted are the same problem for the train/held-out split: the held-out set tests
arithmetic the policy never trained on, not memorised answers under other names.
"""
from __future__ import annotations

import random
from collections.abc import Iterator

NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena", "Mo",
         "Nia", "Omar", "Pia", "Raj", "Sara", "Tom", "Uma")
THINGS = ("apples", "pencils", "stickers", "marbles", "books", "coins", "cookies", "cards", "shells", "stamps")
SUFFIX = " Answer with just the final number."


def _templates(rng: random.Random):
    """(template id, question, answer) makers; numbers are drawn inside each."""
    def add():
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        return f"add:{a}:{b}", "{n} has {a} {t}. {n} gets {b} more. How many {t} does {n} have now?", a, b, a + b

    def sub():
        a = rng.randint(10, 80)
        b = rng.randint(1, a - 1)
        return f"sub:{a}:{b}", "{n} had {a} {t} and gave {b} of them away. How many {t} does {n} have left?", a, b, a - b

    def mul():
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"mul:{a}:{b}", "{n} has {a} bags with {b} {t} in each bag. How many {t} does {n} have in all?", a, b, a * b

    def div():
        b, q = rng.randint(2, 10), rng.randint(2, 12)
        return (f"div:{b * q}:{b}", "{n} shares {a} {t} equally among {b} friends. How many {t} does each friend get?",
                b * q, b, q)

    def two_step():
        a, b, c = rng.randint(5, 40), rng.randint(2, 30), rng.randint(1, 20)
        c = min(c, a + b - 1)
        return (f"two:{a}:{b}:{c}", "{n} has {a} {t}, buys {b} more, then gives away {c}. How many {t} does {n} "
                "have now?", a, b, a + b - c, c)

    return (add, sub, mul, div, two_step)


def arithmetic_problems(seed: int) -> Iterator[tuple[str, str, str]]:
    """An endless stream of (key, question, answer) from `seed`."""
    rng = random.Random(seed)
    makers = _templates(rng)
    while True:
        made = rng.choice(makers)()
        key, text, a, b, answer = made[:5]
        c = made[5] if len(made) > 5 else None
        question = text.format(n=rng.choice(NAMES), t=rng.choice(THINGS), a=a, b=b, c=c) + SUFFIX
        yield key, question, str(answer)
