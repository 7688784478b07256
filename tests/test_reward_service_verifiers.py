"""Verifiers: the scores as their definitions say, and calls that hang or raise recorded, never a silent 0."""
from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest

from reward_service.verifiers import (ERROR, OK, TIMEOUT, VerifierPool, lcs_length, verifier_version, verify_exact,
                                      verify_lcs, verify_math)


def test_lcs_is_the_longest_common_subsequence():
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # CLRS's example: BCBA
    assert lcs_length("", "abc") == 0 and lcs_length("abc", "abc") == 3
    # 2 * LCS / (len a + len b): "tac" vs "tca" share "ta" (or "tc"): 2*2/6
    assert verify_lcs("tac", "tca") == pytest.approx(4 / 6)
    assert verify_lcs(" god tac ", "god tac") == 1.0
    assert verify_lcs("", "abc") == 0.0


def test_exact_and_math_verifiers():
    assert verify_exact("  dog  tac\n", "dog tac") == 1.0 and verify_exact("dog", "dogs") == 0.0
    assert verify_math("17", "17") == 1.0
    assert verify_math("Tom has 12 apples, gets 5: 12 + 5 = 17", "17") == 1.0  # the final number counts
    assert verify_math("$\\boxed{0.5}$", "1/2") == 1.0
    assert verify_math("18", "17") == 0.0
    with pytest.raises(ValueError, match="reference 'no number' has no parsable answer"):
        verify_math("17", "no number")


def test_version_names_the_package():
    assert verifier_version("math").startswith("math (math-verify 0.")
    assert verifier_version("lcs").startswith("lcs (rlhf-actor-learner ")


def hanging_verifier_standin(response: str, reference: str) -> float:
    """A stand-in verifier that hangs on 'hang' and raises on 'boom' (faults no real input reliably gives)."""
    if response == "hang":
        time.sleep(3600)
    if response == "boom":
        raise RuntimeError("verifier blew up")
    return float(os.getpid())


def test_pool_records_timeouts_and_errors_and_kills_the_hung_process():
    pool = VerifierPool("exact", timeout_s=2.0, processes=2, fn=hanging_verifier_standin)
    try:
        out = pool.verify(["a", "hang", "boom", "b"], ["x", "x", "x", None])
        assert out.outcomes == [OK, TIMEOUT, ERROR, ERROR]
        assert math.isfinite(out.values[0]) and np.isnan(out.values[1:]).all()  # never a silent 0
        assert any("timed out after 2s" in e for e in out.errors)
        assert any("RuntimeError: verifier blew up" in e for e in out.errors)
        assert any("has no reference answer" in e for e in out.errors)
        worker_pid = int(out.values[0])
        assert worker_pid != os.getpid()  # ran in a worker process, not here
        # the pool goes on after a kill: every call answers, from live workers
        t0 = time.monotonic()
        again = pool.verify(["c"] * 4, ["x"] * 4)
        assert again.outcomes == [OK] * 4 and time.monotonic() - t0 < 30
        for pid in {int(v) for v in again.values}:
            os.kill(pid, 0)  # alive
    finally:
        pool.close()


def test_pool_with_the_real_math_verifier():
    pool = VerifierPool("math", timeout_s=10.0, processes=1)
    try:
        out = pool.verify(["The answer is 42", "41", "forty-two"], ["42", "42", "42"])
        assert out.outcomes == [OK, OK, OK]
        assert out.values.tolist() == [1.0, 0.0, 0.0]
        assert pool.version.startswith("math (math-verify")
    finally:
        pool.close()


def test_unknown_verifier_is_one_line():
    with pytest.raises(ValueError, match="reward.verifier.name: unknown verifier 'regex'"):
        VerifierPool("regex", 1.0, 1)


def test_reward_app_scores_with_the_verifier_and_records_outcomes(ray_local, tmp_path):
    """Through the real Serve app: the verifier's part, its version and outcome per row; a sample without
    a reference is an invalid row with the outcome recorded, and the rest of the batch is scored."""
    from contract.net import free_port
    from reward_service.app import deploy, shutdown
    from reward_service.client import reward_errors
    from reward_service.config import RewardConfig

    cfg = RewardConfig(verifier={"name": "math", "weight": 2.0, "timeout_s": 10, "processes": 1},
                       functions=[{"path": "reward_service.functions:colour_fraction", "weight": 1.0}],
                       max_batch_size=4, http_port=free_port(), request_timeout_s=120)
    client = deploy(cfg, tmp_path / "store", name="reward_verifier_t")
    try:
        responses = ["The answer is 17", "red 16", "12", "blue blue", "9", "7 red"]
        references = ["17", "16", "13", "4", None, "7"]
        table = client.score(["q"] * 6, responses, references=references)
        parts = [dict(p) for p in table.column("reward_parts").to_pylist()]
        assert [p["verifier:math"] for p in parts[:4]] == [1.0, 1.0, 0.0, 0.0]
        assert np.isnan(parts[4]["verifier:math"])
        assert table.column("verifier_outcome").to_pylist() == ["ok"] * 4 + ["error", "ok"]
        assert set(table.column("verifier").to_pylist()) == {pool_version()}
        assert table.column("reward_valid").to_pylist() == [True] * 4 + [False, True]
        want = [2.0 * v + c for v, c in zip([1, 1, 0, 0, 0, 1], [0, 1, 0, 1, 0, 1])]  # colour words: digits are not words
        np.testing.assert_allclose(table.column("reward").to_numpy(), [*want[:4], 0.0, want[5]], atol=1e-6)
        assert any("sample 0 has no reference answer" in e for e in reward_errors(table))  # row 4 of 6 is
        # row 0 of its chunk of max_batch_size=4: the message names the chunk's row
    finally:
        shutdown("reward_verifier_t")


def pool_version() -> str:
    return verifier_version("math")
