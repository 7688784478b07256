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
  Variance    Chan, Golub & LeVeque 1983, "Algorithms for Computing the Sample Variance": the
              two-pass algorithm (mean first, then squared deviations), eq. (1.2a).
  Bounds      verl, `rollout_corr_helper.SAFETY_BOUND` / `core_algos.compute_policy_loss`: log-ratios
              clamped to +-20 before exponentiating (exp(20) ~ 4.9e8 is finite in fp32 and bf16).
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


def grpo_advantages(score: torch.Tensor, group: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: A_i = (r_i - mean(r_group)) / (std(r_group) + eps), std with Bessel's correction
    (as TRL). A group of one sample has no baseline, and a group whose rewards are all equal has
    no signal: both get advantage exactly 0. Computed in float64, returned in score's dtype."""
    n, mean, std, flat = _group_moments(score, group)
    adv = (score.double() - mean) / (std + eps)
    return torch.where((n > 1) & ~flat, adv, torch.zeros_like(adv)).to(score.dtype)


def rloo_advantages(score: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """RLOO: A_i = r_i - (1 / (k - 1)) * sum_{j != i} r_j, the other k-1 samples of the same
    prompt as baseline, i.e. k / (k - 1) * (r_i - mean(r_group)). A group of one sample, or of
    equal rewards, gets advantage exactly 0."""
    n, mean, _, flat = _group_moments(score, group)
    adv = n / (n - 1).clamp(min=1) * (score.double() - mean)
    return torch.where((n > 1) & ~flat, adv, torch.zeros_like(adv)).to(score.dtype)


def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """REINFORCE++: A_t = whiten_batch(G_t), G_t the return-to-go of the KL-shaped token rewards;
    the global batch mean is the baseline (no critic, no per-prompt group)."""
    return masked_whiten(discounted_returns(token_rewards, mask, gamma), mask)


# ---------------------------------------------------------------------------------------------
# Losses (per token; reduce with seq_mean_token_mean)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip: float,
                dual_clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate, per token: L = max(-A r, -A clip(r, 1-eps, 1+eps)), r = pi / pi_old.

    Dual clip (A < 0 only): L = min(L, -c A), so a huge ratio on a bad action cannot blow up.
    Returns (loss, clipped, approx_kl) per token: clipped = 1 where |r - 1| > eps (CleanRL's clip
    fraction), approx_kl = (r - 1) - log r (k3 of KL(pi_old || pi)). log r is bounded to
    +-LOG_RATIO_BOUND (see References, "Bounds"): a far off-policy token gives a finite loss.
    """
    log_ratio = bounded_log_ratio(logp, old_logp)
    ratio = torch.exp(log_ratio)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)
    clipped = ((ratio - 1).abs() > clip).to(logp.dtype)
    approx_kl = torch.expm1(log_ratio) - log_ratio
    return loss, clipped, approx_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float) -> torch.Tensor:
    """Clipped value loss, per token: 0.5 * max((V - R)^2, (old_V + clip(V - old_V, -c, c) - R)^2)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
