"""What runs inside the cluster for one job: the named `controller` actor (`controller.py`, the
recipe), the services it starts in dependency order (`services.py`: reward app, learner group,
weight sync, rollout pool), the training loop (`loop.py`), weight publishing (`weight_sync.py`),
rollout-table helpers (`rollout_table.py`: rewards appended, provenance, stats) and the Ray
metric gauges (`gauges.py`)."""
