"""The learner's torch modules as the config asks for them: activation checkpointing, LoRA
adapters (learner/lora.py) and the HF-named view of their weights that sync and exports use.

The ranks (rank.py), the single-process benchmarks and benchmarks/gpu_check.py build their
models here, so every path runs the same modules.

Activation checkpointing: HF recomputes a decoder layer in the backward only while that layer is
`training`; the learner keeps its models in eval mode (dropout off: the old-policy, reference and
policy passes must score identically), so only the checkpointed layers themselves are flagged
training (`training` is per module: their attention and MLP children stay in eval).
"""
from __future__ import annotations

import torch

from learner.config import LearnerConfig


def enable_checkpointing(model: torch.nn.Module) -> int:
    """Checkpoint every decoder layer (non-reentrant torch.utils.checkpoint), KV cache off.
    Returns the number of checkpointed layers (0: the model has none, nothing changed)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.training = True  # this module only, not its children (see the module docstring)
    return len(layers)


def prepare(model: torch.nn.Module, cfg: LearnerConfig, task: str = "CAUSAL_LM") -> torch.nn.Module:
    """`model` (fp32, eval mode, from from_pretrained) with the config's checkpointing and LoRA.
    `task`: PEFT task type, CAUSAL_LM (policy) or TOKEN_CLS (critic: its value head trains whole)."""
    model.eval()
    if cfg.lora is not None:
        from learner.lora import wrap

        model = wrap(model, cfg.lora, task)
    if cfg.gradient_checkpointing:  # after the wrap, whose eval() would clear the layers' training flag
        enable_checkpointing(model.get_base_model() if is_adapted(model) else model)
    return model


def load_policy(cfg: LearnerConfig, policy_dir: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return prepare(AutoModelForCausalLM.from_pretrained(policy_dir, dtype=dtype), cfg)


def load_critic(cfg: LearnerConfig, critic_dir: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForTokenClassification

    return prepare(AutoModelForTokenClassification.from_pretrained(critic_dir, num_labels=1, dtype=dtype), cfg,
                   task="TOKEN_CLS")


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the optimizer gets: every parameter, or with LoRA the adapters (and a critic's head)."""
    return [p for p in model.parameters() if p.requires_grad]


def is_adapted(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def hf_state_dict(model: torch.nn.Module, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights an HF model (or a vLLM engine) of the base architecture loads: `named` itself for
    a plain model; for a LoRA model, W + (alpha / r) B A under the base names (learner/lora.py)."""
    if not is_adapted(model):
        return named
    from learner.lora import merged_state_dict

    return merged_state_dict(model, named)


def hf_named_params(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(HF name, parameter) of what `hf_state_dict` yields, without computing it (for a manifest:
    the merged weights have their base layers' names and shapes)."""
    if not is_adapted(model):
        return list(model.named_parameters())
    from learner.lora import hf_name

    return [(hf_name(n), p) for n, p in model.named_parameters() if hf_name(n) is not None]


def hf_aliases(model: torch.nn.Module) -> tuple[tuple[str, str], ...]:
    """`contract.weights.tied_aliases` under the names `hf_state_dict` uses."""
    from contract.weights import tied_aliases

    if not is_adapted(model):
        return tied_aliases(model)
    from learner.lora import hf_name

    return tuple((hf_name(a), hf_name(s)) for a, s in tied_aliases(model)
                 if hf_name(a) is not None and hf_name(s) is not None)


def sends_adapter(model: torch.nn.Module, cfg: LearnerConfig) -> bool:
    """True when a weight sync sends the policy's LoRA adapter alone (learner.lora.sync: adapter)."""
    return is_adapted(model) and cfg.lora is not None and cfg.lora.sync == "adapter"


def sync_state_dict(model: torch.nn.Module, named: dict[str, torch.Tensor], cfg: LearnerConfig
                    ) -> dict[str, torch.Tensor]:
    """What a weight sync sends the engines: the LoRA adapter's tensors under PEFT's saved names
    (`sends_adapter`), else `hf_state_dict` (full weights, merged for LoRA)."""
    if sends_adapter(model, cfg):
        from learner.lora import sync_adapter

        return sync_adapter(model, named)
    return hf_state_dict(model, named)


def sync_layout(model: torch.nn.Module, cfg: LearnerConfig) -> tuple[list, tuple, str]:
    """(name, meta tensor) of what `sync_state_dict` yields, its tied aliases and the adapter's
    adapter_config.json ("" for full weights), without gathering anything: what a manifest needs."""
    shape = lambda p: tuple(getattr(p, "ds_shape", p.shape))  # noqa: E731 - ZeRO-3 keeps the full shape aside
    if sends_adapter(model, cfg):
        from learner.lora import adapter_config_json, sync_adapter

        meta = {n: p.new_empty(shape(p), device="meta") for n, p in model.named_parameters() if p.requires_grad}
        return list(sync_adapter(model, meta).items()), (), adapter_config_json(model)
    return [(n, p.new_empty(shape(p), device="meta")) for n, p in hf_named_params(model)], hf_aliases(model), ""


def export_pretrained(model: torch.nn.Module, out_dir, named: dict[str, torch.Tensor]) -> None:
    """An HF safetensors directory of the (merged) weights; with LoRA also the adapter alone in
    `out_dir`/adapter (PEFT's adapter_config.json + adapter_model.safetensors)."""
    if not is_adapted(model):
        model.save_pretrained(out_dir, state_dict=named, safe_serialization=True)
        return
    from learner.lora import save_adapter

    model.get_base_model().save_pretrained(out_dir, state_dict=hf_state_dict(model, named), safe_serialization=True)
    save_adapter(model, named, out_dir / "adapter")
