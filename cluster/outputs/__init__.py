"""What a run leaves on disk: the run directory (`run_dir.py`: config, metrics.jsonl, TensorBoard,
rollouts Parquet, checkpoints, all written atomically) and the end-of-run report (`report.py`)."""
