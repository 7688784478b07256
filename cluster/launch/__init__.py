"""What runs in the user's process: `rlhf train` (`train.py`: resolve the config, preflight
(`preflight.py`), reach a Ray cluster, start the named controller and follow it), `submit.py` (as a
Ray job), `control.py` (`scale`, `status`, `stop`, `reward-model update` of a running job),
`sft.py` (`rlhf train-sft`), `generate.py` (`rlhf generate`) and `ray_session.py` (attach or embed a
cluster)."""
