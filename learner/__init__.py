"""The learner: DeepSpeed PPO-family training on Ray actors (group.py), the RL math (ppo_math.py),
and weight publishing to the rollout workers by side-group broadcast or the Ray object store."""
