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
    sync: Literal["adapter", "merged"] = Field("adapter", description=(
        "what a weight sync sends the rollout engines. adapter: only the adapter tensors (PEFT's "
        "adapter_model.safetensors, about 2 r (d_in + d_out) values per adapted layer) and vLLM serves the base "
        "model with it as a runtime LoRA adapter (the engines start with enable_lora, max_lora_rank >= r, set "
        "from r by the job config); merged: W + (alpha / r) B A under the base names, the full model's bytes, "
        "for an engine that cannot load LoRA adapters. adapter: what vLLM's CPU and GPU builds support, and a "
        "sync then moves a small fraction of the bytes (benchmarks/RESULTS_memory.md)"))
