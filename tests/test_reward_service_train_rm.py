"""`rlhf train-rm` on a synthetic preference set with a learnable rule: more colour words win.

Responses look like what a random-init tiny policy emits (random tokens of the tiny tokenizer,
special-token text included) with colour words mixed in, as in the demo.
"""
from __future__ import annotations

import contextlib
import io
import json
import random
import re

import numpy as np
import pytest
import yaml

from reward_service.functions import COLOURS, colour_fraction


def noisy_response(rng: random.Random, tok, n_colours: int, n_units: int) -> str:
    units = [" " + rng.choice(COLOURS) for _ in range(n_colours)]
    units += [tok.decode([rng.randrange(4, len(tok))]) for _ in range(n_units - n_colours)]
    units += ["<pad>"] if rng.random() < 0.1 else []
    rng.shuffle(units)
    return "".join(units)


def preference_pairs(tok, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        units = rng.randint(8, 16)
        hi = rng.randint(3, 7)
        lo = rng.randint(0, hi - 3)
        rows.append({"prompt": f"prompt {i % 17}:", "chosen": noisy_response(rng, tok, hi, units),
                     "rejected": noisy_response(rng, tok, lo, units)})
    return rows


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def trained(tiny_models, tmp_path_factory):
    from cluster.cli import main
    from reward_service.model import load_tokenizer

    tok = load_tokenizer(tiny_models["reward"])
    d = tmp_path_factory.mktemp("rm")
    write_jsonl(d / "prefs.jsonl", preference_pairs(tok, 480, seed=1))
    cfg = {"base_model": str(tiny_models["reward"]), "data": str(d / "prefs.jsonl"), "output_dir": str(d / "rm"),
           "epochs": 4, "batch_size": 16, "lr": 2e-3, "eval_fraction": 0.2, "seed": 0}
    (d / "rm.yaml").write_text(yaml.safe_dump(cfg))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["train-rm", str(d / "rm.yaml")])
    return {"dir": d / "rm", "tok": tok, "rc": rc, "stdout": out.getvalue()}


def test_train_rm_cli_reaches_heldout_accuracy(trained):
    assert trained["rc"] == 0
    accuracy = float(re.search(r"held-out pairwise accuracy ([0-9.]+)", trained["stdout"]).group(1))
    assert accuracy >= 0.9, trained["stdout"]
    assert (trained["dir"] / "model.safetensors").is_file() and (trained["dir"] / "tokenizer.json").is_file()
    assert not (trained["dir"].parent / "rm.tmp").exists()


def test_trained_model_ranks_fresh_pairs(trained):
    from reward_service.model import RewardModel

    rm = RewardModel(trained["dir"])
    fresh = preference_pairs(trained["tok"], 100, seed=99)
    prompts = [r["prompt"] for r in fresh]
    chosen, rejected = [r["chosen"] for r in fresh], [r["rejected"] for r in fresh]
    gold = np.asarray(colour_fraction(prompts, chosen)) > np.asarray(colour_fraction(prompts, rejected))
    assert gold.mean() >= 0.9  # the rule the pairs were built by
    agree = ((rm.score(prompts, chosen) > rm.score(prompts, rejected)) == gold).mean()
    assert agree >= 0.9, agree


def test_train_rm_bce_on_labels(trained, tiny_models, tmp_path):
    from reward_service.config import RewardModelTrainConfig
    from reward_service.train_rm import train_reward_model

    rows = [{"prompt": r["prompt"], "response": r[k], "label": int(k == "chosen")}
            for r in preference_pairs(trained["tok"], 480, seed=5) for k in ("chosen", "rejected")]
    write_jsonl(tmp_path / "labels.jsonl", rows)
    result = train_reward_model(RewardModelTrainConfig(
        base_model=str(tiny_models["reward"]), data=str(tmp_path / "labels.jsonl"), output_dir=str(tmp_path / "rm"),
        objective="bce", epochs=4, batch_size=16, lr=2e-3, eval_fraction=0.2))
    assert result["eval_accuracy"] >= 0.9, result
    assert (tmp_path / "rm" / "config.json").is_file() and not (tmp_path / "rm.tmp").exists()


def test_train_rm_bad_data_is_one_line_error(tiny_models, tmp_path, capsys):
    from cluster.cli import main

    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    cfg = {"base_model": str(tiny_models["reward"]), "data": str(tmp_path / "bad.jsonl"),
           "output_dir": str(tmp_path / "out")}
    (tmp_path / "rm.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train-rm", str(tmp_path / "rm.yaml")]) == 2
    err = capsys.readouterr().err
    assert "missing column 'rejected'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
