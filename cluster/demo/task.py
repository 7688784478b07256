"""The built-in demo (`rlhf train` with no config): a whole RLHF pipeline on tiny local models.

The task has a known gold score, `colour_fraction` (share of a response's words that are colour
names), standing in for what human labellers want. The pipeline is the real one:
  1. tiny random-init policy + reward model and a tokenizer, built locally;
  2. synthetic preference pairs ranked by the gold score: the "human labels";
  3. supervised fine-tuning on demonstrations (what `rlhf train-sft` runs, on DeepSpeed ranks in
     an embedded Ray session of its own): the pairs' preferred responses whose gold score is >= 0.5,
     standing in for what labellers write;
  4. a reward model trained on the pairs (Bradley-Terry, what `rlhf train-rm` runs);
  5. PPO from the SFT model against that reward model, served by the reward service, with a KL to
     the SFT model as the reference.
SFT first is how the papers do it, and it helps here: from the raw policy PPO reached gold 0.92 in
60 steps; from the SFT model (gold ~0.85 before any RL) it reached 1.0 by step 29 (session 7's
measurement). `benchmarks/learning.py` builds the demo with `sft=False`, so its table compares the
RL algorithms from the weak start where their differences show.
The responses in the pairs look like what the random-init policy emits (random tokens of the tiny
tokenizer) with colour words mixed in at every rate, so the reward model generalises to the
policy's own samples from the first step to the last.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from cluster.demo.tiny_models import make_tiny_models, synthetic_corpus
from contract.atomic import write_atomically
from reward_service.functions import COLOURS, colour_fraction

GOLD = "reward_service.functions:colour_fraction"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def demo_prompts(n: int = 64, seed: int = 0) -> list[dict]:
    return [{"id": f"p{i}", "prompt": " ".join(line.split()[:4])}
            for i, line in enumerate(synthetic_corpus(n_lines=n, seed=seed + 1))]


def policy_like_response(rng: random.Random, tokenizer, colour_share: float, length: int) -> str:
    """Random tokens of the policy's vocabulary, each replaced by a colour word with `colour_share`."""
    first_regular = len(tokenizer.all_special_ids)
    pieces = [" " + rng.choice(COLOURS) if rng.random() < colour_share
              else tokenizer.decode([rng.randrange(first_regular, len(tokenizer))]) for _ in range(length)]
    return "".join(pieces)


def preference_pairs(tokenizer, prompts: list[str], n_pairs: int, max_tokens: int, seed: int = 0) -> list[dict]:
    """Pairs whose `chosen` has the higher gold score: the labels a human would have given."""
    rng = random.Random(seed)
    rows: list[dict] = []
    while len(rows) < n_pairs:
        prompt = rng.choice(prompts)
        a, b = (policy_like_response(rng, tokenizer, rng.random() ** rng.choice([0.5, 1, 2]),
                                     rng.randint(max_tokens // 2, max_tokens)) for _ in range(2))
        ga, gb = colour_fraction([prompt, prompt], [a, b])
        if abs(ga - gb) < 0.05:
            continue
        chosen, rejected = (a, b) if ga > gb else (b, a)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def train_demo_reward_model(models: dict[str, Path], pairs: Path, out: Path) -> float:
    import torch

    from reward_service.config import RewardModelTrainConfig
    from reward_service.train_rm import train_reward_model

    # A tiny model gains nothing from a second thread, and on a busy 2-core box OpenMP threads
    # waiting on each other made this step ~100x slower.
    torch.set_num_threads(1)
    cfg = RewardModelTrainConfig(base_model=str(models["reward"]), data=str(pairs), output_dir=str(out),
                                 epochs=2, batch_size=32, lr=3e-3, max_length=64)
    return float(train_reward_model(cfg)["eval_accuracy"])


def demonstrations(pairs: list[dict]) -> list[dict]:
    """SFT examples (prompt, response): the preferred responses of the pairs whose gold score is >= 0.5."""
    gold = colour_fraction([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    return [{"prompt": p["prompt"], "response": p["chosen"]} for p, g in zip(pairs, gold) if g >= 0.5]


def sft_demo_policy(policy: Path, pairs: Path, out: Path, max_new_tokens: int) -> None:
    """The SFT stage (`rlhf train-sft`'s `run_sft`) of the demo policy on `demonstrations(pairs)`, written to `out`."""
    from cluster.launch.sft import SFTJobConfig, run_sft
    from contract.net import free_port

    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    data = write_jsonl(out.parent / "data" / "demonstrations.jsonl", demonstrations(rows))
    cfg = {"base_model": str(policy), "data": str(data), "output_dir": str(out), "epochs": 2, "lr": 1e-3,
           "batch_size": 16, "micro_batch_size": 16, "max_length": 32 + 2 * max_new_tokens, "eval_fraction": 0.1,
           "device": "cpu", "ray": {"namespace": "demo-sft", "dashboard_port": free_port()}}
    print(f"demo: supervised fine-tuning the policy on {data}", flush=True)
    done = run_sft(SFTJobConfig.model_validate(cfg))
    print(f"demo: SFT model {done['output_dir']}: held-out loss {done['eval_loss_before']:.4f} -> "
          f"{done['eval_loss']:.4f}", flush=True)


def build_demo(work: Path, max_new_tokens: int = 16, steps: int = 60, sft: bool = True) -> dict:
    """Build the demo's models, data, SFT policy (unless `sft` is False: the raw policy) and reward
    model under `work`; return the job config tree."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    models = make_tiny_models(work / "models")
    prompts = demo_prompts()
    prompts_file = write_jsonl(work / "data" / "prompts.jsonl", prompts)
    rm_dir, sft_dir, pairs = work / "reward_model", work / "sft_model", work / "data" / "preferences.jsonl"
    if not pairs.is_file():
        tok = AutoTokenizer.from_pretrained(models["policy"])
        write_jsonl(pairs, preference_pairs(tok, [p["prompt"] for p in prompts], 2000, max_new_tokens))
    if sft and not (sft_dir / "config.json").is_file():
        sft_demo_policy(models["policy"], pairs, sft_dir, max_new_tokens)
    if not (rm_dir / "config.json").is_file():
        print(f"demo: training the reward model on {pairs} (labels = gold-score ranking)", flush=True)
        acc = train_demo_reward_model(models, pairs, rm_dir)
        print(f"demo: reward model held-out pairwise accuracy {acc:.3f}", flush=True)
    return {
        "name": "demo",
        "model": {"policy": str(sft_dir if sft else models["policy"])},
        "data": {"prompts": str(prompts_file), "prompts_per_step": 16},
        "rollout": {"num_workers": 1, "sampling": {"n": 4, "max_new_tokens": max_new_tokens, "temperature": 1.0}},
        "reward": {"model_dir": str(rm_dir), "max_batch_size": 64},
        "learner": {"num_ranks": 1, "lr": 3e-3, "critic_lr": 3e-3,
                    "rl": {"algorithm": "ppo", "minibatch_size": 64, "micro_batch_size": 64, "kl_coef": 0.01}},
        "loop": {"steps": steps, "gold_function": GOLD, "checkpoint_every": 10},
    }
