"""`rlhf generate CHECKPOINT PROMPTS`: see what a model says, sampled on the rollout stack.

CHECKPOINT is a Hugging Face model directory (the base model, an `rlhf train-sft` output, a run
checkpoint's `learner/policy` export), a run checkpoint (`RUN/ckpt/step=N`) or a run directory
(its latest checkpoint). PROMPTS is a prompt file in any format `data.prompts` takes (chat
`messages` are rendered with the checkpoint's chat template), or a literal prompt text (sent as one
user message when the checkpoint has a chat template). Samples come from the same `RolloutEngine`
(vLLM) the rollout workers run, in this process; with `--reward-model` each is scored by the same
`RewardModel` code the reward service runs (in the RM's own chat template). Output: printed, and
with `--out FILE.jsonl` written atomically, one JSON object per sample.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from cluster.errors import UsageError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def resolve_checkpoint(path: str) -> Path:
    """The HF model directory CHECKPOINT names (see the module docstring)."""
    from cluster.outputs.run_dir import RunDir

    p = Path(path)
    if (p / "config.json").is_file():
        return p
    if (p / "learner" / "policy" / "config.json").is_file():
        return p / "learner" / "policy"
    if (p / "ckpt").is_dir():
        latest = RunDir(p).latest_checkpoint()
        if latest is not None and (latest / "learner" / "policy" / "config.json").is_file():
            return latest / "learner" / "policy"
        raise UsageError(f"CHECKPOINT {path}: a run directory without a complete checkpoint")
    why = "does not exist" if not p.exists() else "is not a model directory (no config.json), a run checkpoint or a run"
    raise UsageError(f"CHECKPOINT {path} {why}")


def read_prompts(spec: str, tok, columns=None):
    """A prompt table from a file/directory, or from one literal prompt text."""
    import pyarrow as pa

    from contract import chat
    from contract.datasets import load_prompts

    p = Path(spec)
    if p.exists() or p.suffix.lower() in DATA_SUFFIXES:
        return load_prompts(p, columns, tokenizer=tok)
    if chat.has_template(tok):
        conv = [{"role": "user", "content": spec}]
        return pa.table({"prompt_id": ["0"], "prompt": [chat.render(tok, conv, add_generation_prompt=True)],
                         "messages": [chat.to_json(conv)]})
    return pa.table({"prompt_id": ["0"], "prompt": [spec], "messages": pa.nulls(1, pa.string())})


def generate_command(checkpoint: str, prompts: str, n: int = 1, max_new_tokens: int = 64, temperature: float = 1.0,
                     top_p: float = 1.0, seed: int | None = 0, limit: int | None = None, out: str | None = None,
                     reward_model: str | None = None, max_model_len: int = 2048, dtype: str = "float32",
                     columns=None, quiet: bool = False) -> int:
    from contract.devices import resolve_device

    device = resolve_device("auto")
    for k, v in device.actor_env(threads=os.cpu_count() or 1).items():
        os.environ.setdefault(k, v)  # before vLLM/torch start their thread pools
    if dtype == "auto":  # what rollout.engine.dtype auto means: the device profile's measured choice
        choice = device.dtype_choice()
        dtype = choice.dtype
        print(f"rlhf generate: dtype: {choice.summary()}", flush=True)
    model_dir = resolve_checkpoint(checkpoint)
    if reward_model is not None and not (Path(reward_model) / "config.json").is_file():
        raise UsageError(f"--reward-model {reward_model}: not a model directory (no config.json)")
    if out is not None and not out.endswith(".jsonl"):
        raise UsageError(f"--out {out}: expected a .jsonl file")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(model_dir)
    table = read_prompts(prompts, tok, columns)
    if limit is not None:
        table = table.slice(0, limit)
    from actors.config import EngineConfig, SamplingConfig
    from actors.engine import RolloutEngine
    from actors.prompts import PromptError
    from contract import chat
    from contract.experience import attach_prompt_columns

    ids = chat.encode_prompts(tok, table.column("prompt").to_pylist(), table.column("messages").to_pylist())
    longest = max(len(x) for x in ids)
    if longest >= max_model_len:
        raise UsageError(f"PROMPTS: the longest prompt has {longest} tokens; raise --max-model-len "
                         f"(now {max_model_len})")
    import pyarrow as pa

    table = table.append_column("prompt_ids", pa.array(ids, pa.list_(pa.int32())))
    sampling = SamplingConfig(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    engine = RolloutEngine(str(model_dir), EngineConfig(dtype=dtype, max_model_len=max_model_len), device)
    try:
        rows = attach_prompt_columns(pa.Table.from_batches([engine.generate(table, sampling, 0, "generate")]), table)
    except PromptError as e:
        raise UsageError(str(e)) from None
    rewards = [None] * rows.num_rows
    if reward_model is not None:
        from reward_service.model import RewardModel

        rm = RewardModel(reward_model, max_length=max_model_len)
        rewards = rm.score(rows.column("prompt").to_pylist(), rows.column("response").to_pylist(),
                           rows.column("messages").to_pylist()).tolist()
    records = [{"prompt_id": r["prompt_id"], "sample_idx": r["sample_idx"], "prompt": r["prompt"],
                "messages": json.loads(r["messages"]) if r["messages"] else None, "response": r["response"],
                "finish_reason": r["finish_reason"], "response_tokens": len(r["response_ids"]), "reward": rw}
               for r, rw in zip(rows.to_pylist(), rewards)]
    if out is not None:
        from contract.atomic import write_atomically

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_atomically(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    if not quiet:
        for r in records:
            score = "" if r["reward"] is None else f"  reward {r['reward']:+.4f}"
            print(f"--- {r['prompt_id']}#{r['sample_idx']}  ({r['finish_reason']}, {r['response_tokens']} tokens){score}")
            print(f"prompt:   {r['prompt']!r}")
            print(f"response: {r['response']!r}")
    stopped = sum(r["finish_reason"] == "stop" for r in records)
    summary = (f"rlhf generate: {len(records)} samples from {model_dir}: {stopped} ended at end of turn/EOS, "
               f"{len(records) - stopped} cut at --max-new-tokens={max_new_tokens}")
    if reward_model is not None:
        summary += f"; mean reward {sum(rewards) / len(rewards):+.4f}"
    print(summary + (f"; written to {out}" if out else ""))
    return 0
