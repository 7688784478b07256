"""The policy's LoRA adapter as a vLLM engine serves it: a PEFT adapter directory per version.

A weight sync with `adapter` set (contract/weights.py) brings the adapter's tensors under PEFT's
saved names and its adapter_config.json, not the model's weights. vLLM loads runtime LoRA adapters
from a directory, so each version is written to this process's temporary directory (staged and
renamed in: never seen half written), loaded into the engine under the LoRA id = its policy
version, and every request is served with it; the previous version is unloaded and its directory
deleted. `lora_engine_kwargs` gives the engine arguments that make room for it.
"""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from contract.atomic import staged_dir


def lora_engine_kwargs(rank: int) -> dict:
    """vLLM's runtime-LoRA arguments for adapters of rank `rank` ({} for 0: LoRA off): one adapter at a
    time (the current policy), max_lora_rank the smallest size vLLM accepts >= rank (it takes only
    1, 8, 16, 32, ...)."""
    if not rank:
        return {}
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    sizes = [s for s in get_args(MaxLoRARanks) if s >= rank]
    if not sizes:
        raise ValueError(f"rollout.engine.lora_rank: vLLM serves LoRA ranks up to {max(get_args(MaxLoRARanks))} "
                         f"(got {rank}); set learner.lora.sync=merged to send merged weights instead")
    return {"enable_lora": True, "max_lora_rank": sizes[0], "max_loras": 1}


class AdapterSlot:
    """The adapter an engine currently serves (`request`: a vLLM LoRARequest, None before the first
    adapter sync: the base model as loaded), and the directories behind it."""

    def __init__(self):
        self._root = tempfile.TemporaryDirectory(prefix="rlhf-lora-")  # removed when the worker exits
        self.request = None

    def load(self, llm, version: int, named: Iterable[tuple[str, torch.Tensor]], config_json: str) -> None:
        """Write `named` + `config_json` as a PEFT adapter directory, load it into `llm` as LoRA id
        `version` (now, so a bad adapter fails the sync and not the next generate), serve it from
        here on, then unload and delete the previous version."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        final = Path(self._root.name) / f"v{version}"
        with staged_dir(final) as tmp:  # clones: received tensors may share one buffer or be read-only
            save_file({n: t.detach().to("cpu", copy=True).contiguous() for n, t in named},
                      str(tmp / "adapter_model.safetensors"))
            (tmp / "adapter_config.json").write_text(config_json)
        request = LoRARequest(f"policy-v{version}", version, str(final))
        llm.llm_engine.add_lora(request)
        old, self.request = self.request, request
        if old is not None:
            llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
