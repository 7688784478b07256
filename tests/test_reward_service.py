"""The reward Serve app on a real local Ray cluster: parity, batching, HTTP + token, feedback
fusion and its durability, output checks, and a replica killed mid-burst.

The fault functions below are imported by the replicas by path (`test_reward_service:...`), with
tests/ put on their PYTHONPATH through `reward.python_path`.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from contract.net import free_port
import requests
import torch

TOKEN_ENV = "RLHF_TEST_REWARD_TOKEN"
TOKEN = "s3cret-token"


def nan_on_blue(prompts, responses):
    return [float("nan") if "blue" in r else 1.0 for r in responses]


def one_short(prompts, responses):
    return [0.5] * (len(responses) - 1)


def held_length(prompts, responses):
    """len(response) per pair; while the file `hold` exists in the directory each prompt starts with
    (`DIR|...`), the replica stays inside the chunk, after leaving `entered-PID-N` there."""
    import os
    import time
    import uuid

    where = Path(prompts[0].split("|", 1)[0])
    (where / f"entered-{os.getpid()}-{uuid.uuid4().hex}").touch()
    deadline = time.monotonic() + 120
    while (where / "hold").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return [float(len(r)) for r in responses]


def pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    from reward_service.functions import COLOURS, FILLER

    rng = np.random.default_rng(seed)
    words = list(COLOURS + FILLER)
    prompts = [f"question {i}:" for i in range(n)]
    responses = [" " + " ".join(rng.choice(words, size=rng.integers(0, 20))) for _ in range(n)]
    return prompts, responses


def direct_scores(model_dir, prompts, responses) -> np.ndarray:
    """Independent reference: plain transformers, one unpadded sequence at a time."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    out = []
    with torch.inference_mode():
        for p, r in zip(prompts, responses):
            ids = [tok.bos_token_id] + tok(p + r, add_special_tokens=False)["input_ids"]
            out.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
    return np.asarray(out)


@pytest.fixture(scope="module")
def app(ray_local, tiny_models, tmp_path_factory):
    import os

    from reward_service.app import deploy, shutdown
    from reward_service.config import RewardConfig

    os.environ[TOKEN_ENV] = TOKEN
    cfg = RewardConfig(model_dir=str(tiny_models["reward"]),
                       functions=[{"path": "reward_service.functions:colour_fraction", "weight": 2.0}],
                       feedback={"alpha": 0.5, "ngram": 2, "threshold": 0.6}, max_batch_size=8,
                       num_replicas=2, http_port=free_port(), token_env=TOKEN_ENV, request_timeout_s=60)
    store = tmp_path_factory.mktemp("reward_store")
    client = deploy(cfg, store, name="reward_t")
    yield {"client": client, "cfg": cfg, "store": store, "model_dir": tiny_models["reward"]}
    shutdown("reward_t")
    os.environ.pop(TOKEN_ENV, None)


def parts_of(table, key: str) -> np.ndarray:
    return np.asarray([dict(p)[key] for p in table.column("reward_parts").to_pylist()])


def test_scores_equal_direct_forward_and_combine(app):
    from contract.experience import REWARD_FIELDS
    from reward_service.functions import colour_fraction

    prompts, responses = pairs(37)
    table = app["client"].score(prompts, responses)
    assert table.schema.names == [f.name for f in REWARD_FIELDS] and table.num_rows == 37
    assert [table.schema.field(f.name).type for f in REWARD_FIELDS] == [f.type for f in REWARD_FIELDS]
    model = parts_of(table, "model")
    np.testing.assert_allclose(model, direct_scores(app["model_dir"], prompts, responses), atol=1e-5)
    colour = np.asarray(colour_fraction(prompts, responses))
    np.testing.assert_allclose(parts_of(table, "fn:colour_fraction"), colour)
    assert (parts_of(table, "feedback") == 0).all()
    expected = 0.5 * (model + 2.0 * colour)  # alpha 0.5, nothing in the feedback store matches
    np.testing.assert_allclose(table.column("reward").to_numpy(), expected, rtol=1e-5, atol=1e-6)
    assert table.column("reward_valid").to_pylist() == [True] * 37


def test_concurrent_requests_are_batched(app):
    client = app["client"]
    client.replica_stats(reset=True)
    prompts, responses = pairs(64, seed=3)
    sent = [client.scorer.score.remote([p], [r]) for p, r in zip(prompts, responses)]
    got = [s.result(timeout_s=60)["parts"]["model"][0] for s in sent]
    sizes = [b for s in client.replica_stats() for b in s["batch_sizes"]]
    assert sum(sizes) >= 64 / 2 and max(sizes) > 1, sizes
    assert max(sizes) <= app["cfg"].max_batch_size
    np.testing.assert_allclose(got, direct_scores(app["model_dir"], prompts, responses), atol=1e-5)


def test_http_score_needs_the_token(app):
    url = app["client"].http_url + "/score"
    body = {"prompts": ["q:"], "responses": [" red red blue"]}
    assert requests.post(url, json=body, timeout=30).status_code == 401
    assert requests.post(url, json=body, headers={"Authorization": "Bearer nope"}, timeout=30).status_code == 401
    ok = requests.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert ok.status_code == 200
    via_handle = app["client"].score(body["prompts"], body["responses"])
    assert ok.json()["reward"] == pytest.approx(via_handle.column("reward").to_pylist(), abs=1e-6)
    bad = requests.post(url, json={"prompts": ["a", "b"], "responses": ["x"]},
                        headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert bad.status_code == 400 and "2 prompts but 1 responses" in bad.json()["error"]


def test_http_feedback_changes_next_fused_reward(app):
    client, auth = app["client"], {"Authorization": f"Bearer {TOKEN}"}
    prompt, liked, other = "q:", " purple sea with purple stone and green river", " the lazy dog runs"
    before = client.score([prompt, prompt], [liked, other])
    assert (parts_of(before, "feedback") == 0).all()

    url = client.http_url + "/feedback"
    malformed = {"records": [{"prompt": prompt, "response": liked, "score": 1.0},
                             {"prompt": prompt, "response": other, "score": 7}]}
    r = requests.post(url, json=malformed, headers=auth, timeout=30)
    assert r.status_code == 400 and r.json()["error"].startswith("feedback[1]: field 'score'")
    assert requests.post(url, json=malformed, timeout=30).status_code == 401
    store_file = app["store"] / "feedback.jsonl"
    assert not store_file.exists() or store_file.read_text() == ""  # nothing half-stored

    r = requests.post(url, json={"records": [{"prompt": prompt, "response": liked, "score": 1.0}]}, headers=auth,
                      timeout=30)
    assert r.status_code == 200 and r.json()["stored"] == 1
    after = client.score([prompt, prompt], [liked + " today", other])  # a near-copy still matches
    assert parts_of(after, "feedback").tolist() == [1.0, 0.0]
    base = parts_of(after, "model") + 2.0 * parts_of(after, "fn:colour_fraction")
    np.testing.assert_allclose(after.column("reward").to_numpy(), 0.5 * np.array([1.0, 0.0]) + 0.5 * base, rtol=1e-5)
    assert [json.loads(line)["score"] for line in store_file.read_text().splitlines()] == [1.0]


def test_handle_feedback_validates_and_is_idempotent(app):
    from contract.datasets import DatasetError

    client = app["client"]
    with pytest.raises(DatasetError, match="'response' must be a string"):
        client.add_feedback([{"prompt": "p", "response": 3, "score": 0.0}])
    rec = {"prompt": "p", "response": "black white black white", "score": -1.0}
    assert client.add_feedback([rec]) == 1
    stored = client.feedback.add.remote([rec], "fixed-id").result(timeout_s=30)["stored"]
    replay = client.feedback.add.remote([rec], "fixed-id").result(timeout_s=30)["stored"]
    assert (stored, replay) == (1, 0)
    assert parts_of(client.score(["p"], ["black white black white"]), "feedback")[0] == -1.0


def test_killed_replica_mid_burst_every_row_once(ray_local, tmp_path):
    """A replica process killed (SIGKILL) while it holds a chunk: every row comes back once, in order,
    valid, and the chunks it held were sent again. Deterministic: the reward function holds each
    replica inside a chunk (`held_length`) until the kill has landed, so the kill always hits a
    request in flight (timing it against a free-running burst missed on a fast box: CI, 5 of 5)."""
    import os
    import signal
    import time

    from reward_service.app import deploy, shutdown
    from reward_service.config import RewardConfig

    cfg = RewardConfig(functions=[{"path": "test_reward_service:held_length"}], http_port=free_port(),
                       python_path=[str(Path(__file__).parent)], num_replicas=2, max_batch_size=8,
                       request_timeout_s=120)
    client = deploy(cfg, tmp_path / "store", name="reward_kill")
    try:
        (tmp_path / "hold").touch()
        prompts = [f"{tmp_path}|question {i}:" for i in range(64)]  # 8 chunks of 8
        responses = ["x" * (i + 1) for i in range(64)]
        result = {}
        burst = threading.Thread(target=lambda: result.update(table=client.score(prompts, responses)))
        burst.start()
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("entered-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        entered = sorted(tmp_path.glob("entered-*"))
        assert entered, "no replica started a chunk within 60 s"
        victim = int(entered[0].name.split("-")[1])
        os.kill(victim, signal.SIGKILL)  # the chunk it holds is in flight: its caller sees the replica die
        time.sleep(1.0)
        (tmp_path / "hold").unlink()
        burst.join(timeout=150)
        assert not burst.is_alive(), "the burst did not finish within 150 s of the kill"
        table = result["table"]
        assert table.num_rows == 64 and all(table.column("reward_valid").to_pylist())
        assert parts_of(table, "fn:held_length").tolist() == [float(i + 1) for i in range(64)]  # each row once, in order
        assert client.retries >= 1  # the victim's chunk was sent again
    finally:
        shutdown("reward_kill")


def test_serve_gives_the_http_proxy_time_to_start_on_a_busy_node(app, serve_controller_pids):
    """Serve's controller kills an HTTP proxy not ready 5 s after its creation, and `serve.start` then
    fails; a job starts its learner and engines beside the reward app, and on 2 busy cores the proxy
    took longer (the submitted e2e job failed so). The reward app's Serve controller waits longer."""
    from reward_service.app import SERVE_CONTROLLER_ENV

    pids = serve_controller_pids()
    assert len(pids) == 1, pids
    environ = dict(kv.split("=", 1) for kv in Path(f"/proc/{pids[0]}/environ").read_text().split("\0") if "=" in kv)
    assert environ["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] == SERVE_CONTROLLER_ENV[
        "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] == "30"


def test_nan_rows_invalid_and_wrong_length_is_error(ray_local, tmp_path):
    from reward_service.app import deploy, shutdown
    from reward_service.client import reward_errors
    from reward_service.config import RewardConfig

    cfg = RewardConfig(functions=[{"path": "test_reward_service:nan_on_blue"}], http_port=free_port(),
                       python_path=[str(Path(__file__).parent)])
    client = deploy(cfg, tmp_path, name="reward_faults")
    try:
        table = client.score(["p"] * 4, ["red", "blue sky", "green", "blue"])
        assert table.column("reward_valid").to_pylist() == [True, False, True, False]
        assert table.column("reward").to_pylist() == [1.0, 0.0, 1.0, 0.0]
        assert reward_errors(table) == ["fn:nan_on_blue: 2 of 4 values are NaN/inf"]
        assert requests.get(client.http_url + "/healthz", timeout=30).json() == {"ok": True}  # the port really used

        cfg = cfg.model_copy(update={"functions": [cfg.functions[0].model_copy(update={"path": "test_reward_service:one_short"})]})
        client = deploy(cfg, tmp_path, name="reward_faults")
        table = client.score(["p"] * 3, ["a", "b", "c"])
        assert table.column("reward_valid").to_pylist() == [False] * 3
        assert reward_errors(table) == ["reward function fn:one_short returned 2 values for 3 pairs"]
    finally:
        shutdown("reward_faults")


def test_feedback_survives_app_restart(app):
    from reward_service.app import deploy, shutdown

    shutdown("reward_t")
    client = deploy(app["cfg"], app["store"], name="reward_t")
    table = client.score(["q:"], [" purple sea with purple stone and green river"])
    assert parts_of(table, "feedback")[0] == 1.0
