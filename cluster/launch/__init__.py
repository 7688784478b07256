"""What runs in the user's process: `rlhf train` (`train.py`: resolve the config, preflight, reach a
Ray cluster, start the named controller and follow it), `submit.py` (as a Ray job), `control.py`
(`scale`, `status`, `stop` of a running job) and `ray_session.py` (attach or embed a cluster)."""
