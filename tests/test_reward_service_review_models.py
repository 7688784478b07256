"""What ratings lead to, on a real reward Serve app (local Ray): `rlhf train-rm --from-run` reaching
>= 90% on held-out ratings that follow a rule, `reward.retrain_every` training and swapping in the
next model by itself, and a reward model replaced under a scoring burst with every request
answered once and every row scored by the model its provenance names.
"""
from __future__ import annotations

import itertools
import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import requests

from support_review import AUTH, app, parts


pytestmark = pytest.mark.slow  # trains reward models, swaps them under load


def rule_following_picks(policy_dir: Path, n: int, seed: int = 3) -> list[dict]:
    """A person who prefers responses with colour words: chosen 30-70% colours, rejected 0-10%."""
    from transformers import AutoTokenizer

    from cluster.demo.task import demo_prompts, policy_like_response

    tok, rng = AutoTokenizer.from_pretrained(str(policy_dir)), random.Random(seed)
    prompts = [p["prompt"] for p in demo_prompts()]
    return [{"kind": "pick", "prompt": rng.choice(prompts),
             "chosen": policy_like_response(rng, tok, rng.uniform(0.3, 0.7), rng.randint(6, 16)),
             "rejected": policy_like_response(rng, tok, rng.uniform(0.0, 0.1), rng.randint(6, 16))} for _ in range(n)]


def test_train_rm_from_run_reaches_90_percent_on_held_out_ratings(app, tiny_models):
    picks = rule_following_picks(tiny_models["policy"], 300)
    r = requests.post(f"{app['url']}/rate", json={"ratings": picks}, headers=AUTH, timeout=120)
    assert r.status_code == 200 and r.json()["stored"] == 300
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "train-rm", "--from-run", str(app["run"]), "epochs=3",
                          "lr=0.003", "batch_size=32", "max_length=64"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("reward model saved to"))
    acc = float(line.split("held-out accuracy ")[1].split()[0])
    assert acc >= 0.9 and "held-out ratings (pairwise, bradley_terry" in line, line
    model_dir = Path(line.split("saved to ")[1].split(":")[0])
    assert (model_dir / "config.json").is_file() and model_dir.parent == app["run"] / "reward_models"
    heldout = (model_dir.parent / (model_dir.name + ".data") / "heldout.jsonl").read_text().splitlines()
    assert len(heldout) == 60  # 20% of the 300 picks


def test_retrain_every_n_ratings_trains_and_swaps_in_the_next_model(app, tmp_path):
    from cluster.job.reward_refresh import RewardRefresh

    client, said = app["client"], []
    settings = tmp_path / "rm.yaml"
    settings.write_text("epochs: 1\nbatch_size: 32\nlr: 0.003\nmax_length: 64\n")
    refresh = RewardRefresh(4, str(settings), app["run"], client, said.append)
    version = client.summary()["reward_model_version"]
    refresh.after_step(7)
    assert refresh._thread is None  # no new ratings yet
    likes = [{"kind": "like", "prompt": "q:", "response": f" red blue {i}", "value": True} for i in range(4)]
    assert requests.post(f"{app['url']}/rate", json={"ratings": likes}, headers=AUTH, timeout=60).status_code == 200
    refresh.after_step(8)
    refresh._thread.join(timeout=300)
    assert client.summary()["reward_model_version"] == version + 1, said
    assert said[0].startswith("reward model: retraining on ") and "after step 8" in said[0]
    assert said[1].startswith(f"reward model v{version + 1} <- {app['run'] / 'reward_models'}"), said
    assert client.score(["q:"], [" red"]).column("reward_model_version").to_pylist() == [version + 1]


def test_reward_model_replaced_under_a_scoring_burst_answers_every_request_once(app, tmp_path):
    from cluster.demo.tiny_models import make_tiny_models
    from reward_service.model import RewardModel
    from reward_service.rm_from_ratings import current_model_dir

    client = app["client"]
    old, old_dir = client.summary()["reward_model_version"], current_model_dir(app["run"] / "reward_store")
    new_dir = make_tiny_models(tmp_path / "next", seed=1)["reward"]
    rng = np.random.default_rng(0)
    texts = [([f"q{k}:"] * 12, [f" {' '.join(rng.choice(['red', 'sea', 'cat', 'blue'], 5))} {k}-{i}" for i in range(12)])
             for k in range(16)]
    counter, answered, stop = itertools.count(1), [], threading.Event()
    retries = client.retries

    def burst():  # requests back to back until the switch is over, each recorded once with what it sent
        while not stop.is_set():
            k = next(counter)
            answered.append((k, texts[k % 16], client.score(*texts[k % 16])))

    threads = [threading.Thread(target=burst) for _ in range(4)]
    for t in threads:
        t.start()
    threading.Event().wait(1.0)
    entry = client.update_model(str(new_dir))  # returns once every replica scores with it
    after = client.score(*texts[0])
    threading.Event().wait(1.0)
    stop.set()
    for t in threads:
        t.join(timeout=300)
    new = old + 1
    assert entry["version"] == new and len(entry["replicas"]) == 2
    assert sorted(k for k, _, _ in answered) == list(range(1, len(answered) + 1))  # every request answered, once
    assert client.retries == retries  # and none had to be re-sent
    expected = {old: RewardModel(old_dir), new: RewardModel(new_dir)}
    seen = set()
    for _, (prompts, responses), table in answered:
        versions = table.column("reward_model_version").to_pylist()
        assert table.num_rows == 12 and all(table.column("reward_valid").to_pylist())
        for v in set(versions):  # each row scored once, by the model its provenance names
            idx = [i for i, x in enumerate(versions) if x == v]
            want = expected[v].score([prompts[i] for i in idx], [responses[i] for i in idx])
            np.testing.assert_allclose([parts(table, "model")[i] for i in idx], want, atol=1e-5)
        seen |= set(versions)
    assert seen == {old, new} and after.column("reward_model_version").to_pylist() == [new] * 12  # switched mid-burst
    assert requests.get(f"{app['url']}/ratings", headers=AUTH, timeout=30).json()["reward_model_version"] == new
