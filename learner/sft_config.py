"""The `rlhf train-sft` section: supervised fine-tuning on the learner's DeepSpeed ranks."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from contract.config_base import Section
from contract.datasets import Columns


class SFTConfig(Section):
    base_model: str = Field(..., description="HF causal-LM directory to fine-tune (the pretrained LM); its "
                                             "tokenizer and chat template render the examples")
    data: str = Field(..., description="Parquet, JSONL or datasets save_to_disk directory: `messages` "
                                       "conversations (every assistant turn is a target) or prompt/response rows")
    columns: Columns = Field(default_factory=Columns, description="column names of `data` (and the split of a "
                                                                  "DatasetDict directory)")
    output_dir: str = Field(..., description="where the fine-tuned HF directory (safetensors + tokenizer) goes; "
                                             "written under a temporary name and renamed, never half written")
    eval_data: str | None = Field(None, description="held-out examples in the same format; None: hold out "
                                                    "eval_fraction of `data`")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="share of `data` held out for the reported eval "
                                                              "loss when eval_data is not given")
    epochs: int = Field(3, ge=1, description="passes over the training examples; SFT sets are small next to "
                                             "pretraining, and 2-3 epochs is the usual range")
    lr: float = Field(2e-5, gt=0, description="AdamW learning rate, constant; 2e-5 is the common full "
                                              "fine-tuning rate for 0.5B-8B instruct models (tiny models want ~1e-3)")
    batch_size: int = Field(16, ge=1, description="examples per optimizer step, over all ranks; a multiple of "
                                                  "num_ranks x micro_batch_size (the rest is gradient accumulation)")
    micro_batch_size: int = Field(4, ge=1, description="examples per forward/backward on one rank: what bounds "
                                                       "activation memory")
    max_length: int = Field(1024, ge=8, description="tokens per example, cut from the right; an example left "
                                                    "with no target token is dropped and counted")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm, as in the RL learner")
    num_ranks: int = Field(1, ge=1, description="DeepSpeed ranks (Ray actors; one GPU each on a GPU cluster)")
    cpus_per_rank: float = Field(1.0, gt=0, description="Ray CPUs reserved per rank (also its torch threads)")
    gpus_per_rank: float = Field(1.0, ge=0, description="GPUs per rank on a CUDA cluster (ignored on CPU)")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage: 0 replicates, 2 shards optimizer "
                                                       "state and gradients, 3 also parameters")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="training precision; bfloat16 on GPUs "
                                                                         "that support it, float32 on CPU")
    seed: int = Field(0, description="data split, shuffling and init seed")
    init_timeout_s: float = Field(600.0, gt=0, description="rank start + DeepSpeed init (a first run JIT-compiles)")
    step_timeout_s: float = Field(1800.0, gt=0, description="one optimizer step or one eval pass on every rank")
    dist_timeout_s: float = Field(300.0, gt=0, description="torch.distributed collective timeout")

    @model_validator(mode="after")
    def _batch_divides(self) -> "SFTConfig":
        per_step = self.num_ranks * self.micro_batch_size
        if self.batch_size % per_step:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of num_ranks x micro_batch_size "
                             f"({per_step})")
        return self

    def learner_config(self):
        """The RL learner's section with these settings: SFT ranks use the learner's DeepSpeed config
        builder, so the two stages run the same ZeRO/precision/clipping setup."""
        from learner.config import LearnerConfig, RLConfig

        return LearnerConfig(num_ranks=self.num_ranks, cpus_per_rank=self.cpus_per_rank,
                             gpus_per_rank=self.gpus_per_rank, zero_stage=self.zero_stage, dtype=self.dtype,
                             lr=self.lr, init_timeout_s=self.init_timeout_s, step_timeout_s=self.step_timeout_s,
                             dist_timeout_s=self.dist_timeout_s,
                             rl=RLConfig(algorithm="grpo", kl_coef=0.0, minibatch_size=self.batch_size,
                                           micro_batch_size=self.micro_batch_size, max_grad_norm=self.max_grad_norm))
