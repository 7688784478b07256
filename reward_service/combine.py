"""Reward functions by import path, the output checks, and the weighted combination of parts.

reward = (1 - alpha) * (model_weight * model + sum_i w_i * fn_i) + alpha * feedback
(the human-feedback fusion r = a*r_feedback + (1-a)*r_model, with r_model the weighted sum).
A row whose model score or any function value is NaN/inf, or whose function returned a list of
the wrong length, is invalid: reward 0, reward_valid False, and the reason lands in `errors`.
Parts keep the raw values (NaN included) so the controller can log what went wrong.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from contract.user_code import ScoreFn as RewardFn


@dataclass
class Scored:
    """One request's result: float32 rewards, validity flags, raw parts, error messages."""

    reward: np.ndarray
    valid: np.ndarray
    parts: dict[str, np.ndarray]
    errors: list[str] = field(default_factory=list)


def call_function(name: str, fn: RewardFn, prompts: list[str], responses: list[str]) -> tuple[np.ndarray, str | None]:
    """Values (NaN where unusable) and an error message when the count is wrong."""
    out = fn(prompts, responses)
    try:
        values = np.asarray(out, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return np.full(len(prompts), np.nan), f"reward function {name} returned non-numeric values"
    if values.shape[0] != len(prompts):
        return (np.full(len(prompts), np.nan),
                f"reward function {name} returned {values.shape[0]} values for {len(prompts)} pairs")
    return values, None


def combine(n: int, weighted: dict[str, tuple[np.ndarray, float]], feedback: np.ndarray | None,
            alpha: float, errors: list[str]) -> Scored:
    """Weighted sum of the parts, fused with feedback; non-finite rows become invalid (reward 0)."""
    base = np.zeros(n, dtype=np.float64)
    finite = np.ones(n, dtype=bool)
    parts = {}
    errors = list(errors)
    for name, (values, weight) in weighted.items():
        parts[name] = values
        ok = np.isfinite(values)
        if not ok.all() and not any(name in e for e in errors):
            errors.append(f"{name}: {int((~ok).sum())} of {n} values are NaN/inf")
        finite &= ok
        base += weight * np.where(ok, values, 0.0)
    if feedback is not None:
        parts["feedback"] = feedback
        finite &= np.isfinite(feedback)
        base = alpha * np.where(np.isfinite(feedback), feedback, 0.0) + (1.0 - alpha) * base
    reward = base.astype(np.float32)
    valid = finite & np.isfinite(reward)
    reward[~valid] = 0.0
    return Scored(reward=reward, valid=valid, parts=parts, errors=errors)
