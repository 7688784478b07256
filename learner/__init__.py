"""`learner`: PPO-family updates on DeepSpeed ranks (Ray actors) and weight publishing.

Where a reader starts: `update.py` is the whole update, top to bottom (the no-grad passes, the
targets, epochs x minibatches x micro-batches, the optimizer steps, the metrics); `algorithm.py`
holds its parts (forward passes, advantages for the configured algorithm, the micro-batch losses);
`ppo_math.py` holds every formula as a pure function with its paper and equation.

| module | what it holds |
|---|---|
| `config.py`    | the `learner` config section (`rlhf config learner` prints it) |
| `ppo_math.py`  | the RL math: GAE, KL estimators, GRPO/RLOO/REINFORCE++ advantages, clipped losses, DAPO/Dr. GRPO/GSPO variants, rollout correction |
| `update.py`    | `train_step`: the update read top to bottom, whoever owns the optimizers |
| `algorithm.py` | the update's parts over any torch modules: passes, targets, losses, minibatch order |
| `local.py`     | `LocalLearner`: the update in one process with plain torch (the reference and the benchmarks' floor) |
| `batch.py`     | experience table -> padded tensors, after the checks that make a table trainable |
| `micro.py`     | token-budget micro-batches |
| `models.py`, `lora.py` | the modules as configured: activation checkpointing, LoRA adapters, HF-named weights |
| `rank.py`      | `LearnerRank`: one DeepSpeed rank inside a Ray actor |
| `rank_group.py` | `Ranks`: start, call and stop a set of rank actors together (RL and SFT) |
| `group.py`     | `LearnerGroup`: the controller's handle on the ranks (placement group, timeouts, checkpoints, publish) |
| `sft.py`       | supervised fine-tuning on the same ranks |

Imports only `contract` and third-party libraries; `cluster` drives it.
"""
