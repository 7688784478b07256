"""What runs inside the cluster for one job: the named `controller` actor (`controller.py`, the
recipe), the services it starts (`services.py`: reward app, learner group and rollout pool
together, then the weight sync), the training loop (`loop.py`), one step's experience
(`produce.py`: draw, generate, score, dynamic sampling), resuming (`resume.py`: the loop state, the
steps a checkpoint saves generated but untrained, restoring a job), held-out evaluation (`evaluation.py`),
weight publishing (`weight_sync.py`), rollout-table helpers (`rollout_table.py`: rewards appended, provenance, stats),
the Ray metric gauges (`gauges.py`), autoscaler requests for `rlhf scale` (`autoscale.py`), the
shared-storage check of the run directory (`storage_check.py`) and the next reward model from the
review page's ratings (`reward_refresh.py`)."""
