"""The update's knobs wired through learner/algorithm.py, each checked against the paper's scalar
arithmetic on planted numbers: advantages set by hand, and old-policy logprobs planted at
log pi_old = log pi - delta so that each token's ratio pi / pi_old = exp(delta) is known."""
import math

import pytest
import torch

from learner import algorithm as alg
from learner.batch import prepare
from learner.config import RLConfig
from support_learner import experience_table


LENGTHS = [3, 2]


@pytest.fixture(scope="module")
def policy(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models["policy"], dtype=torch.float32)


def batch(lengths=LENGTHS, **columns):
    table = experience_table(n=len(lengths), group_size=len(lengths),
                             response_ids=[[7 + t for t in range(n)] for n in lengths],
                             logprobs=[[-1.0] * n for n in lengths], **columns)
    return prepare(table, 0, 0, 1).batch


def loss_of(cfg, policy, b, adv, delta=None, plan=alg.Plan()):
    """The minibatch loss with per-sample advantages `adv` and log ratios `delta` [B, T] (0: r = 1)."""
    lp = alg.response_logprobs(policy, b)
    old = lp if delta is None else lp - torch.tensor(delta) * b.mask
    tg = alg.compute_targets(cfg, b, old, None, None, plan)
    tg.advantages = torch.tensor(adv).unsqueeze(1) * b.mask
    w = alg.sample_weights(b, alg.loss_normaliser(cfg, b, tg.keep), tg.keep)
    return alg.actor_loss(cfg, policy, b, tg, w, plan)[0].item()


def test_finish_reason_length_marks_a_sample_truncated():
    b = prepare(experience_table(n=4, finish_reason=["length", "stop", "stop", "length"]), 0, 0, 8).batch
    assert b.truncated.tolist() == [True, False, False, True] + [False] * 4  # padding rows: not truncated


@pytest.mark.parametrize("aggregation, want", [
    ("seq_mean_token_mean", ((-1.0) + 2.0) / 2),                 # mean over samples of each token mean
    ("token_mean", (3 * -1.0 + 2 * 2.0) / (3 + 2)),               # DAPO: over all tokens
    ("seq_sum_norm", ((3 * -1.0) / 10 + (2 * 2.0) / 10) / 2),     # Dr. GRPO: token sums / C, C = 10
])
def test_loss_aggregation(policy, aggregation, want):
    """r = 1 everywhere, A = (1, -2): each token's surrogate is -A."""
    cfg = RLConfig(algorithm="grpo", kl_coef=0.0, loss_aggregation=aggregation, loss_norm_tokens=10)
    assert loss_of(cfg, policy, batch(), [1.0, -2.0], plan=alg.make_plan(cfg)) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("knobs", [
    {"loss_aggregation": "token_mean"},
    {"loss_aggregation": "seq_sum_norm", "loss_norm_tokens": 6, "ratio_level": "sequence"},
    {"loss_aggregation": "token_mean", "overlong": {"mode": "mask"}, "clip_high": 0.28},
])
def test_the_loss_scale_does_not_depend_on_the_micro_batch_cut(policy, knobs):
    """One minibatch of 6 rows (one truncated), as one micro-batch or as three of two: the same
    gradient, because every normaliser is the minibatch's (`loss_normaliser`)."""
    cfg = RLConfig(algorithm="grpo", kl_coef=0.0, **knobs)
    plan = alg.make_plan(cfg)
    b = batch([3, 2, 5, 1, 4, 2], finish_reason=["stop", "length", "stop", "stop", "stop", "stop"],
              reward=[0.0, 1.0, 2.0, 0.5, 3.0, 1.0])
    lp = alg.response_logprobs(policy, b)
    old = lp - 0.3 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(0)) * b.mask
    tg = alg.compute_targets(cfg, b, old, None, None, plan)
    norm = alg.loss_normaliser(cfg, b, tg.keep)
    grads = []
    for cut in ([slice(0, 6)], [slice(0, 2), slice(2, 4), slice(4, 6)]):
        policy.zero_grad()
        for rows in cut:
            mb, mtg = b.rows(rows), tg.rows(rows)
            alg.actor_loss(cfg, policy, mb, mtg, alg.sample_weights(mb, norm, mtg.keep), plan)[0].backward()
        grads.append([p.grad.clone() for p in policy.parameters()])
    assert sum(g.abs().sum() for g in grads[0]) > 0
    for one, three in zip(*grads):
        torch.testing.assert_close(three, one, rtol=0, atol=1e-6)


def test_overlong_mask_leaves_truncated_samples_out_of_the_loss_and_its_normaliser(policy):
    cfg = RLConfig(algorithm="grpo", kl_coef=0.0, overlong={"mode": "mask"})
    b = batch(finish_reason=["length", "stop"])
    assert loss_of(cfg, policy, b, [1.0, -2.0]) == pytest.approx(2.0, abs=1e-6)  # sample 1 alone: -(-2)


def test_overlong_penalty_is_added_to_the_reward_before_the_advantage():
    """L_max 4, L_cache 2: a 3-token response gets ((4 - 2) - 3) / 2 * penalty, a 2-token one 0;
    Dr. GRPO advantages (r - group mean) show the shaped rewards directly."""
    cfg = RLConfig(algorithm="grpo", grpo_std_normalize=False, overlong={"mode": "penalty", "buffer_tokens": 2,
                                                                          "penalty": 0.5})
    plan = alg.make_plan(cfg, max_new_tokens=4)
    b = batch(reward=[1.0, 1.0])
    r = [1.0 + 0.5 * ((4 - 2) - 3) / 2, 1.0 + 0.0]
    mean = sum(r) / 2
    adv = alg.compute_targets(cfg, b, None, None, None, plan).advantages
    torch.testing.assert_close(adv[:, 0], torch.tensor([r[0] - mean, r[1] - mean]), rtol=0, atol=1e-6)


def test_reinforce_pp_baseline_advantages():
    """Rewards (1, 3) of one prompt, one token each, no KL: centred (-1, 1), returns (-1, 1),
    whitened over the batch: mean 0, variance 1."""
    cfg = RLConfig(algorithm="reinforce_pp_baseline", kl_coef=0.0)
    adv = alg.compute_targets(cfg, batch([1, 1], reward=[1.0, 3.0]), None, None, None).advantages
    torch.testing.assert_close(adv[:, 0], torch.tensor([-1.0, 1.0]) / math.sqrt(1.0 + 1e-8), rtol=0, atol=1e-6)
    assert alg.kl_as_reward(cfg.model_copy(update={"kl_coef": 0.1}))  # a token-reward algorithm


def surrogate(r: float, lo: float, hi: float) -> float:
    """PPO's per-token loss for A = 1: max(-r, -clip(r, 1 - lo, 1 + hi))."""
    return max(-r, -min(max(r, 1 - lo), 1 + hi))


R = [math.exp(0.3), math.exp(-0.1), math.exp(0.1)]


@pytest.mark.parametrize("knobs, per_token", [
    ({}, [surrogate(r, 0.2, 0.2) for r in R]),                        # 1.35 is clipped to 1.2
    ({"clip_high": 0.4}, [surrogate(r, 0.2, 0.4) for r in R]),        # Clip-Higher lets 1.35 through
    ({"ratio_level": "sequence"}, [surrogate(math.exp((0.3 - 0.1 + 0.1) / 3), 0.2, 0.2)] * 3),  # GSPO
])
def test_clip_range_and_ratio_level(policy, knobs, per_token):
    """One 3-token sample, A = 1, log r = (0.3, -0.1, 0.1): the loss is the token mean of the surrogate."""
    cfg = RLConfig(algorithm="grpo", kl_coef=0.0, **knobs)
    got = loss_of(cfg, policy, batch([3]), [1.0], delta=[[0.3, -0.1, 0.1]])
    assert got == pytest.approx(sum(per_token) / 3, abs=1e-5)


def test_plan_needs_what_the_job_must_pass():
    with pytest.raises(ValueError, match="loss_norm_tokens"):
        alg.make_plan(RLConfig(loss_aggregation="seq_sum_norm"))
    assert alg.make_plan(RLConfig(loss_aggregation="seq_sum_norm"), max_new_tokens=64).norm_tokens == 64
    explicit = RLConfig(loss_aggregation="seq_sum_norm", loss_norm_tokens=8)
    assert alg.make_plan(explicit, max_new_tokens=64).norm_tokens == 8
    with pytest.raises(ValueError, match="overlong.mode"):
        alg.make_plan(RLConfig(overlong={"mode": "penalty"}))
    assert alg.make_plan(RLConfig(overlong={"mode": "penalty"}), max_new_tokens=100).overlong_buffer == 20
    with pytest.raises(ValueError, match="buffer_tokens"):
        alg.make_plan(RLConfig(overlong={"mode": "penalty", "buffer_tokens": 8}), max_new_tokens=8)
    with pytest.raises(ValueError, match="dual_clip"):
        RLConfig(ratio_level="sequence", dual_clip=3.0)


def test_learner_group_takes_its_plan_and_counts_truncated_samples(tiny_models, ray_local):
    import uuid

    from learner.group import LearnerGroup
    from support_learner import CPU, learner_cfg

    cfg = learner_cfg(num_ranks=1, zero_stage=0)
    cfg.rl.algorithm, cfg.rl.loss_aggregation, cfg.rl.overlong.mode = "grpo", "seq_sum_norm", "penalty"
    with pytest.raises(ValueError, match="loss_norm_tokens"):  # before any actor starts
        LearnerGroup(cfg, str(tiny_models["policy"]), CPU)
    group = LearnerGroup(cfg, str(tiny_models["policy"]), CPU, namespace=f"learner-{uuid.uuid4().hex[:6]}",
                         plan=alg.make_plan(cfg.rl, max_new_tokens=6))
    try:
        metrics = group.train_step(experience_table(n=8, finish_reason=["length", "stop"] * 4))
    finally:
        group.shutdown()
    assert metrics["num_truncated"] == 4 and math.isfinite(metrics["policy_loss"])
