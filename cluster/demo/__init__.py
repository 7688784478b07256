"""The built-in demo (`rlhf train` with no config): a synthetic task with a known gold score
(`task.py`) and tiny random-init models with a locally trained tokenizer (`tiny_models.py`),
since nothing can be downloaded from a hub."""
