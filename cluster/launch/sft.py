"""`rlhf train-sft CONFIG [overrides]`: supervised fine-tuning, the stage before the reward model and RL.

The config is `learner.sft_config.SFTConfig` (flat keys: base_model, data, output_dir, ...) plus
where it runs (`device`, `ray`). Everything a user can get wrong is checked here before Ray starts:
the base model must be a causal LM with a tokenizer, every example must load and encode (a
conversation needs the model's chat template), and the batch shape must divide over the ranks. The
fine-tuned model is an HF directory (safetensors + tokenizer + chat template + generation config)
at `output_dir`, written under a temporary name and renamed, ready to be `model.policy` of
`rlhf train` or `base_model` of the next stage.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from cluster.config import RayConfig, load_config
from cluster.errors import JobFailed, UsageError, one_line
from learner.sft_config import SFTConfig


class SFTJobConfig(SFTConfig):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto | cpu | cuda: gloo or NCCL ranks, GPU "
                                                                       "placement; auto: cuda when this machine sees "
                                                                       "a GPU")
    ray: RayConfig = Field(default_factory=RayConfig, description="the Ray cluster the ranks run on (embedded by "
                                                                  "default, as for rlhf train)")

    def sft(self) -> SFTConfig:
        return SFTConfig.model_validate(self.model_dump(exclude={"device", "ray"}))


def check_base_model(d: str) -> None:
    p = Path(d)
    if not (p / "config.json").is_file():
        why = "does not exist" if not p.exists() else "has no config.json"
        raise UsageError(f"base_model: model directory {d} {why}; expected a Hugging Face causal-LM directory")
    archs = json.loads((p / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        raise UsageError(f"base_model: {d} is a {archs[0]}, not a causal LM (*ForCausalLM)")


def sft_command(config: str, overrides: list[str], address: str | None = None) -> int:
    """`rlhf train-sft CONFIG [key=value ...]`."""
    out = run_sft(load_config(config, overrides, model=SFTJobConfig), address)
    print(f"rlhf train-sft: saved {out['output_dir']}: held-out loss {out['eval_loss_before']:.4f} -> "
          f"{out['eval_loss']:.4f} ({out['num_eval']} held-out, {out['num_train']} training examples, "
          f"{out['steps']} steps, {out['wall_s']:.0f}s)")
    return 0


def run_sft(job: SFTJobConfig, address: str | None = None) -> dict:
    """The SFT stage (`rlhf train-sft`, and the demo's first stage): the base model and every example
    checked before any actor starts, then DeepSpeed ranks on the embedded or attached cluster; the
    summary `learner.sft.train_sft` returns. Raises UsageError (bad input) or JobFailed, one line each."""
    from contract.devices import resolve_device
    from learner.sft import SFTDataError, load_examples

    cfg = job.sft()
    check_base_model(cfg.base_model)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(cfg.base_model)
    try:
        examples = load_examples(cfg, tok)  # every example loads and encodes before any actor starts
    except SFTDataError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:  # too few examples; a DatasetError (also a ValueError) is reported as it is
        if type(e) is not ValueError:
            raise
        raise UsageError(str(e)) from None
    device = resolve_device(job.device)
    import ray

    from cluster.launch.ray_session import connect
    from learner.sft import train_sft

    session = connect(job.ray, address, device.actor_env(threads=1), cpus_needed=cfg.num_ranks * cfg.cpus_per_rank)
    try:
        try:
            out = train_sft(cfg, device, log=lambda m: print(f"rlhf train-sft: {m}", flush=True),
                            namespace=job.ray.namespace, examples=examples)
        except RuntimeError as e:  # a rank died, a collective failed, DeepSpeed init failed
            raise JobFailed(f"sft failed: {one_line(e)}; nothing was written to {cfg.output_dir}") from None
    finally:
        if session.started_here:
            ray.shutdown()
    return out
