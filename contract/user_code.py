"""User code named in a config as `package.module:function`: the one loader, with one-line errors.

Reward functions (`reward.functions[].path`) and gold scores (`loop.gold_function`) share the
batched signature `fn(prompts: list[str], responses: list[str]) -> list[float]`.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable

ScoreFn = Callable[[list[str], list[str]], list[float]]


def load_function(path: str, key: str) -> ScoreFn:
    """`package.module:function` -> the callable, or a ValueError naming the config `key`."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{key}: cannot import module {module_name!r} for {path!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{key}: {path!r} is not a callable in module {module_name!r}")
    return fn
