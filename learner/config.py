"""The `learner` config section: the DeepSpeed group, the RL algorithm and its coefficients.

Facts about the rollouts that other sections own (the sampler's temperature and max_new_tokens,
whether the loop is async) are not repeated here: whoever builds the learner passes them to
`LearnerGroup` (see `learner.algorithm.make_plan`).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from contract.config_base import Section
from contract.placement import CustomResources
from learner.lora_config import LoraConfig


class RolloutCorrectionConfig(Section):
    """Off-policy correction with the sampler's own logprobs (`Batch.rollout_logprobs`) as the
    behaviour policy and the learner's old pass as the proximal one (decoupled PPO)."""

    mode: Literal["off", "tis", "mis"] | None = Field(None, description=(
        "off; tis: each token's policy-gradient term weighed by min(pi_old / pi_sampler, cap) (Yao et al. "
        "2025's truncated importance sampling, AReaL's decoupled PPO); mis: samples whose geometric-mean "
        "pi_old / pi_sampler is outside [mis_low, mis_high] masked out of the loss. null (default): auto, tis "
        "when the loop is async (stale samples are off-policy by a whole update), off when sync"))

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        """YAML 1.1 reads an unquoted `off` (in a file or a `key=off` override) as false: it means "off"."""
        return "off" if v is False else v

    cap: float = Field(2.0, gt=0, description=(
        "tis: the truncation C of the per-token weight (a ratio, unitless). 2.0: the TIS blog's and verl's "
        "rollout_is_threshold default"))
    mis_low: float = Field(0.5, gt=0, description=(
        "mis: lowest geometric-mean ratio pi_old / pi_sampler a sample may have and stay in the loss. 0.5: "
        "verl's default lower bound, 1 / mis_high"))
    mis_high: float = Field(2.0, gt=0, description=(
        "mis: highest geometric-mean ratio pi_old / pi_sampler a sample may have and stay in the loss. 2.0: "
        "verl's rollout_rs_threshold default"))

    @model_validator(mode="after")
    def _bounds_ordered(self) -> "RolloutCorrectionConfig":
        if not self.mis_low < 1.0 < self.mis_high:
            raise ValueError(f"mis_low ({self.mis_low}) < 1 < mis_high ({self.mis_high}) is required: a sample "
                             f"exactly on-policy must be kept")
        return self

    def effective_mode(self, async_rollouts: bool) -> str:
        """`mode`, with null resolved: tis for an async loop, off for a sync one."""
        if self.mode is not None:
            return self.mode
        return "tis" if async_rollouts else "off"


class OverlongConfig(Section):
    """Responses cut at the sampler's max_new_tokens (DAPO sec. 3.4)."""

    mode: Literal["none", "mask", "penalty"] = Field("none", description=(
        "none: truncated responses train like any other; mask: they are left out of the loss (DAPO's overlong "
        "filtering: a cut response's reward is noise); penalty: DAPO's Soft Overlong Punishment, a length "
        "penalty ramping from 0 to -penalty over the last buffer_tokens before max_new_tokens, added to the "
        "reward. none: the plain algorithm, as before"))
    buffer_tokens: int | None = Field(None, ge=1, description=(
        "penalty: L_cache, the tokens before max_new_tokens over which the penalty ramps (tokens). null: a fifth "
        "of max_new_tokens, DAPO's 4096 of 20480"))
    penalty: float = Field(1.0, ge=0, description=(
        "penalty: the largest length penalty, reached at max_new_tokens (reward units). 1.0: DAPO's R_length "
        "as published (verl's overlong_penalty_factor)"))


class RLConfig(Section):
    algorithm: Literal["ppo", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = Field("ppo", description=(
        "ppo: critic + GAE; grpo: group-normalised sequence advantages; rloo: leave-one-out baseline; "
        "reinforce_pp: KL-shaped token returns whitened over the batch; reinforce_pp_baseline: the same after "
        "subtracting each prompt's mean reward. ppo by default: the one that needs no group of samples per "
        "prompt"))
    epochs: int = Field(1, ge=1, description=(
        "passes over each step's batch. 1: every sample used once, the update stays near the sampling "
        "policy (and a one-minibatch update skips the old-policy pass)"))
    minibatch_size: int = Field(16, ge=1, description=(
        "samples per optimizer step, over all ranks; a multiple of num_ranks x micro_batch_size. 16: a few "
        "prompts' groups per step at the demo's scale"))
    micro_batch_size: int = Field(8, ge=1, description=(
        "samples per forward/backward on one rank (gradients are accumulated up to the minibatch); bounds "
        "activation memory, does not change the update. 8 fits the demo models on CPU"))
    clip: float = Field(0.2, gt=0, lt=1, description=(
        "PPO's clip range eps: the ratio pi / pi_old is clipped to [1 - eps, 1 + eps]. 0.2: the PPO paper's "
        "value and everyone's default"))
    clip_low: float | None = Field(None, gt=0, lt=1, description=(
        "eps_low, the lower side of the clip range [1 - eps_low, 1 + eps_high] (DAPO's Clip-Higher decouples "
        "the two). null: clip"))
    clip_high: float | None = Field(None, gt=0, description=(
        "eps_high, the upper side of the clip range; DAPO raises it alone (0.28) so unlikely tokens can gain "
        "probability, against entropy collapse. null: clip"))
    ratio_level: Literal["token", "sequence"] = Field("token", description=(
        "token: PPO's per-token ratio pi / pi_old; sequence: GSPO's s_i = exp(mean_t log ratio), clipped per "
        "sequence (GSPO uses a far smaller clip range, e.g. clip_low 3e-4, clip_high 4e-4). token: PPO/GRPO as "
        "published"))
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_sum_norm"] = Field(
        "seq_mean_token_mean", description=(
            "how token losses make a minibatch's loss: seq_mean_token_mean, each sample's token mean averaged "
            "over samples (GRPO as published); token_mean, the mean over all tokens of the minibatch (DAPO: long "
            "responses weigh by length); seq_sum_norm, each sample's token sum over a constant C averaged over "
            "samples (Dr. GRPO: no length bias). The default keeps today's behaviour"))
    loss_norm_tokens: int | None = Field(None, ge=1, description=(
        "seq_sum_norm: the constant C (tokens). null: the sampler's max_new_tokens, Dr. GRPO's choice"))
    grpo_std_normalize: bool = Field(True, description=(
        "grpo: divide each group's centred rewards by their std. false: Dr. GRPO's A = r - mean(group) (the std "
        "division favours prompts whose rewards barely differ). true: GRPO as published"))
    dual_clip: float | None = Field(None, gt=1, description=(
        "dual-clip c (Ye et al. 2020): for A < 0 the loss is capped at -c A, so a huge ratio on a bad action "
        "cannot dominate. null: off, as in plain PPO; 3.0 is the paper's value"))
    value_clip: float = Field(0.2, gt=0, description=(
        "ppo: the value prediction may move at most this far (in reward units) from the old value before the "
        "clipped loss takes over. 0.2: the same as the policy clip, as OpenAI's baselines do"))
    vf_coef: float = Field(0.5, ge=0, description=(
        "ppo: weight of the value loss in the critic's loss (the critic has its own optimizer, so this scales "
        "its gradient). 0.5: the PPO paper's c1"))
    entropy_coef: float = Field(0.0, ge=0, description=(
        "weight of the entropy bonus subtracted from the policy loss (per token, nats). 0: off, as usual for "
        "LLMs, where the KL to the reference already keeps the policy spread"))
    gamma: float = Field(1.0, ge=0, le=1, description=(
        "discount per token for GAE / returns. 1.0: a response is one episode with the reward at its end"))
    lam: float = Field(0.95, ge=0, le=1, description=(
        "GAE lambda (ppo): bias-variance trade-off of the advantage. 0.95: the GAE paper's usual value"))
    kl_coef: float = Field(0.05, ge=0, description=(
        "beta, weight of the KL to the frozen reference (in the reward per token, or as a loss term for "
        "grpo/rloo). 0 disables the reference model altogether. 0.05: InstructGPT-like strength"))
    kl_estimator: Literal["k1", "k3"] = Field("k1", description=(
        "per-token KL estimate (Schulman 2020): k1 = log pi - log pi_ref (unbiased, signed), k3 = r - 1 - log r "
        "(unbiased, >= 0; GRPO's). k1: the classic RLHF reward penalty"))
    kl_in_reward: bool = Field(True, description=(
        "ppo/reinforce_pp: fold -beta KL into the token rewards (true, as in InstructGPT) or add it as a loss "
        "term (false). grpo/rloo always use the loss term"))
    whiten_advantages: bool = Field(True, description=(
        "ppo: normalise GAE advantages to zero mean, unit variance over the batch. true: the usual PPO "
        "practice, makes lr independent of the reward scale"))
    max_grad_norm: float = Field(1.0, gt=0, description=(
        "global gradient-norm clip before each optimizer step (L2 norm). 1.0: the common RLHF default"))
    rollout_correction: RolloutCorrectionConfig = Field(default_factory=RolloutCorrectionConfig, description=(
        "correction for samples drawn by another policy than the learner's (engine kernels, dtype, staleness)"))
    overlong: OverlongConfig = Field(default_factory=OverlongConfig, description=(
        "what happens to responses cut at max_new_tokens"))

    @model_validator(mode="after")
    def _sequence_ratio_has_no_dual_clip(self) -> "RLConfig":
        if self.ratio_level == "sequence" and self.dual_clip is not None:
            raise ValueError("dual_clip applies to token-level ratios only; unset it for ratio_level: sequence")
        return self

    def clip_range(self) -> tuple[float, float]:
        """(eps_low, eps_high): clip_low / clip_high where set, else clip."""
        return (self.clip if self.clip_low is None else self.clip_low,
                self.clip if self.clip_high is None else self.clip_high)


class LearnerConfig(Section):
    num_ranks: int = Field(1, ge=1, description=(
        "DeepSpeed data-parallel ranks, one Ray actor each. 1: the single-node demo"))
    cpus_per_rank: float = Field(1.0, gt=0, description=(
        "Ray CPUs each rank reserves (and its torch threads). 1: leaves the demo box's other core to rollout"))
    gpus_per_rank: float = Field(1.0, ge=0, description=(
        "Ray GPUs each rank reserves (device cuda only; ignored on CPU). 1: one GPU per rank"))
    resources: CustomResources = Field(default_factory=dict, description=(
        "Ray custom resources each rank's placement-group bundle reserves, e.g. {learner: 1}: ranks start only "
        "on nodes that offer them (the learner node type of cluster/manifests/), packed together. Unit: amount "
        "per rank. Default {}: no constraint (the single-node demo)"))
    zero_stage: int = Field(0, ge=0, le=3, description=(
        "DeepSpeed ZeRO stage: 0 replicates everything, 2 shards optimizer state and gradients, 3 also the "
        "parameters. 0: one rank has nothing to shard"))
    dtype: Literal["float32", "bfloat16", "auto"] = Field("float32", description=(
        "compute dtype of the policy and reference forwards (master weights stay fp32): float32, bfloat16, or "
        "auto: the device profile's choice, made once at job start, the same as rollout.engine.dtype auto "
        "(on a CPU bfloat16 only where measured clearly faster; on a GPU bfloat16 where supported); use it "
        "for real models. Default float32: exact on CPU, equal to the fp32 rollout engine's logprobs on any box"))
    lr: float = Field(1e-5, gt=0, description=(
        "policy AdamW learning rate (per optimizer step). 1e-5: a common full-finetune RLHF value"))
    critic_lr: float = Field(1e-5, gt=0, description=(
        "ppo: critic AdamW learning rate (per optimizer step). 1e-5: the policy's, a safe start"))
    critic_model: str | None = Field(None, description=(
        "ppo: HF directory the value model starts from (a one-output token-classification head is added). "
        "null: the policy, as most RLHF recipes do"))
    rl: RLConfig = Field(default_factory=RLConfig, description="the RL algorithm and its coefficients")
    weight_sync: Literal["broadcast", "object_store"] = Field("broadcast", description=(
        "how new weights reach the rollout engines: broadcast over a side torch.distributed group, or one "
        "ray.put workers fetch. broadcast: fastest when the learner and the engines share a fabric"))
    bucket_mb: int = Field(256, ge=1, description=(
        "broadcast: tensors are sent in buckets of this many MiB. 256: large enough to amortise a collective, "
        "small enough to stay in memory twice"))
    sync_timeout_s: float = Field(300.0, gt=0, description=(
        "seconds; limit of a weight publish, checkpoint save or load"))
    init_timeout_s: float = Field(600.0, gt=0, description=(
        "seconds; limit of the ranks' start and DeepSpeed init (a box's first run JIT-compiles ops)"))
    step_timeout_s: float = Field(1800.0, gt=0, description=(
        "seconds; limit of one train_step on every rank"))
    dist_timeout_s: float = Field(300.0, gt=0, description=(
        "seconds; torch.distributed collective timeout inside the group"))
    gradient_checkpointing: bool = Field(False, description=(
        "activation checkpointing of the policy and critic decoder layers (HF gradient_checkpointing_enable, "
        "use_cache off): each layer's activations are recomputed in the backward instead of kept, about a third "
        "more compute for far less activation memory. false: small models on CPU have the memory"))
    max_tokens_per_micro_batch: int | None = Field(None, ge=1, description=(
        "token budget of one micro-batch per rank (tokens, counted as rows x padded length): samples sorted by "
        "length and packed greedily under it (learner/micro.py) instead of rl.micro_batch_size samples padded "
        "to the longest. Same gradient (the loss weighs samples, not micro-batches). null: the fixed count, "
        "unchanged behaviour; a ragged batch wants roughly rl.micro_batch_size x its mean length"))
    lora: LoraConfig | None = Field(None, description=(
        "train low-rank adapters (PEFT LoRA) instead of every weight; the frozen base (adapters off) is the KL "
        "reference and the engines get merged weights under the base names (learner/lora.py). null: full "
        "fine-tuning"))

    @model_validator(mode="after")
    def _batch_divides(self) -> "LearnerConfig":
        per_step = self.num_ranks * self.rl.micro_batch_size
        if self.rl.minibatch_size % per_step:
            raise ValueError(f"rl.minibatch_size ({self.rl.minibatch_size}) must be a multiple of "
                             f"num_ranks x rl.micro_batch_size ({per_step})")
        return self
