"""Reward and gold functions for tests/test_cluster_loop.py, imported by the reward replicas by path
(`support_rewards:flat_or_colour`): not a test module."""
import zlib

from reward_service.functions import colour_fraction


def flat_or_colour(prompts: list[str], responses: list[str]) -> list[float]:
    """0.5 for any response to a prompt containing "flat" (a group with no signal); otherwise a value
    that differs between any two different responses (colour share plus a hash of the text)."""
    colour = colour_fraction(prompts, responses)
    return [0.5 if "flat" in p else c + zlib.crc32(r.encode()) / 2**32 for p, r, c in zip(prompts, responses, colour)]


def colour_only(prompts: list[str], responses: list[str]) -> list[float]:
    return colour_fraction(prompts, responses)


def nan_scores(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward that cannot score: NaN for every response (the fault, named), so the reward service's
    output checks mark every row invalid and a job's start-up probe fails."""
    return [float("nan")] * len(responses)
