"""One PPO-family update, written once over any torch modules: forward passes that return
response-aligned tensors, advantages for the configured algorithm, and the micro-batch losses.

update.py's `train_step` puts them in order; the DeepSpeed ranks (rank.py) and the single
process of plain torch (local.py) both run exactly these functions; only who owns the optimizer
differs.

Loss scale: every sample weighs `w_i = 1 / (real samples in its minibatch)`, so a minibatch's loss
is the mean over its samples of each sample's token-mean loss, whatever the cut into ranks and
micro-batches (this is what lets 2 ranks reproduce 1 rank).

Temperature: the rollout engine samples from softmax(z / T), so every pass here (old policy,
reference, policy) scores softmax(z / T) too, as OpenRLHF, verl and TRL do; otherwise the ratio,
the KL and the entropy would belong to another policy than the one that drew the samples. The
reference is scored at the same T. See `scoring_temperature` for T = 0 and for top-p / top-k.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from learner import ppo_math as pm
from learner.batch import Batch
from learner.config import RLConfig


def response_hidden_index(mb: Batch) -> torch.Tensor:
    """[b, T] sequence positions whose outputs score the response tokens (position p predicts p+1)."""
    T = mb.response_ids.shape[1]
    idx = mb.prompt_lens.unsqueeze(1) - 1 + torch.arange(T).unsqueeze(0)
    return idx.clamp(max=mb.input_ids.shape[1] - 1)


def scoring_temperature(temperature: float) -> float:
    """The temperature the learner scores at: the sampler's T, so log pi = log_softmax(z / T).

    T = 0 is greedy decoding, which has no sampling distribution to match: it is scored at T = 1
    (the model's own logits), which is also what vLLM reports for greedy requests.

    top-p / top-k: the sampler draws from the truncated, renormalised distribution
    softmax(z / T) restricted to the kept tokens. The learner cannot reproduce that truncation (it
    does not know which tokens vLLM kept), so it scores the untruncated softmax(z / T). The engine
    reports "processed" logprobs (see actors/engine.py), which include the renormalisation: with
    top_p < 1 or top_k > 0 the engine's logprob of a sampled token is log pi_T(a) - log(kept mass)
    >= the learner's, and `logprob_gap` measures that truncation, not a weight or kernel mismatch.
    """
    if temperature < 0:
        raise ValueError(f"rollout.sampling.temperature: must be >= 0 (got {temperature})")
    return temperature if temperature > 0 else 1.0


@dataclass(frozen=True)
class Plan:
    """What an update needs beyond the learner config, resolved once by `make_plan` from the config
    and from what the job says about its rollouts (which other config sections own). A job's is
    part of its plan (cluster/plan.py), sent as it is to every rank."""

    temperature: float = 1.0          # rollout.sampling.temperature as scored (`scoring_temperature`: 0 -> 1)
    correction: str = "off"           # rollout_correction.mode resolved: off | tis | mis
    max_new_tokens: int | None = None  # the sampler's response limit (overlong penalty's L_max)
    norm_tokens: int | None = None     # seq_sum_norm's constant C
    overlong_buffer: int | None = None  # overlong penalty's L_cache


def make_plan(cfg: RLConfig, temperature: float = 1.0, async_rollouts: bool = False,
              max_new_tokens: int | None = None) -> Plan:
    """`temperature`: rollout.sampling.temperature; `async_rollouts`: the loop is async
    (decides rollout_correction.mode null); `max_new_tokens`: rollout.sampling.max_new_tokens
    (seq_sum_norm's default C, the overlong penalty's L_max). Raises ValueError, naming the key,
    on what cannot be resolved."""
    norm = cfg.loss_norm_tokens or max_new_tokens
    if cfg.loss_aggregation == "seq_sum_norm" and norm is None:
        raise ValueError("learner.rl.loss_norm_tokens: seq_sum_norm needs its constant C; set it, or pass the "
                         "sampler's max_new_tokens to the learner")
    buffer = None
    if cfg.overlong.mode == "penalty":
        if max_new_tokens is None:
            raise ValueError("learner.rl.overlong.mode: penalty needs the sampler's max_new_tokens (L_max), "
                             "which was not passed to the learner")
        buffer = cfg.overlong.buffer_tokens or max(1, max_new_tokens // 5)
        if buffer >= max_new_tokens:
            raise ValueError(f"learner.rl.overlong.buffer_tokens: {buffer} must be below max_new_tokens "
                             f"({max_new_tokens})")
    return Plan(scoring_temperature(temperature), cfg.rollout_correction.effective_mode(async_rollouts),
                max_new_tokens, norm, buffer)


def _kept_log_softmax(model, mb: Batch, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 log pi_T(. | s) = log_softmax(z / T) [b, N, V] at the positions from the first response
    position on, the next input token at each [b, N], and where each response token's position
    sits among them [b, T]. The LM head runs only on those positions (`logits_to_keep`) and tokens
    are scored before the [b, T] alignment: with a real vocabulary every pass over the logits costs
    like a layer, so none is spent on prompt positions or on re-indexing [b, T, V]."""
    idx = response_hidden_index(mb)
    first = int(idx.min())
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                   logits_to_keep=mb.input_ids.shape[1] - first).logits
    next_ids = torch.nn.functional.pad(mb.input_ids[:, first + 1:], (0, 1))  # the last position predicts nothing
    if temperature != 1.0:  # divided in fp32: bf16 logits / T would round before the softmax
        logits = logits.float() / temperature
    return (torch.log_softmax(logits, dim=-1, dtype=torch.float32), next_ids.to(logits.device),
            (idx - first).to(logits.device))


def policy_logprobs_and_entropy(model, mb: Batch, entropy_grad: bool = False, temperature: float = 1.0
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Response-aligned log pi_T(a_t | s_t) and entropy of pi_T, [b, T] in fp32, from one
    log-softmax. The entropy is a metric unless it is in the loss (`entropy_grad`)."""
    log_probs, next_ids, idx = _kept_log_softmax(model, mb, temperature)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        ent = pm.entropy(log_probs)
    return pm.token_logprobs(log_probs, next_ids).gather(1, idx), ent.gather(1, idx)


def critic_values(critic, mb: Batch) -> torch.Tensor:
    """Response-aligned values [b, T]: V(s_t) read at the position that generates token t."""
    out = critic(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[..., 0]
    return out.gather(1, response_hidden_index(mb).to(out.device)).float()


@torch.no_grad()
def response_logprobs(model, mb: Batch, temperature: float = 1.0) -> torch.Tensor:
    """Response-aligned log pi_T(a_t | s_t) for the old-policy and reference passes (no entropy)."""
    log_probs, next_ids, idx = _kept_log_softmax(model, mb, temperature)
    return pm.token_logprobs(log_probs, next_ids).gather(1, idx)


@dataclass
class Targets:
    """What is fixed for the whole update: per-token [B, T] tensors and the per-sample loss weight
    `keep` [B] (0: the sample is masked out of the loss and of its normaliser). `old_logprobs`
    None: the update is one optimizer step, whose own forward (detached) gives them (see
    `old_is_first_forward`)."""

    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    old_values: torch.Tensor | None
    advantages: torch.Tensor
    returns: torch.Tensor | None
    keep: torch.Tensor

    def rows(self, idx) -> "Targets":
        return Targets(*(None if (t := getattr(self, f.name)) is None else t[idx] for f in fields(self)))

    def to(self, device) -> "Targets":
        return Targets(*(None if (t := getattr(self, f.name)) is None else t.to(device) for f in fields(self)))


TOKEN_REWARD_ALGORITHMS = ("ppo", "reinforce_pp", "reinforce_pp_baseline")


def kl_as_reward(cfg: RLConfig) -> bool:
    """Token-reward algorithms (PPO, REINFORCE++) fold the KL into the reward when asked; GRPO and
    RLOO (sequence advantages) always use it as a loss term, as the GRPO paper does."""
    return cfg.kl_in_reward and cfg.algorithm in TOKEN_REWARD_ALGORITHMS and cfg.kl_coef > 0


def old_is_first_forward(cfg: RLConfig, batch_rows: int, plan: Plan = Plan()) -> bool:
    """One epoch of one minibatch is one optimizer step: the "old" policy is the current one, so
    the old logprobs are the update's own forward, detached, and the separate no-grad pass (a
    third of the step's compute) is skipped, as TRL does for one iteration. Not when the KL
    shapes the reward, nor with MIS: those advantages and masks need the old logprobs before the
    update starts. (TIS weighs token by token, so the update's own forward serves it.)"""
    return (cfg.epochs == 1 and batch_rows <= cfg.minibatch_size and not kl_as_reward(cfg)
            and plan.correction != "mis")


def compute_targets(cfg: RLConfig, b: Batch, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                    values: torch.Tensor | None, plan: Plan = Plan()) -> Targets:
    mask, score = b.mask, b.score
    if cfg.overlong.mode == "penalty":  # DAPO's Soft Overlong Punishment, added to the reward
        length_penalty = pm.overlong_penalty(mask.sum(-1), plan.max_new_tokens, plan.overlong_buffer)
        score = score + cfg.overlong.penalty * length_penalty * b.real
    returns = None
    if cfg.algorithm in TOKEN_REWARD_ALGORITHMS:
        shaped = kl_as_reward(cfg) and ref_logp is not None
        kl = pm.kl_estimate(old_logp, ref_logp, cfg.kl_estimator) if shaped else torch.zeros(mask.shape)
        if cfg.algorithm == "reinforce_pp_baseline":
            score = pm.group_mean_baseline(score, b.group)
        rewards = pm.kl_shaped_rewards(score, kl, mask, cfg.kl_coef if shaped else 0.0)
    if cfg.algorithm == "ppo":
        adv, returns = pm.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = pm.masked_whiten(adv, mask)
    elif cfg.algorithm in ("reinforce_pp", "reinforce_pp_baseline"):
        adv = pm.reinforce_pp_advantages(rewards, mask, cfg.gamma)
    elif cfg.algorithm == "grpo":
        adv = pm.grpo_advantages(score, b.group, std_normalize=cfg.grpo_std_normalize).unsqueeze(1) * mask
    else:
        adv = pm.rloo_advantages(score, b.group).unsqueeze(1) * mask
    keep = torch.ones(len(b))
    if cfg.overlong.mode == "mask":  # DAPO's overlong filtering
        keep = keep * (~b.truncated).float()
    if plan.correction == "mis":
        rc = cfg.rollout_correction
        keep = keep * pm.mis_keep(old_logp, b.rollout_logprobs, mask, rc.mis_low, rc.mis_high)
    return Targets(old_logp, ref_logp, values, adv, returns, keep)


def loss_normaliser(cfg: RLConfig, mb: Batch, keep: torch.Tensor) -> float:
    """What a minibatch's loss is divided by (`pm.per_sample_loss`): its kept real tokens for
    token_mean, else its kept real samples. Computed over the whole minibatch before it is cut
    into micro-batches and ranks, which is what keeps the loss scale independent of that cut."""
    kept = mb.real * keep
    return float((kept * mb.mask.sum(-1)).sum() if cfg.loss_aggregation == "token_mean" else kept.sum())


def sample_weights(mb: Batch, norm: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """w_i = real_i * keep_i / norm: a minibatch's loss is the sum of w_i * (sample i's loss)."""
    return (mb.real if keep is None else mb.real * keep) / max(norm, 1.0)


MAX_METRICS = ("is_weight_max",)  # reduced by max over micro-batches and ranks; the others are sums


def actor_loss(cfg: RLConfig, model, mb: Batch, tg: Targets, w: torch.Tensor, plan: Plan = Plan()
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """sum_i w_i * agg_i(c_t * policy loss - c_ent * entropy + beta * KL-loss term), agg_i sample i's
    part of `loss_aggregation` (`pm.per_sample_loss`; w_i divides by `loss_normaliser`), c_t the
    rollout correction's weight (TIS: min(pi_old / pi_sampler, cap); else 1). Returns the loss and
    per-sample metrics (already weighted by `real`, to be summed; MAX_METRICS: to be maxed): the KL
    to the reference, the rollout engine's logprob gap and the importance ratios
    rho_t = pi_old / pi_sampler are measured on the old policy. The is_* metrics are reported in
    every mode (diagnostics of the sampler mismatch) and applied only in their own: is_weight_mean /
    _max of rho (before truncation), is_truncated_frac the share of tokens with rho > cap,
    is_masked_frac the share of samples whose geometric-mean rho is outside [mis_low, mis_high]."""
    logp, ent = policy_logprobs_and_entropy(model, mb, entropy_grad=cfg.entropy_coef > 0, temperature=plan.temperature)
    old = logp.detach() if tg.old_logprobs is None else tg.old_logprobs
    eps_low, eps_high = cfg.clip_range()
    if cfg.ratio_level == "sequence":
        pl, clipped, approx_kl = pm.gspo_policy_loss(logp, old, tg.advantages, mb.mask, eps_low, eps_high)
    else:
        pl, clipped, approx_kl = pm.policy_loss(logp, old, tg.advantages, eps_low, cfg.dual_clip, eps_high)
    rc = cfg.rollout_correction
    is_w, rho = pm.tis_weights(old, mb.rollout_logprobs, rc.cap)
    per_token = (is_w * pl if plan.correction == "tis" else pl) - cfg.entropy_coef * ent
    if tg.ref_logprobs is not None and not kl_as_reward(cfg) and cfg.kl_coef > 0:
        per_token = per_token + cfg.kl_coef * pm.kl_estimate(logp, tg.ref_logprobs, cfg.kl_estimator)
    per_sample = pm.per_sample_loss(per_token, mb.mask, cfg.loss_aggregation, plan.norm_tokens)
    kl = torch.zeros_like(old) if tg.ref_logprobs is None else pm.kl_estimate(old, tg.ref_logprobs, cfg.kl_estimator)
    m = {name: pm.seq_mean_token_mean(x.detach(), mb.mask) * mb.real
         for name, x in (("policy_loss", pl), ("clip_frac", clipped), ("approx_kl", approx_kl), ("entropy", ent),
                         ("kl", kl), ("logprob_gap", (mb.rollout_logprobs - old).abs()), ("is_weight_mean", rho),
                         ("is_truncated_frac", (rho > rc.cap).float()))}
    m["is_masked_frac"] = (1 - pm.mis_keep(old, mb.rollout_logprobs, mb.mask, rc.mis_low, rc.mis_high)) * mb.real
    m["is_weight_max"] = (rho * mb.mask).amax(-1) * mb.real
    return (w * per_sample).sum(), m


def critic_loss(cfg: RLConfig, values: torch.Tensor, mb: Batch, tg: Targets, w: torch.Tensor, plan: Plan = Plan()
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """vf_coef * sum_i w_i * agg_i(clipped value loss), aggregated like the policy loss; the metric
    is each sample's token mean."""
    vl = pm.value_loss(values, tg.old_values, tg.returns, cfg.value_clip)
    per_sample = pm.per_sample_loss(vl, mb.mask, cfg.loss_aggregation, plan.norm_tokens)
    return cfg.vf_coef * (w * per_sample).sum(), {"value_loss": pm.seq_mean_token_mean(vl.detach(), mb.mask) * mb.real}


def minibatches(n_real: int, n_total: int, size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's row order: the real rows shuffled, the padding rows last, cut in `size` chunks."""
    order = torch.cat([torch.randperm(n_real, generator=generator), torch.arange(n_real, n_total)])
    return list(order.split(size))
