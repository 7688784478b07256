"""The RL math of the learner, as pure torch functions, readable against the papers.

Conventions. Every per-token tensor is *response-aligned*: shape [B, T], position t is the t-th
generated token of sample b, and `mask` [B, T] is 1 for real response tokens and 0 for right
padding. The prompt never appears here (the forward pass already cut it away), so "masking the
prompt" and "masking padding" are both the one `mask`. Per-sample tensors have shape [B].

References
  PPO         Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. (7).
  GAE         Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE", eq. (16).
  KL k1/k3    Schulman 2020, "Approximating KL Divergence" (blog), with r = p_ref / p.
  dual-clip   Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL", eq. (5).
  RLHF reward Ziegler et al. 2019 / Ouyang et al. 2022: r_t = -beta * KL_t, + score at the last token.
  GRPO        Shao et al. 2024, "DeepSeekMath", sec. 4.1.2 (outcome supervision).
  RLOO        Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization".
  REINFORCE++ Hu 2025, "REINFORCE++": token-level KL reward, return-to-go, global batch whitening.
  Variance    Chan, Golub & LeVeque 1983, "Algorithms for Computing the Sample Variance: Analysis and
              Recommendations", sec. 1: the two-pass algorithm (mean first, then squared deviations).
  Bounds      verl, `rollout_corr_helper.SAFETY_BOUND` / `core_algos.compute_policy_loss`: log-ratios
              clamped to +-20 before exponentiating (exp(20) ~ 4.9e8 is finite in fp32 and bf16).
  DAPO        Yu et al. 2025, "DAPO: An Open-Source LLM RL System at Scale": sec. 3.1 Clip-Higher
              (eps_low != eps_high), sec. 3.3 token-level loss (1 / sum_i |o_i|), sec. 3.4 overlong
              filtering and Soft Overlong Punishment R_length.
  Dr. GRPO    Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective", sec. 3.2:
              A_i = r_i - mean(r_group) (no std division), per-sample token sums over a constant.
  GSPO        Zheng et al. 2025, "Group Sequence Policy Optimization", sec. 4: s_i = exp(mean_t log
              ratio), clipped per sequence; GSPO-token s_i,t = sg[s_i] pi_t / sg[pi_t].
  RF++-base   Hu et al. 2025, "REINFORCE++" (v3), REINFORCE++-baseline: r_i - mean(r_group), then
              the token returns whitened over the global batch.
  TIS         Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"
              (blog): w_t = min(pi_learner / pi_sampler, C) on the policy-gradient term.
  Decoupled   Fu et al. 2025, "AReaL: A Large-Scale Asynchronous RL System", sec. 5 (decoupled PPO):
              behaviour policy (sampler) != proximal policy (learner's old pass); the clip is around
              the proximal one and pi_prox / pi_behav weighs the clipped surrogate.
  MIS         Liu, Li et al. 2025, "When Speed Kills Stability: Demystifying RL Collapse from the
              Training-Inference Mismatch" (blog), and verl's rollout-correction docs: sequences
              whose geometric-mean ratio exp(mean_t log(pi_learner / pi_sampler)) is outside
              [lo, hi] are masked out of the loss (verl: rollout_rs="geometric").
"""
from __future__ import annotations

import torch

# A log-ratio log(p / q) is clamped to [-LOG_RATIO_BOUND, LOG_RATIO_BOUND] before it is exponentiated
# (verl's SAFETY_BOUND): a far off-policy token then gives a large but finite ratio, and the clamp's
# zero gradient outside the bound keeps inf/NaN out of the backward pass.
LOG_RATIO_BOUND = 20.0


def bounded_log_ratio(logp: torch.Tensor, base_logp: torch.Tensor) -> torch.Tensor:
    """log(p / q) = logp - base_logp, clamped to +-LOG_RATIO_BOUND (see References, "Bounds")."""
    return (logp - base_logp).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)


# ---------------------------------------------------------------------------------------------
# Masked reductions


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * m) / sum(m); an all-masked row gives 0, not NaN."""
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the unmasked entries (population variance); masked entries -> 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def seq_mean_token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over its tokens, [B, T] -> [B]. Averaging samples afterwards weighs every
    sample equally, so the loss of a batch does not depend on how it is cut into micro-batches."""
    return masked_mean(x, mask, dim=-1)


def per_sample_loss(x: torch.Tensor, mask: torch.Tensor, aggregation: str, norm_tokens: float | None = None
                    ) -> torch.Tensor:
    """Each sample's share of a loss, [B, T] -> [B]; the caller divides the sum over samples by
    the number of samples (seq_* modes) or of tokens (token_mean) of the whole minibatch:
      seq_mean_token_mean  (1/N) sum_i (1/|o_i|) sum_t x_it   GRPO as published (DeepSeekMath eq. 3)
      token_mean           (1/sum_i |o_i|) sum_i sum_t x_it    DAPO sec. 3.3
      seq_sum_norm         (1/N) sum_i (1/C) sum_t x_it        Dr. GRPO sec. 3.2, C a constant
    This returns the inner per-sample part: the token mean, the token sum, or the token sum / C."""
    if aggregation == "seq_mean_token_mean":
        return masked_mean(x, mask, dim=-1)
    if aggregation == "token_mean":
        return masked_sum(x, mask, dim=-1)
    if aggregation == "seq_sum_norm":
        if not norm_tokens:
            raise ValueError("loss_aggregation seq_sum_norm needs its constant token count C (got none)")
        return masked_sum(x, mask, dim=-1) / norm_tokens
    raise ValueError(f"loss_aggregation: expected token_mean, seq_mean_token_mean or seq_sum_norm "
                     f"(got {aggregation!r})")


# ---------------------------------------------------------------------------------------------
# Log-probabilities and entropy


def token_logprobs(log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log pi(a_t | s_t): log-softmax [B, T, V] (position t predicts tokens[:, t]) -> [B, T]."""
    return log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """H(pi(. | s_t)) = -sum_a pi(a) log pi(a), from the log-softmax [B, T, V] -> [B, T]."""
    return -(log_probs.exp() * log_probs).sum(-1)


# ---------------------------------------------------------------------------------------------
# KL to the reference policy (per token, samples drawn from pi)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) with log r = log pi_ref - log pi:
    k1 = -log r (unbiased, can be negative);  k3 = (r - 1) - log r (unbiased, always >= 0).
    log r is bounded to +-LOG_RATIO_BOUND first: k3 exponentiates it."""
    log_r = bounded_log_ratio(ref_logp, logp)
    if estimator == "k1":
        return -log_r
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"kl_estimator: expected k1 or k3 (got {estimator!r})")


def kl_shaped_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """RLHF token rewards: r_t = -beta * KL_t on every response token, plus the sequence score on
    the last real token. score [B], kl/mask [B, T] -> [B, T]. (beta = 0: the score alone.)"""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    return rewards.scatter_add(-1, last.unsqueeze(-1), (score * (mask.sum(-1) > 0)).unsqueeze(-1).to(rewards.dtype))


# ---------------------------------------------------------------------------------------------
# Advantages with a critic: GAE


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation on right-padded responses.

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)   (V past the last real token is 0: the episode ends)
    A_t     = delta_t + gamma * lam * A_{t+1}
    R_t     = A_t + V(s_t)                          (the value target)
    Returns (advantages, returns), both 0 on padding.
    """
    values, rewards = values * mask, rewards * mask
    T = rewards.shape[-1]
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(next_adv)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        adv[:, t] = next_adv
    return adv, (adv + values) * mask


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Return-to-go G_t = sum_{s >= t} gamma^(s-t) r_s over the real tokens; 0 on padding."""
    rewards = rewards * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[-1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


# ---------------------------------------------------------------------------------------------
# Critic-free advantages (one scalar per sample, broadcast over its tokens)


def _group_moments(score: torch.Tensor, group: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (group size, group mean, Bessel-corrected group std, zero-spread flag) in float64
    for integer group ids [B]. Two passes (Chan et al. 1983): the mean, then the sum of squared
    deviations from it; the one-pass sum(x^2) - n mean^2 cancels catastrophically in float32
    (rewards ~10 with spread 0.01 lose every digit). A group whose rewards are all equal is flagged
    by max == min, exactly, whatever rounding the mean went through."""
    x = score.double()
    n_groups = int(group.max()) + 1
    zeros = torch.zeros(n_groups, dtype=torch.float64, device=x.device)
    count = zeros.index_add(0, group, torch.ones_like(x))
    mean = zeros.index_add(0, group, x) / count.clamp(min=1)
    dev = x - mean[group]
    var = zeros.index_add(0, group, dev * dev) / (count - 1).clamp(min=1)
    hi = zeros.scatter_reduce(0, group, x, "amax", include_self=False)
    lo = zeros.scatter_reduce(0, group, x, "amin", include_self=False)
    return count[group], mean[group], var.sqrt()[group], (hi == lo)[group]


def grpo_advantages(score: torch.Tensor, group: torch.Tensor, eps: float = 1e-6, std_normalize: bool = True
                    ) -> torch.Tensor:
    """GRPO: A_i = (r_i - mean(r_group)) / (std(r_group) + eps), std with Bessel's correction
    (as TRL). std_normalize=False is Dr. GRPO's A_i = r_i - mean(r_group) (the division by std
    weighs low-variance prompts up, a difficulty bias). A group of one sample has no baseline, and
    a group whose rewards are all equal has no signal: both get advantage exactly 0. Computed in
    float64, returned in score's dtype."""
    n, mean, std, flat = _group_moments(score, group)
    adv = (score.double() - mean) / ((std + eps) if std_normalize else 1.0)
    return torch.where((n > 1) & ~flat, adv, torch.zeros_like(adv)).to(score.dtype)


def rloo_advantages(score: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """RLOO: A_i = r_i - (1 / (k - 1)) * sum_{j != i} r_j, the other k-1 samples of the same
    prompt as baseline, i.e. k / (k - 1) * (r_i - mean(r_group)). A group of one sample, or of
    equal rewards, gets advantage exactly 0."""
    n, mean, _, flat = _group_moments(score, group)
    adv = n / (n - 1).clamp(min=1) * (score.double() - mean)
    return torch.where((n > 1) & ~flat, adv, torch.zeros_like(adv)).to(score.dtype)


def group_mean_baseline(score: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """REINFORCE++-baseline's first step: r_i - mean(r_group) (a group of one, or of equal
    rewards, gives exactly 0). The result then goes through `reinforce_pp_advantages` as the score."""
    n, mean, _, flat = _group_moments(score, group)
    centred = score.double() - mean
    return torch.where((n > 1) & ~flat, centred, torch.zeros_like(centred)).to(score.dtype)


def overlong_penalty(length: torch.Tensor, max_len: int, buffer: int) -> torch.Tensor:
    """DAPO's Soft Overlong Punishment (sec. 3.4), per sample, added to the reward:
      R_length(y) = 0                                  |y| <= L_max - L_cache
                  = ((L_max - L_cache) - |y|) / L_cache   L_max - L_cache < |y| <= L_max
                  = -1                                 L_max < |y|
    with L_max = max_len (the sampler's max_new_tokens) and L_cache = buffer."""
    expected = max_len - buffer
    soft = ((expected - length.double()) / buffer).clamp(max=0.0)
    return torch.where(length > max_len, torch.full_like(soft, -1.0), soft).to(torch.float32)


def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """REINFORCE++: A_t = whiten_batch(G_t), G_t the return-to-go of the KL-shaped token rewards;
    the global batch mean is the baseline (no critic, no per-prompt group)."""
    return masked_whiten(discounted_returns(token_rewards, mask, gamma), mask)


# ---------------------------------------------------------------------------------------------
# Losses (per token; reduce with seq_mean_token_mean)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip: float,
                dual_clip: float | None = None, clip_high: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate, per token: L = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), r = pi / pi_old,
    eps_low = `clip`, eps_high = `clip_high` (default `clip`: PPO's symmetric range; DAPO's
    Clip-Higher raises eps_high alone).

    Dual clip (A < 0 only): L = min(L, -c A), so a huge ratio on a bad action cannot blow up.
    Returns (loss, clipped, approx_kl) per token: clipped = 1 where r is outside the range (CleanRL's
    clip fraction), approx_kl = (r - 1) - log r (k3 of KL(pi_old || pi)). log r is bounded to
    +-LOG_RATIO_BOUND (see References, "Bounds"): a far off-policy token gives a finite loss.
    """
    log_ratio = bounded_log_ratio(logp, old_logp)
    return _clipped_surrogate(torch.exp(log_ratio), log_ratio, adv, clip, clip if clip_high is None else clip_high,
                              dual_clip)


def _clipped_surrogate(ratio, log_ratio, adv, eps_low, eps_high, dual_clip=None):
    """PPO eq. (7) with the range [1 - eps_low, 1 + eps_high] (DAPO Clip-Higher), dual clip (Ye et al. eq. 5)."""
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps_low, 1 + eps_high))
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)
    clipped = ((ratio < 1 - eps_low) | (ratio > 1 + eps_high)).to(ratio.dtype)
    return loss, clipped, torch.expm1(log_ratio) - log_ratio


def gspo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                     clip: float, clip_high: float | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GSPO: the sequence-level ratio s_i = exp((1/|y_i|) sum_t log(pi_t / pi_old,t)), clipped per
    sequence: L_i = max(-A_i s_i, -A_i clip(s_i, 1 - eps_low, 1 + eps_high)). Written per token as
    GSPO-token, s_i,t = sg[s_i] * pi_t / sg[pi_t] (value s_i, gradient s_i grad log pi_t), so that
    the per-sample token mean is GSPO's L_i with GSPO's gradient s_i A_i (1/|y_i|) sum_t grad log pi_t
    when A_t = A_i. Returns per-token (loss, clipped, approx_kl), the last two of the sequence ratio."""
    log_s = masked_mean(bounded_log_ratio(logp, old_logp), mask, dim=-1).unsqueeze(-1)  # [B, 1]
    log_s_t = log_s.detach() + logp - logp.detach()
    return _clipped_surrogate(torch.exp(log_s_t), log_s_t.detach().expand_as(logp), adv, clip,
                              clip if clip_high is None else clip_high)


# ---------------------------------------------------------------------------------------------
# Off-policy correction: sampler (behaviour) vs learner (proximal) policy


def tis_weights(prox_logp: torch.Tensor, behav_logp: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated importance weights w_t = min(pi_prox / pi_behav, C) (TIS; the decoupled PPO
    objective's pi_prox / pi_behav with AReaL's cap), no gradient. Returns (w, the untruncated
    ratio rho_t), both [B, T]; rho is bounded to exp(+-LOG_RATIO_BOUND)."""
    rho = torch.exp(bounded_log_ratio(prox_logp, behav_logp)).detach()
    return rho.clamp(max=cap), rho


def mis_keep(prox_logp: torch.Tensor, behav_logp: torch.Tensor, mask: torch.Tensor, low: float, high: float
             ) -> torch.Tensor:
    """Sequence-level masked importance sampling: keep_i = 1 if the geometric-mean ratio
    exp((1/|y_i|) sum_t log(pi_prox / pi_behav)) lies in [low, high], else 0. [B]."""
    g = torch.exp(masked_mean(bounded_log_ratio(prox_logp, behav_logp), mask, dim=-1)).detach()
    return ((g >= low) & (g <= high)).to(prox_logp.dtype)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float) -> torch.Tensor:
    """Clipped value loss, per token: 0.5 * max((V - R)^2, (old_V + clip(V - old_V, -c, c) - R)^2)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
