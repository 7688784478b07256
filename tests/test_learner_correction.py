"""Rollout correction in the update: the sampler's logprobs (`Batch.rollout_logprobs`) are the
behaviour policy, the learner's old pass the proximal one. Each expected loss is the scalar
arithmetic of TIS / MIS on ratios the test plants: rollout logprobs = learner logprobs - log(rho)."""
import math
import uuid

import pytest
import torch

from learner import algorithm as alg
from learner.batch import prepare
from learner.config import RLConfig, RolloutCorrectionConfig
from support_learner import CPU, experience_table, learner_cfg


@pytest.fixture(scope="module")
def policy(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models["policy"], dtype=torch.float32)


def planted(policy, rhos: list[list[float]]):
    """A batch whose rows have len(rhos[i]) response tokens and sampler logprobs such that
    pi_learner / pi_sampler = rhos[i][t] exactly, and the learner's own logprobs."""
    n = len(rhos)
    table = experience_table(n=n, group_size=1, response_ids=[[5 + t for t in range(len(r))] for r in rhos],
                             logprobs=[[-1.0] * len(r) for r in rhos])
    b = prepare(table, 0, 0, 1).batch
    lp = alg.response_logprobs(policy, b)
    b.rollout_logprobs = (lp - torch.log(torch.tensor([r + [1.0] * (b.mask.shape[1] - len(r)) for r in rhos]))) * b.mask
    return b, lp


def unit_advantage_loss(cfg, policy, b, old, plan):
    """A = 1 on every token, old pass = the current policy (r = 1): the surrogate is -1 per token,
    so the loss is -(the correction weights), averaged as the update averages."""
    tg = alg.compute_targets(cfg, b, old, None, None, plan)
    tg.advantages = b.mask.clone()
    norm = alg.loss_normaliser(cfg, b, tg.keep)
    return alg.actor_loss(cfg, policy, b, tg, alg.sample_weights(b, norm, tg.keep), plan)


def test_auto_mode_is_tis_when_async_and_off_when_sync():
    auto = RolloutCorrectionConfig()
    assert (auto.effective_mode(True), auto.effective_mode(False)) == ("tis", "off")
    for mode in ("off", "tis", "mis"):
        assert {RolloutCorrectionConfig(mode=mode).effective_mode(a) for a in (True, False)} == {mode}
    cfg = RLConfig()
    assert alg.make_plan(cfg, async_rollouts=True).correction == "tis"
    assert alg.make_plan(cfg).correction == "off"
    with pytest.raises(ValueError, match="mis_low"):
        RolloutCorrectionConfig(mis_low=1.5)


def test_tis_weighs_each_token_by_its_truncated_ratio(policy):
    rhos = [[0.5, 3.0, 1.0], [2.5, 1.5]]
    b, lp = planted(policy, rhos)
    cfg = RLConfig(algorithm="grpo", kl_coef=0.0, rollout_correction={"mode": "tis", "cap": 2.0})
    for old in (lp, None):  # the old pass, or the one-step update's own forward
        loss, m = unit_advantage_loss(cfg, policy, b, old, alg.Plan(correction="tis"))
        per_sample = [-(0.5 + 2.0 + 1.0) / 3, -(2.0 + 1.5) / 2]  # min(rho, 2), token mean
        assert loss.item() == pytest.approx(sum(per_sample) / 2, abs=1e-5)
        assert m["is_weight_mean"].tolist() == pytest.approx([(0.5 + 3 + 1) / 3, (2.5 + 1.5) / 2], abs=1e-5)
        assert m["is_truncated_frac"].tolist() == pytest.approx([1 / 3, 1 / 2])
        assert m["is_weight_max"].tolist() == pytest.approx([3.0, 2.5], abs=1e-5)
    off, m_off = unit_advantage_loss(cfg, policy, b, lp, alg.Plan(correction="off"))
    assert off.item() == pytest.approx(-1.0, abs=1e-6)  # unweighted: -1 per token
    assert m_off["is_weight_max"].tolist() == pytest.approx([3.0, 2.5], abs=1e-5)  # diagnostics in every mode


def test_mis_masks_a_sample_out_of_the_loss_and_its_normaliser(policy):
    """Sample 0's geometric-mean ratio is (0.5 * 3 * 4)^(1/3) = 6^(1/3) > 1.8: masked; sample 1's
    (1.2 * 0.9)^(1/2) is kept. The loss is sample 1's alone, divided by one sample, not two."""
    rhos = [[0.5, 3.0, 4.0], [1.2, 0.9]]
    b, lp = planted(policy, rhos)
    cfg = RLConfig(algorithm="grpo", kl_coef=0.0, rollout_correction={"mode": "mis", "mis_high": 1.8})
    plan = alg.Plan(correction="mis")
    assert not alg.old_is_first_forward(cfg, len(b), plan)  # the mask needs the old pass up front
    loss, m = unit_advantage_loss(cfg, policy, b, lp, plan)
    assert 6 ** (1 / 3) > 1.8 and 0.5 < math.sqrt(1.2 * 0.9) < 1.8
    assert loss.item() == pytest.approx(-1.0, abs=1e-5)  # (1/1) * token-mean(-1, -1)
    assert m["is_masked_frac"].tolist() == [1.0, 0.0]


def test_learner_group_reports_correction_metrics_reduced_over_ranks(tiny_models, ray_local, policy):
    """Async loop, mode null -> tis; 2 ranks: the planted largest ratio (3.0, on one sample) must
    come back as is_weight_max, whichever rank held that sample."""
    from learner.group import LearnerGroup

    table = experience_table(n=8)
    b = prepare(table, 0, 0, 1).batch
    lp = alg.response_logprobs(policy, b)
    logprobs = [(lp[i, :int(b.mask[i].sum())] - (math.log(3.0) if i == 5 else 0.0)).tolist() for i in range(8)]
    cfg = learner_cfg(num_ranks=2, zero_stage=2)
    cfg.rl.algorithm, cfg.rl.kl_coef = "grpo", 0.0
    group = LearnerGroup(cfg, str(tiny_models["policy"]), CPU, namespace=f"learner-{uuid.uuid4().hex[:6]}",
                         plan=alg.make_plan(cfg.rl, async_rollouts=True))
    try:
        metrics = group.train_step(experience_table(n=8, logprobs=logprobs))
    finally:
        group.shutdown()
    assert metrics["is_weight_max"] == pytest.approx(3.0, rel=1e-4)
    tokens_5 = int(b.mask[5].sum())
    assert metrics["is_truncated_frac"] == pytest.approx(1 / 8, abs=1e-6)  # every token of 1 sample in 8
    assert metrics["is_weight_mean"] == pytest.approx((7 + 3.0) / 8, rel=1e-4)
    assert metrics["is_masked_frac"] == pytest.approx(1 / 8) and tokens_5 >= 1  # reported, not applied (tis)
