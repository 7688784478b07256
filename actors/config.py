"""The `rollout` config section: how many vLLM workers, their resources, engine and sampling."""
from __future__ import annotations

from pydantic import Field, model_validator

from contract.config_base import Section
from contract.placement import CustomResources


class SamplingConfig(Section):
    temperature: float = Field(1.0, ge=0.0, description="softmax temperature; 1.0 samples the policy as it is, "
                                                        "which the PPO ratio and KL assume; 0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass; 1.0 (off) keeps samples "
                                                          "on-policy")
    top_k: int = Field(-1, ge=-1, description="sample from the k likeliest tokens; -1 or 0 (default): off, "
                                              "keeps samples on-policy")
    max_new_tokens: int = Field(32, ge=1, description="response length limit in tokens; must leave room for the "
                                                      "prompt within rollout.engine.max_model_len")
    n: int = Field(1, ge=1, description="samples per prompt (the group size for GRPO/RLOO, which need >= 2)")
    stop: list[str] = Field(default_factory=list, description="strings that end a response (not included in it); "
                                                              "default: only EOS or max_new_tokens")
    seed: int | None = Field(None, description="per-prompt seeds are derived from it and the prompt_id, so a "
                                               "sample does not depend on which worker or chunk served it; "
                                               "null: unseeded")


class EngineConfig(Section):
    dtype: str = Field("float32", pattern="^(float32|bfloat16|float16|auto)$", description=(
        "vLLM weight/activation dtype (float32|bfloat16|float16|auto). auto: the device profile's choice, made "
        "once at job start (DeviceProfile.compute_dtype: on a CPU, bfloat16 only if a measured bf16 matmul is "
        ">= 1.2x faster than fp32 there, it is ~5x slower on AVX2-only CPUs; on a GPU, bfloat16 where supported), "
        "the same for learner.dtype when it is auto too; use it for real models. Default float32: exact on CPU, "
        "matches the learner's logprobs on any box"))
    max_model_len: int = Field(512, ge=16, description="context limit in tokens (prompt + response) the engine "
                                                       "allocates for; at most the model's max_position_embeddings")
    kv_cache_bytes: int | None = Field(None, ge=1 << 20, description="CPU only: KV cache size in bytes; null: "
                                                                     "room for kv_cache_seqs sequences of "
                                                                     "max_model_len, computed from the model")
    kv_cache_seqs: int = Field(64, ge=1, description="CPU only: full-length sequences the default KV cache holds; "
                                                     "64 fits a typical step's batch without waves")
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0, description="GPU only: share of the GPU's memory "
                                                                           "vLLM may take (weights + KV cache); "
                                                                           "0.5 leaves room if a learner shares it")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one engine shards the model over (vLLM tensor "
                                                           "parallelism); give each worker as many "
                                                           "(rollout.gpus_per_worker)")
    seed: int = Field(0, description="vLLM engine seed (sampling without rollout.sampling.seed)")
    lora_rank: int = Field(0, ge=0, description=(
        "rank r of the LoRA adapter weight syncs bring (vLLM runtime LoRA: enable_lora, max_lora_rank the "
        "smallest size vLLM offers >= r); 0: LoRA off, syncs bring full weights. A job config leaves it unset: "
        "its plan derives it from learner.lora (r when learner.lora.sync is adapter, else 0; cluster/plan.py)"))


class RolloutConfig(Section):
    num_workers: int = Field(1, ge=1, description="vLLM engines, one Ray actor each; change a running job's "
                                                  "with `rlhf scale --workers N`")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs each worker reserves")
    gpus_per_worker: float = Field(1.0, ge=0, description="Ray GPUs each worker reserves (device cuda only; "
                                                          "ignored on CPU); fractions share a GPU")
    threads_per_worker: int = Field(1, ge=1, description="OpenMP/torch threads of a worker's process; 1 because "
                                                         "workers share cores with the learner on small boxes")
    resources: CustomResources = Field(default_factory=dict, description=(
        "Ray custom resources each worker reserves, e.g. {rollout: 1}: workers start only on nodes that offer "
        "them (the rollout node type of cluster/manifests/), spread over those nodes. Unit: amount per worker. "
        "Default {}: no constraint, so the single-node demo runs anywhere as before"))
    placement_timeout_s: float = Field(120.0, gt=0, description=(
        "seconds a worker added by `rlhf scale` or as a replacement may wait for a node before a warning names "
        "it; it keeps waiting in the background (the job runs on the others), so a node added later is used. "
        "120 s: longer than a node takes to boot and join, shorter than anyone waits without knowing why"))
    engine: EngineConfig = Field(default_factory=EngineConfig, description="the vLLM engine of each worker")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="how responses are sampled")
    request_timeout_s: float = Field(600.0, gt=0, description="seconds; limit of every remote call (generate "
                                                              "chunk, weight load); a worker whose chunk runs past "
                                                              "it is treated as dead")
    start_timeout_s: float = Field(600.0, gt=0, description="seconds; limit of a worker's start (engine and model "
                                                            "load; the first start on a box compiles kernels)")
    max_retries: int = Field(3, ge=0, description="re-dispatches of a prompt whose worker died or hung before "
                                                  "the step fails")
    inflight_updates: bool = Field(False, description=(
        "load a new policy version between two engine steps, while responses are mid-generation (the "
        "sequences in flight are recomputed under it and carry on; each token records its version), "
        "rather than after the generate call in flight. A job config leaves it unset: its plan turns it "
        "on for loop.mode inflight (cluster/plan.py)"))
    chunks_per_worker: int = Field(1, ge=1, description="a generate call is cut into num_workers * this many "
                                                        "token-balanced chunks handed out as workers free up; "
                                                        "1 = largest vLLM batches, more = finer re-dispatch")

    @model_validator(mode="after")
    def _response_fits(self) -> "RolloutConfig":
        if self.sampling.max_new_tokens >= self.engine.max_model_len:
            raise ValueError(f"rollout.sampling.max_new_tokens: {self.sampling.max_new_tokens} must be below "
                             f"rollout.engine.max_model_len ({self.engine.max_model_len}): prompt and response share "
                             f"the context, responses would be cut short silently")
        return self
