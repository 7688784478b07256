"""learner/ppo_math.py against values worked out by hand (each expected number is written as the
scalar arithmetic of the paper's formula, independent of the vectorised code). Tolerance 1e-6."""
import math

import pytest
import torch

from learner import ppo_math as pm


def T(*rows):
    """T(a, b) -> 1-D; T([..], [..]) -> 2-D; T([..]) -> the one list as given."""
    return torch.tensor(rows[0] if len(rows) == 1 else rows, dtype=torch.float64)



def close(got, want):
    torch.testing.assert_close(got.double(), torch.as_tensor(want, dtype=torch.float64), atol=1e-6, rtol=0)


def test_gae_on_hand_worked_trajectory_with_padding():
    gamma, lam = 0.9, 0.8
    rewards = T([0.0, 0.0, 1.0], [0.5, 2.0, 7.0])  # row 1: one real token, the rest is padding (ignored)
    values = T([0.5, 0.6, 0.7], [0.2, 9.0, 9.0])
    mask = T([1, 1, 1], [1, 0, 0])
    adv, ret = pm.gae(rewards, values, mask, gamma, lam)
    a2 = 1.0 + gamma * 0.0 - 0.7                   # last token: V(s_T) = 0
    a1 = (0.0 + gamma * 0.7 - 0.6) + gamma * lam * a2
    a0 = (0.0 + gamma * 0.6 - 0.5) + gamma * lam * a1
    b0 = 0.5 + gamma * 0.0 - 0.2                   # padding value 9.0 must not leak in
    close(adv, [[a0, a1, a2], [b0, 0, 0]])
    close(ret, [[a0 + 0.5, a1 + 0.6, a2 + 0.7], [b0 + 0.2, 0, 0]])
    assert (a0, a1, a2) == pytest.approx((0.21712, 0.246, 0.3))


def test_kl_estimators():
    logp, ref = T([math.log(0.5), math.log(0.2)]), T([math.log(0.25), math.log(0.4)])
    r = [0.25 / 0.5, 0.4 / 0.2]
    close(pm.kl_estimate(logp, ref, "k1"), [-math.log(r[0]), -math.log(r[1])])
    close(pm.kl_estimate(logp, ref, "k3"), [(r[0] - 1) - math.log(r[0]), (r[1] - 1) - math.log(r[1])])
    assert (pm.kl_estimate(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="kl_estimator"):
        pm.kl_estimate(logp, ref, "k2")


def test_kl_shaped_rewards_put_score_on_last_real_token():
    kl, mask = T([0.1, 0.2, 0.3], [0.4, 0.5, 0.6]), T([1, 1, 1], [1, 1, 0])
    got = pm.kl_shaped_rewards(T(2.0, -1.0), kl, mask, kl_coef=0.5)
    close(got, [[-0.05, -0.1, -0.15 + 2.0], [-0.2, -0.25 - 1.0, 0.0]])


def test_clipped_policy_loss_and_clip_fraction():
    ratios = [1.5, 0.5, 1.5, 0.5, 1.1]
    adv = T(1.0, 1.0, -1.0, -1.0, 1.0)
    old = torch.zeros(5, dtype=torch.float64)
    logp = torch.log(T(*ratios))
    loss, clipped, approx_kl = pm.policy_loss(logp, old, adv, clip=0.2)
    close(loss, [max(-1.5, -1.2), max(-0.5, -0.8), max(1.5, 1.2), max(0.5, 0.8), max(-1.1, -1.1)])
    close(loss, [-1.2, -0.5, 1.5, 0.8, -1.1])
    close(clipped, [1, 1, 1, 1, 0])
    assert clipped.mean().item() == pytest.approx(0.8)
    close(approx_kl, [(r - 1) - math.log(r) for r in ratios])


def test_dual_clip_caps_negative_advantage_loss():
    logp, old, adv = torch.log(T(5.0, 5.0)), T(0.0, 0.0), T(-1.0, 1.0)
    plain, _, _ = pm.policy_loss(logp, old, adv, clip=0.2)
    dual, _, _ = pm.policy_loss(logp, old, adv, clip=0.2, dual_clip=3.0)
    close(plain, [5.0, -1.2])
    close(dual, [min(5.0, 3.0 * 1.0), -1.2])  # positive advantages are untouched


def test_clipped_value_loss():
    got = pm.value_loss(T(1.0, 0.6), T(0.5, 0.5), T(2.0, 0.0), clip=0.2)
    close(got, [0.5 * max((1.0 - 2.0) ** 2, (0.7 - 2.0) ** 2), 0.5 * (0.6 - 0.0) ** 2])


def test_entropy_logprobs_and_masked_reductions():
    log_probs = torch.log_softmax(T([[[0.0, math.log(3.0)]]]), -1)  # [B=1, T=1, V=2]
    close(pm.entropy(log_probs), [[-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]])
    close(pm.token_logprobs(log_probs, torch.tensor([[1]])), [[math.log(0.75)]])
    x, mask = T([1.0, 2.0, 100.0], [3.0, 5.0, 7.0]), T([1, 1, 0], [1, 1, 1])
    close(pm.masked_mean(x, mask), (1 + 2 + 3 + 5 + 7) / 5)
    close(pm.seq_mean_token_mean(x, mask), [1.5, 5.0])
    w = pm.masked_whiten(x, mask)
    mean, var = 18 / 5, sum((v - 18 / 5) ** 2 for v in (1, 2, 3, 5, 7)) / 5
    close(w, [[(v - mean) / math.sqrt(var + 1e-8) for v in (1, 2)] + [0.0],
              [(v - mean) / math.sqrt(var + 1e-8) for v in (3, 5, 7)]])


SCORES, GROUPS = T(1.0, 2.0, 3.0, 0.0, 4.0, 5.0), torch.tensor([0, 0, 0, 1, 1, 2])


def test_grpo_group_normalised_advantages():
    std_a = math.sqrt(((1 - 2) ** 2 + 0 + (3 - 2) ** 2) / 2)  # Bessel-corrected
    std_b = math.sqrt(((0 - 2) ** 2 + (4 - 2) ** 2) / 1)
    want = [(1 - 2) / (std_a + 1e-6), 0.0, (3 - 2) / (std_a + 1e-6), (0 - 2) / (std_b + 1e-6),
            (4 - 2) / (std_b + 1e-6), 0.0]  # a group of one has no baseline
    close(pm.grpo_advantages(SCORES, GROUPS), want)


def test_rloo_leave_one_out_advantages():
    want = [1 - (2 + 3) / 2, 2 - (1 + 3) / 2, 3 - (1 + 2) / 2, 0 - 4 / 1, 4 - 0 / 1, 0.0]
    close(pm.rloo_advantages(SCORES, GROUPS), want)


def test_reinforce_pp_returns_then_global_whitening():
    mask = T([1, 1], [1, 0])
    rewards = pm.kl_shaped_rewards(T(1.0, 0.0), T([0.1, 0.2], [0.3, 0.9]), mask, kl_coef=0.5)
    g = [-0.05 + (-0.1 + 1.0), -0.1 + 1.0, -0.15]  # returns-to-go, gamma = 1
    mean = sum(g) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in g) / 3 + 1e-8)
    close(pm.reinforce_pp_advantages(rewards, mask, gamma=1.0), [[(g[0] - mean) / std, (g[1] - mean) / std],
                                                                 [(g[2] - mean) / std, 0.0]])
    close(pm.discounted_returns(T([[1.0, 1.0, 1.0]]), T([[1, 1, 1]]), 0.5), [[1 + 0.5 + 0.25, 1 + 0.5, 1.0]])


# ---- group statistics: two-pass variance, exact zeros ---------------------------------------


def grpo_by_hand(scores: list[float], eps: float = 1e-6) -> list[float]:
    """One group, in Python floats (float64): mean, Bessel std from squared deviations, then A_i."""
    n = len(scores)
    mean = sum(scores) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in scores) / (n - 1))
    return [(r - mean) / (std + eps) for r in scores]


@pytest.mark.parametrize("centre, spread", [(5.0, 0.5), (10.0, 0.01)])
def test_grpo_advantages_in_float32_match_float64_arithmetic(centre, spread):
    """sum(x^2) - n mean^2 cancels in float32: rewards ~5 with spread 0.5 came out 2e-4 off, ~10
    with spread 0.01 off by orders of magnitude. The float32 input values themselves are the
    reference's input, so only the computation's error is measured."""
    g = torch.Generator().manual_seed(0)
    score = (centre + spread * torch.randn(8, generator=g)).float()
    got = pm.grpo_advantages(score, torch.zeros(8, dtype=torch.long))
    assert got.dtype == torch.float32
    want = grpo_by_hand([float(v) for v in score])
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), atol=2e-6, rtol=0)


@pytest.mark.parametrize("n", range(2, 17))
@pytest.mark.parametrize("fn", [pm.grpo_advantages, pm.rloo_advantages])
def test_a_group_of_equal_rewards_gets_exactly_zero_advantage(fn, n):
    """No signal in a group, no update from it: r_i - mean = 0 exactly, at every group size
    ([7.3, 7.3, 7.3] gave -0.48 each from float32 rounding of the one-pass variance)."""
    score = torch.tensor([7.3] * n + [1.0, 2.0], dtype=torch.float32)
    group = torch.tensor([0] * n + [1, 1])
    got = fn(score, group)
    assert got[:n].tolist() == [0.0] * n
    assert got[n:].abs().min() > 0.5  # the other group still gets its signal


# ---- bounded ratios ---------------------------------------------------------------------------


@pytest.mark.parametrize("adv", [1.0, -1.0, 0.0])
@pytest.mark.parametrize("log_ratio", [1000.0, -1000.0])
def test_a_far_off_policy_token_gives_finite_loss_and_gradient(log_ratio, adv):
    """log r = +-1000 (exp overflows to inf): the log-ratio is clamped at +-LOG_RATIO_BOUND = 20
    (verl's SAFETY_BOUND), so r = exp(+-20) and the loss stays finite with a finite gradient."""
    logp = torch.tensor([log_ratio, 0.1], dtype=torch.float32, requires_grad=True)
    old, a = torch.zeros(2), torch.tensor([adv, 1.0])
    loss, clipped, approx_kl = pm.policy_loss(logp, old, a, clip=0.2, dual_clip=3.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(approx_kl).all() and torch.isfinite(logp.grad).all()
    r = math.exp(math.copysign(pm.LOG_RATIO_BOUND, log_ratio))
    want = max(-adv * r, -adv * min(max(r, 0.8), 1.2))
    if adv < 0:
        want = min(want, -3.0 * adv)
    assert loss[0].item() == pytest.approx(want, rel=1e-6)
    assert approx_kl[0].item() == pytest.approx((r - 1) - math.copysign(pm.LOG_RATIO_BOUND, log_ratio), rel=1e-6)
    assert logp.grad[1].item() == pytest.approx(-math.exp(0.1))  # the in-range token is untouched


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("log_r", [1000.0, -1000.0])
def test_kl_estimators_are_finite_for_far_apart_policies(estimator, log_r):
    logp = torch.tensor([0.0], requires_grad=True)
    kl = pm.kl_estimate(logp, torch.tensor([log_r]), estimator)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(logp.grad).all()
    b = math.copysign(pm.LOG_RATIO_BOUND, log_r)
    assert kl.item() == pytest.approx(-b if estimator == "k1" else (math.exp(b) - 1) - b, rel=1e-6)


# ---- off-policy correction: TIS, decoupled PPO, MIS ------------------------------------------


def test_tis_weights_are_truncated_ratios_of_learner_to_sampler():
    prox, behav = T(math.log(0.3), math.log(0.2), math.log(0.9)), T(math.log(0.6), math.log(0.05), math.log(0.3))
    w, rho = pm.tis_weights(prox, behav, cap=2.0)
    close(rho, [0.3 / 0.6, 0.2 / 0.05, 0.9 / 0.3])
    close(w, [min(0.3 / 0.6, 2.0), min(0.2 / 0.05, 2.0), min(0.9 / 0.3, 2.0)])
    assert not w.requires_grad


def test_decoupled_ppo_clips_around_the_proximal_policy_and_weighs_by_prox_over_behaviour():
    """AReaL's decoupled objective per token: (pi_prox / pi_behav) * max(-A r, -A clip(r)), with
    r = pi / pi_prox, the weight truncated at C (TIS)."""
    pi, prox, behav, adv = [0.5, 0.3], [0.4, 0.4], [0.1, 0.5], T(1.0, -1.0)
    logp, prox_lp, behav_lp = (torch.log(T(*v)) for v in (pi, prox, behav))
    loss, _, _ = pm.policy_loss(logp, prox_lp, adv, clip=0.2)
    w, _ = pm.tis_weights(prox_lp, behav_lp, cap=2.0)
    r = [0.5 / 0.4, 0.3 / 0.4]
    want = [min(0.4 / 0.1, 2.0) * max(-1.0 * r[0], -1.0 * min(max(r[0], 0.8), 1.2)),
            min(0.4 / 0.5, 2.0) * max(1.0 * r[1], 1.0 * min(max(r[1], 0.8), 1.2))]
    close(w * loss, want)
    close(w * loss, [2.0 * -1.2, 0.8 * 0.8])


def test_mis_masks_sequences_by_their_geometric_mean_ratio():
    prox = T([math.log(0.5), math.log(0.5), 0.0], [math.log(0.9), math.log(0.1), 0.0], [math.log(0.2), 7.0, 7.0])
    behav = T([math.log(0.1), math.log(0.1), 0.0], [math.log(0.3), math.log(0.1), 0.0], [math.log(0.2), 0.0, 0.0])
    mask = T([1, 1, 0], [1, 1, 0], [1, 0, 0])  # padding (7.0) must not count
    g = [math.exp((math.log(5) + math.log(5)) / 2), math.exp((math.log(3) + 0) / 2), 1.0]
    assert g == pytest.approx([5.0, math.sqrt(3), 1.0])
    close(pm.mis_keep(prox, behav, mask, 0.5, 2.0), [float(0.5 <= v <= 2.0) for v in g])
    close(pm.mis_keep(prox, behav, mask, 0.5, 2.0), [0.0, 1.0, 1.0])


# ---- the knobs: Clip-Higher, GSPO, loss aggregation, Dr. GRPO, REINFORCE++-baseline, overlong --


def test_clip_higher_decouples_the_two_sides_of_the_clip_range():
    """DAPO: clip(r, 1 - eps_low, 1 + eps_high), eps_low 0.2, eps_high 0.28."""
    ratios = [1.25, 1.35, 0.75, 0.7]
    adv = T(1.0, 1.0, -1.0, -1.0)
    loss, clipped, _ = pm.policy_loss(torch.log(T(*ratios)), torch.zeros(4, dtype=torch.float64), adv,
                                      clip=0.2, clip_high=0.28)
    close(loss, [max(-1.25, -1.25), max(-1.35, -1.28), max(0.75, 0.8), max(0.7, 0.8)])
    close(clipped, [0, 1, 1, 1])
    symmetric, _, _ = pm.policy_loss(torch.log(T(*ratios)), torch.zeros(4, dtype=torch.float64), adv, clip=0.2)
    close(symmetric[:1], [max(-1.25, -1.2)])  # the symmetric range clips 1.25; Clip-Higher does not


def test_gspo_sequence_ratio_loss_and_gradient():
    """s_i = exp(mean_t log(pi / pi_old)); L_i = max(-A s_i, -A clip(s_i)). GSPO's gradient w.r.t.
    log pi_t is -A s_i / |y_i| on every token of an unclipped sequence, 0 on a clipped one."""
    logp = torch.tensor([[0.1, -0.3, 0.5], [0.4, 0.6, 9.0], [0.5, 0.5, 9.0]], dtype=torch.float64, requires_grad=True)
    old, mask = torch.zeros(3, 3, dtype=torch.float64), T([1, 1, 1], [1, 1, 0], [1, 1, 0])
    adv = T([1.0] * 3, [-1.0] * 3, [1.0] * 3)
    loss, clipped, _ = pm.gspo_policy_loss(logp, old, adv * mask, mask, clip=0.2)
    s = [math.exp((0.1 - 0.3 + 0.5) / 3), math.exp((0.4 + 0.6) / 2), math.exp((0.5 + 0.5) / 2)]  # padding left out
    per_sample = pm.seq_mean_token_mean(loss, mask)
    clip = [min(max(v, 0.8), 1.2) for v in s]
    close(per_sample, [max(-s[0], -clip[0]), max(s[1], clip[1]), max(-s[2], -clip[2])])
    close(per_sample, [-s[0], s[1], -1.2])  # A < 0 keeps the larger (unclipped) loss, as PPO does
    close(clipped * mask, [[0, 0, 0], [1, 1, 0], [1, 1, 0]])  # s_1 = s_2 = e^0.5 is outside [0.8, 1.2]
    per_sample.sum().backward()
    close(logp.grad, [[-s[0] / 3] * 3, [s[1] / 2, s[1] / 2, 0.0], [0.0, 0.0, 0.0]])


def test_loss_aggregations_per_sample_parts():
    x, mask = T([1.0, 2.0, 100.0], [3.0, 5.0, 7.0]), T([1, 1, 0], [1, 1, 1])
    close(pm.per_sample_loss(x, mask, "seq_mean_token_mean"), [(1 + 2) / 2, (3 + 5 + 7) / 3])
    close(pm.per_sample_loss(x, mask, "token_mean"), [1 + 2, 3 + 5 + 7])  # / all tokens of the minibatch
    close(pm.per_sample_loss(x, mask, "seq_sum_norm", norm_tokens=10), [(1 + 2) / 10, (3 + 5 + 7) / 10])
    with pytest.raises(ValueError, match="seq_sum_norm"):
        pm.per_sample_loss(x, mask, "seq_sum_norm")


def test_dr_grpo_advantage_is_the_unscaled_centred_reward():
    want = [1 - 2, 0.0, 3 - 2, 0 - 2, 4 - 2, 0.0]
    close(pm.grpo_advantages(SCORES, GROUPS, std_normalize=False), want)


def test_reinforce_pp_baseline_subtracts_the_group_mean_then_whitens_the_batch():
    score, group, mask = T(1.0, 3.0, 2.0), torch.tensor([0, 0, 1]), T([1, 1], [1, 0], [1, 1])
    centred = pm.group_mean_baseline(score, group)
    close(centred, [1 - 2, 3 - 2, 0.0])  # a group of one has no baseline
    rewards = pm.kl_shaped_rewards(centred, T([0.2, 0.4], [0.0, 0.0], [0.2, 0.2]), mask, kl_coef=0.5)
    g = [-0.1 + (-0.2 - 1.0), -0.2 - 1.0, 1.0, -0.1 + (-0.1 + 0.0), -0.1 + 0.0]  # returns-to-go, gamma 1
    mean = sum(g) / 5
    std = math.sqrt(sum((v - mean) ** 2 for v in g) / 5 + 1e-8)
    close(pm.reinforce_pp_advantages(rewards, mask, 1.0),
          [[(g[0] - mean) / std, (g[1] - mean) / std], [(g[2] - mean) / std, 0.0],
           [(g[3] - mean) / std, (g[4] - mean) / std]])


def test_dapo_soft_overlong_punishment():
    """L_max 100, L_cache 20: 0 up to 80 tokens, ((100 - 20) - |y|) / 20 in (80, 100], -1 past 100."""
    got = pm.overlong_penalty(torch.tensor([50, 80, 81, 90, 100, 101]), max_len=100, buffer=20)
    close(got, [0.0, 0.0, (80 - 81) / 20, (80 - 90) / 20, (80 - 100) / 20, -1.0])
