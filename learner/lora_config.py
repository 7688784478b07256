"""The `learner.lora` config section: low-rank adapters (PEFT LoRA) instead of full fine-tuning.

Its own module so learner/config.py only names it; the mechanism is learner/lora.py.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from contract.config_base import Section


class LoraConfig(Section):
    """W' = W + (alpha / r) B A on every targeted linear layer; only A and B (and, for the PPO
    critic, its new value head) train, the base weights stay frozen and serve as the KL reference."""

    r: int = Field(16, ge=1, description=(
        "rank of each adapter (columns of B, rows of A). 16: a common RLHF/instruction-tuning value; "
        "8-64 are usual, larger follows full fine-tuning more closely at more memory"))
    alpha: float = Field(32.0, gt=0, description=(
        "LoRA alpha: the update is scaled by alpha / r (unitless). 32 = 2 r: the usual ratio, so lr means "
        "about the same when r changes"))
    dropout: float = Field(0.0, ge=0, lt=1, description=(
        "dropout on the adapter's input (a probability). 0: RL needs deterministic logprobs (a dropout mask "
        "differing between the old-policy and the policy pass makes the PPO ratio noise), as TRL's PPO does"))
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description=(
        "module names (suffixes, e.g. [q_proj, v_proj]) that get an adapter, or all-linear: every linear "
        "layer but the output head (PEFT's shorthand). all-linear: works on any architecture and is what "
        "QLoRA found to match full fine-tuning"))
