"""`rlhf train-rm` from a causal LM (what a user with a pretrained or SFT model has): the LM's
transformer body with a new one-output score head drawn from `seed`. The saved directory must be a
reward model the job's preflight accepts and the reward service's `RewardModel` serves; a base
model train-rm cannot start from is still refused in one line.

Pairs follow a rule the model can learn in a few steps: the chosen reply names colours, the
rejected one does not.
"""
from __future__ import annotations

import contextlib
import io
import json
import random

import numpy as np
import pytest
import torch
import yaml

from reward_service.functions import COLOURS, FILLER


def pairs(n: int, seed: int, chat: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = f"Describe thing {i % 11}:"
        row = {"prompt": prompt, "chosen": " " + " ".join(rng.choices(COLOURS, k=rng.randint(3, 6))),
               "rejected": " " + " ".join(rng.choices(FILLER, k=rng.randint(3, 6)))}
        if chat:  # a conversation prompt, re-rendered in the model's own chat template
            row["prompt"] = [{"role": "user", "content": prompt}]
        rows.append(row)
    return rows


def train_rm_cli(tmp_path, base, rows, **extra) -> tuple[int, str, str]:
    from cluster.cli import main

    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"base_model": str(base), "data": str(tmp_path / "pairs.jsonl"), "output_dir": str(tmp_path / "rm"),
           "epochs": 3, "batch_size": 16, "lr": 2e-3, "eval_fraction": 0.25, "seed": 0, **extra}
    (tmp_path / "rm.yaml").write_text(yaml.safe_dump(cfg))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["train-rm", str(tmp_path / "rm.yaml")])
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("family", ["llama", "chat"])
def test_train_rm_from_a_causal_lm_is_served_and_ranks(family, tiny_models, tiny_chat_models, tmp_path):
    """llama: the plain-text tiny LM; chat: the Qwen2-shaped ChatML LM with tied embeddings (as
    SmolLM2 is), on conversation prompts."""
    from cluster.launch.preflight import check_reward_model
    from reward_service.model import RewardModel

    base = (tiny_models if family == "llama" else tiny_chat_models)["policy"]
    rc, out, err = train_rm_cli(tmp_path, base, pairs(96, seed=1, chat=family == "chat"))
    assert rc == 0, err
    said = [line for line in out.splitlines() if "is a causal LM" in line]
    assert len(said) == 1 and "new one-output score head" in said[0] and "seed 0" in said[0], out
    accuracy = float(out.split("held-out pairwise accuracy ")[1].split()[0])
    assert accuracy >= 0.9, out

    hf = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert hf["architectures"][0].endswith("ForSequenceClassification") and len(hf["id2label"]) == 1
    problems: list[str] = []
    assert check_reward_model("reward.model_dir", str(tmp_path / "rm"), problems) is not None and problems == []

    rm = RewardModel(tmp_path / "rm")
    assert rm.model.config.pad_token_id == rm.tokenizer.pad_token_id is not None
    fresh = pairs(40, seed=7, chat=family == "chat")
    prompts = ["" if family == "chat" else r["prompt"] for r in fresh]  # as load_preferences gives them
    messages = [json.dumps(r["prompt"]) if family == "chat" else None for r in fresh]
    chosen = rm.score(prompts, [r["chosen"] for r in fresh], messages)
    rejected = rm.score(prompts, [r["rejected"] for r in fresh], messages)
    assert np.isfinite(chosen).all() and np.isfinite(rejected).all()
    assert (chosen > rejected).mean() >= 0.9, (chosen, rejected)


def test_the_body_is_the_lm_and_the_head_comes_from_seed(tiny_models):
    from safetensors.torch import load_file

    from reward_service.model import load_tokenizer
    from reward_service.train_rm import load_base

    base = tiny_models["policy"]
    pad = load_tokenizer(base).pad_token_id
    said: list[str] = []
    a, b, c = (load_base(str(base), pad, seed, said.append) for seed in (3, 3, 4))
    lm = load_file(str(base / "model.safetensors"))
    body = {k: v for k, v in a.state_dict().items() if not k.startswith("score.")}
    assert body and all(torch.equal(v, lm[k]) for k, v in body.items())  # every body weight is the LM's
    assert a.score.weight.shape[0] == 1 and a.config.num_labels == 1 and a.config.pad_token_id == pad
    assert torch.equal(a.score.weight, b.score.weight) and not torch.equal(a.score.weight, c.score.weight)
    assert len(said) == 3 and all("causal LM" in s for s in said)


def test_base_models_train_rm_cannot_start_from_are_one_line(tiny_models, tmp_path):
    """A classifier with two outputs, a bare transformer body, an LM family with no classification head."""
    def config_like(name: str, **changes) -> str:
        d = tmp_path / name
        d.mkdir()
        hf = json.loads((tiny_models["reward"] / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(hf | changes))
        return str(d)

    two = config_like("two", id2label={"0": "a", "1": "b"})
    body = config_like("body", architectures=["LlamaModel"])
    odd = config_like("odd", architectures=["OddForCausalLM"], model_type="odd")
    cases = {two: f"base_model: {two} has 2 outputs (id2label); a reward model has exactly one (num_labels=1)",
             body: f"base_model: {body} is a LlamaModel, not a sequence classifier with one output "
                   f"(*ForSequenceClassification, num_labels=1) or a causal LM (*ForCausalLM), what train-rm "
                   f"starts from",
             odd: f"base_model: {odd} is a OddForCausalLM (model_type odd), a family with no sequence-classification "
                  f"head in transformers; start from a *ForSequenceClassification model with one output"}
    for base, line in cases.items():
        run = tmp_path / f"run_{base.rsplit('/', 1)[1]}"
        run.mkdir()
        rc, _, err = train_rm_cli(run, base, pairs(8, seed=0))
        assert rc == 2 and err.strip().splitlines() == [f"rlhf train-rm: error: {line}"], err
        assert not (run / "rm").exists()
