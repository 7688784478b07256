"""LoRA with PEFT: the adapted model, its frozen base as the KL reference, merged HF weights.

* Only the adapters train (`wrap`): A and B of every targeted linear layer, plus a critic's new
  value head (PEFT's TOKEN_CLS task keeps `score`/`classifier` trainable as modules_to_save).
* The reference is the same module with its adapters switched off (`AdapterOff`, PEFT's
  `disable_adapter()` around the forward): no second copy of the model in memory.
* The engines get the adapter alone (`learner.lora.sync: adapter`, the default): its tensors under
  PEFT's saved names (`sync_adapter`) plus its adapter_config.json (`adapter_config_json`), and
  vLLM serves the base model with it as a runtime LoRA adapter; or, with `sync: merged`, merged
  weights under the base names (`merged_state_dict`: W + (alpha / r) B A per adapted layer). Both
  are computed from the gathered parameters on rank 0 and travel over the existing transports
  (contract/weights.py); the bytes per sync are in benchmarks/RESULTS_memory.md.
* The HF export always gets the merged weights, plus the adapter alone (`save_adapter`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from learner.lora_config import LoraConfig

ADAPTER = "default"  # PEFT's name of the one adapter
_PREFIX = "base_model.model."


def wrap(model: torch.nn.Module, cfg: LoraConfig, task: str = "CAUSAL_LM") -> torch.nn.Module:
    """A PEFT model whose only trainable parameters are the adapters (and a TOKEN_CLS head)."""
    import peft

    head = ["score", "classifier"] if task == "TOKEN_CLS" else None  # trained whole (modules_to_save), no adapter
    lora = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type=task,
                           target_modules=cfg.target_modules, exclude_modules=head, bias="none")
    try:
        adapted = peft.get_peft_model(model, lora)
    except ValueError as e:  # e.g. a target module name the architecture does not have
        raise ValueError(f"learner.lora.target_modules {cfg.target_modules!r}: {str(e).splitlines()[0]}") from None
    adapted.eval()
    if cfg.dropout > 0:  # the learner runs in eval mode: only the adapters' dropout is switched on
        for name, m in adapted.named_modules():
            if ".lora_dropout." in name + "." and isinstance(m, torch.nn.Dropout):
                m.train()
    return adapted


def hf_name(name: str) -> str | None:
    """The base model's name of a PEFT parameter, None for adapter weights and for the frozen
    original of a modules_to_save head (the trained copy takes its name)."""
    if ".lora_" in name or ".original_module." in name:
        return None
    return name.removeprefix(_PREFIX).replace(".base_layer.", ".").replace(f".modules_to_save.{ADAPTER}.", ".")


def _lora_layers(model: torch.nn.Module):
    from peft.tuners.lora import LoraLayer

    for name, m in model.named_modules():
        if isinstance(m, LoraLayer) and ADAPTER in m.lora_A:
            yield name, m


def merged_state_dict(model: torch.nn.Module, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF-named weights with every adapter folded in, from `named` (the PEFT model's parameters by
    name, e.g. gathered from ZeRO-3 shards): W + scaling B A (transposed for fan_in_fan_out)."""
    deltas = {}
    for name, m in _lora_layers(model):
        a, b = named[f"{name}.lora_A.{ADAPTER}.weight"], named[f"{name}.lora_B.{ADAPTER}.weight"]
        delta = (b.float() @ a.float()) * m.scaling[ADAPTER]
        deltas[f"{name}.base_layer.weight"] = delta.T if m.fan_in_fan_out else delta
    out = {}
    for n, t in named.items():
        base = hf_name(n)
        if base is not None:
            out[base] = (t.float() + deltas[n]).to(t.dtype) if n in deltas else t
    return out


def adapter_state_dict(model: torch.nn.Module, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trainable weights only, under PEFT's saved names (what `save_adapter` writes)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t for n, t in named.items() if n in trainable}


def sync_adapter(model: torch.nn.Module, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The policy adapter's tensors under PEFT's saved names (the adapter name dropped: what
    adapter_model.safetensors holds and vLLM loads), from `named` (the PEFT model's parameters by
    name; meta tensors give the names and shapes for a manifest)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, state_dict=adapter_state_dict(model, named), adapter_name=ADAPTER,
                                     save_embedding_layers=False)


def adapter_config_json(model: torch.nn.Module) -> str:
    """The adapter's adapter_config.json text, as PEFT's save_pretrained writes it (sets as lists)."""
    cfg = model.peft_config[ADAPTER].to_dict()
    return json.dumps(cfg, indent=2, sort_keys=True, default=lambda v: sorted(v) if isinstance(v, set) else str(v))


def save_adapter(model: torch.nn.Module, named: dict[str, torch.Tensor], out_dir: Path) -> None:
    """PEFT's adapter directory (adapter_config.json + adapter_model.safetensors) of `named`."""
    model.save_pretrained(str(out_dir), state_dict=dict(named), safe_serialization=True)


class AdapterOff:
    """The frozen base model as a callable module: `model(**inputs)` with the adapters disabled.
    Used as the KL reference, so the reference costs no memory beyond the policy's own weights."""

    def __init__(self, engine, peft_model: torch.nn.Module):
        self.engine, self.peft_model = engine, peft_model  # engine: what to call (DeepSpeed or the module)

    def __call__(self, **inputs):
        with self.peft_model.disable_adapter():
            return self.engine(**inputs)


def reference(engine, model: torch.nn.Module):
    """The KL reference a LoRA policy needs (`AdapterOff`), None for a plain model."""
    return AdapterOff(engine, model) if hasattr(model, "peft_config") else None

