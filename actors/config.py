"""The `rollout` config section: how many vLLM workers, their resources, engine and sampling."""
from __future__ import annotations

from pydantic import Field

from contract.config_base import Section


class SamplingConfig(Section):
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)  # -1 (or 0): disabled
    max_new_tokens: int = Field(32, ge=1)
    n: int = Field(1, ge=1, description="samples per prompt (the group size for GRPO/RLOO)")
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(None, description="per-prompt seeds are derived from it and the prompt_id, so a "
                                               "sample does not depend on which worker or chunk served it")


class EngineConfig(Section):
    dtype: str = Field("float32", pattern="^(float32|bfloat16|float16|auto)$")
    max_model_len: int = Field(512, ge=16)
    kv_cache_bytes: int | None = Field(None, ge=1 << 20, description="CPU only: KV cache size; default: room "
                                                                     "for kv_cache_seqs sequences of max_model_len")
    kv_cache_seqs: int = Field(64, ge=1, description="CPU only: full-length sequences the default KV cache holds")
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0)
    tensor_parallel_size: int = Field(1, ge=1)
    seed: int = 0


class RolloutConfig(Section):
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)
    threads_per_worker: int = Field(1, ge=1)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    request_timeout_s: float = Field(600.0, gt=0, description="limit of every remote call (generate chunk, "
                                                               "weight load); a worker whose chunk runs past it "
                                                               "is treated as dead")
    start_timeout_s: float = Field(600.0, gt=0, description="limit of a worker's start (engine and model load)")
    max_retries: int = Field(3, ge=0, description="re-dispatches of a prompt whose worker died or hung")
    chunks_per_worker: int = Field(1, ge=1, description="a generate call is cut into num_workers * this many "
                                                        "token-balanced chunks handed out as workers free up; "
                                                        "1 = largest vLLM batches, more = finer re-dispatch")
