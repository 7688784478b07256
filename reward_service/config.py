"""The `reward` config section: what scores a (prompt, response) and how the Serve app runs; and
the config of `rlhf train-rm`."""
from __future__ import annotations

from pydantic import Field, model_validator

from contract.config_base import Section
from contract.datasets import Columns
from contract.placement import CustomResources


class RewardFunctionConfig(Section):
    path: str = Field(..., pattern=r"^[\w.]+:\w+$", description="package.module:function with the batched "
                                                                "signature fn(prompts, responses) -> list[float]")
    weight: float = Field(1.0, description="its weight in the sum of reward parts")


class VerifierConfig(Section):
    name: str = Field(..., pattern="^(math|exact|lcs)$", description=(
        "math: math-verify compares the response with the prompt's reference answer symbolically (1 or 0); "
        "exact: equal after trimming whitespace (1 or 0); lcs: 2*LCS/(len a + len b) of the characters, "
        "partial credit (reverse-text). The reference is the prompt file's answer column (data.columns.answer)"))
    weight: float = Field(1.0, description="its weight in the sum of reward parts")
    timeout_s: float = Field(10.0, gt=0, description=(
        "seconds one verifier call may take before its process is killed and the sample is recorded as a "
        "timeout (not trained on, counted in verifier_timeouts); 10 s: symbolic comparison of a short answer "
        "takes milliseconds, a pathological expression can take forever"))
    processes: int = Field(2, ge=1, description="worker processes per reward replica that run verifier calls "
                                                "(each on its own main thread, so math-verify's signal-based "
                                                "limits work); 2: calls are short, the pool is warm after the "
                                                "first step")


class FeedbackConfig(Section):
    alpha: float = Field(0.0, ge=0.0, le=1.0, description="r = alpha*r_feedback + (1-alpha)*r_model; 0 (off): "
                                                          "live feedback is stored but does not change rewards")
    ngram: int = Field(2, ge=1, description="words per n-gram when a feedback record is matched to a response "
                                            "(Jaccard overlap); 2 tolerates reordering better than 3")
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="min n-gram overlap (0-1) for a record to match")
    seed_file: str | None = Field(None, description="JSONL of feedback records (prompt, response, score in "
                                                    "[-1, 1]) loaded at start; null: start empty")


class RewardConfig(Section):
    model_dir: str | None = Field(None, description="HF sequence-classification directory with one output "
                                                    "(num_labels=1), e.g. from `rlhf train-rm`; null: reward "
                                                    "functions only",
                                  json_schema_extra={"placeholder": "<reward model dir, or null with functions>"})
    model_weight: float = Field(1.0, description="weight of the reward model's score in the sum of parts")
    functions: list[RewardFunctionConfig] = Field(default_factory=list,
                                                  description="reward functions added to the model's score")
    verifier: VerifierConfig | None = Field(None, description=(
        "a verifier scoring each response against its prompt's reference answer (verifiable tasks: "
        "`rlhf make-task`); null: none"))
    python_path: list[str] = Field(default_factory=list,
                                   description="dirs put on the replicas' PYTHONPATH, for functions not installed")
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig, description="live human feedback fused into "
                                                                                 "the reward")
    max_length: int = Field(512, ge=8, description="reward model input tokens, prompt + response, cut from the "
                                                   "left (the response is kept); at most the model's positions")
    max_batch_size: int = Field(32, ge=1, description="pairs per reward-model forward (Serve batching and client "
                                                      "chunks)")
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, description="seconds a partial batch waits for more pairs; "
                                                                  "10 ms: short against a forward pass")
    num_replicas: int = Field(1, ge=1, description="reward replicas (Serve), each with its own model copy")
    autoscaling: dict | None = Field(None, description="Ray Serve autoscaling_config (min_replicas, max_replicas, "
                                                       "...) instead of num_replicas; null: fixed num_replicas")
    cpus_per_replica: float = Field(1.0, gt=0, description="Ray CPUs each replica reserves (also its torch "
                                                           "threads)")
    resources: CustomResources = Field(default_factory=dict, description=(
        "Ray custom resources each scoring replica reserves, e.g. {reward: 1}: replicas start only on nodes that "
        "offer them (cluster/manifests/ give learner nodes a reward resource). Unit: amount per replica. Default "
        "{}: no constraint (the single-node demo)"))
    http_host: str = Field("127.0.0.1", description="host of the HTTP endpoint (/reward/score, /reward/feedback); "
                                                    "loopback: not reachable from other machines")
    http_port: int = Field(8000, ge=1, le=65535, description="port of the HTTP endpoint (Ray Serve's default)")
    token_env: str = Field("RLHF_REWARD_TOKEN", description="environment variable holding the bearer token the "
                                                            "HTTP endpoint and the review page require; unset or "
                                                            "empty: a random token kept in RUN/reward_store/token")
    request_timeout_s: float = Field(120.0, gt=0, description="seconds; one scoring call, retries included, "
                                                              "before the step fails")
    max_retries: int = Field(5, ge=0, description="re-sends of a chunk whose replica died or was restarting")
    start_timeout_s: float = Field(600.0, gt=0, description="seconds the reward app may take to be running "
                                   "(replicas placed, model loaded) before the job fails; as rollout.start_timeout_s")
    retrain_every: int = Field(0, ge=0, description="after every N new ratings from the review page (A/B picks, "
                                                    "likes, scores), train the next reward model on the run's "
                                                    "ratings (as `rlhf train-rm --from-run`) and swap it in without a "
                                                    "restart; 0: only by hand (`rlhf reward-model update`)")
    retrain_config: str | None = Field(None, description="an `rlhf train-rm` YAML whose settings (epochs, lr, ..., "
                                                         "and original `data` trained on beside the ratings) the "
                                                         "automatic retraining uses; null: defaults, ratings only")

    @model_validator(mode="after")
    def _something_scores(self):
        if self.model_dir is None and not self.functions and self.verifier is None:
            raise ValueError("set reward.model_dir or at least one reward.functions entry (or a reward.verifier)")
        return self


class RewardModelTrainConfig(Section):
    """`rlhf train-rm`: Bradley-Terry on pairs or BCE on like/dislike labels, in one process."""

    base_model: str = Field(..., description="HF directory the reward model starts from: a sequence classifier "
                                             "with one output (num_labels=1), or a causal LM (*ForCausalLM: the "
                                             "policy, an SFT output, a pretrained model) whose transformer body "
                                             "gets a new one-output score head initialised from `seed`")
    data: str = Field(..., description="Parquet/JSONL: prompt, chosen, rejected (bradley_terry) or prompt, "
                                       "response, label 0/1 (bce)")
    output_dir: str = Field(..., description="where the trained model is written (replaced atomically); use it as "
                                             "reward.model_dir")
    objective: str = Field("bradley_terry", pattern="^(bradley_terry|bce)$",
                           description="bradley_terry (preference pairs) or bce (like/dislike labels)")
    epochs: int = Field(3, ge=1, description="passes over the training split")
    batch_size: int = Field(16, ge=1, description="pairs (or labelled examples) per optimizer step")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate; 1e-3 suits tiny models, use ~1e-5 for "
                                              "pretrained ones")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="share of the data held out for the reported "
                                                              "accuracy")
    max_length: int = Field(128, ge=8, description="input tokens, prompt + response, cut from the left")
    seed: int = Field(0, description="split, shuffle and init seed")
    columns: Columns = Field(default_factory=Columns, description="column names of `data` (prompt, chosen, rejected, "
                                                                  "response, label; conversations in messages form "
                                                                  "are re-rendered in base_model's chat template) "
                                                                  "and the split of a DatasetDict directory")

    @property
    def num_ranks(self) -> int:
        """Not a key (train-rm runs in one process); kept for train_rm.py until it stops asking."""
        return 1
